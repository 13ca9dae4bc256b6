#!/usr/bin/env bash
# The demo corpus: music21's bundled scores rendered through fluidsynth, 10 s clips with captions, sharded.
set -euo pipefail
OUT=${1:-data/demo}
HOURS=${2:-1}
ostinato prep corpus --out "$OUT" --hours "$HOURS" --sample-rate 24000 --channels mono --seed 0
