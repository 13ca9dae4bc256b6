#!/usr/bin/env bash
# Any folder of wav/flac/mp3/ogg (with song.txt / song.json captions or a metadata.csv beside) -> shards.
set -euo pipefail
SRC=${1:?usage: folder_to_shards.sh SRC OUT [RATE]}
OUT=${2:?usage: folder_to_shards.sh SRC OUT [RATE]}
RATE=${3:-32000}
META=()
[ -f "$SRC/metadata.csv" ] && META=(--metadata "$SRC/metadata.csv")
ostinato prep shards "$SRC" "$OUT" --sample-rate "$RATE" --channels mono --loudness -14 \
    --segment 30 --overlap 0 --workers "$(nproc)" "${META[@]}"
