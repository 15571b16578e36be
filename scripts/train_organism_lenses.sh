#!/usr/bin/env bash
# Tuned lenses shipped with the organisms (organisms/<name>/tuned_lens): tuned-lens recipe, trained
# on the organism's own training utterances (mix of text / speech / interleaved prompts). Resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-runs/tuned_train_3k.jsonl}   # head -n 3000 runs/data/manifest_train.jsonl
for n in ${NAMES:-textinit_interleaved textinit_speechonly random_interleaved random_speechonly control_planted_l3}; do
  [ -f organisms/$n/tuned_lens/params.pt ] && continue
  OMP_NUM_THREADS=1 .venv/bin/speech-lens tuned-lens train organisms/$n "$DATA" --out organisms/$n/tuned_lens \
    --data-mode mix --steps 40 --tokens-per-step 4096 --heldout 0.1 --no-progress
done
