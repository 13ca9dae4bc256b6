#!/usr/bin/env bash
# Audio shards -> token shards. CODEC: an ostinato XP signature or export folder, a transformers EncodecModel
# folder (e.g. a local copy of facebook/encodec_32khz), or audiocraft's compression_state_dict.bin.
set -euo pipefail
SHARDS=${1:?usage: tokenize.sh SHARDS OUT CODEC}
OUT=${2:?usage: tokenize.sh SHARDS OUT CODEC}
CODEC=${3:?usage: tokenize.sh SHARDS OUT CODEC}
ostinato tokenize "$SHARDS" "$OUT" --codec "$CODEC" --batch-size 32 --workers 4
