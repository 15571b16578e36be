"""Spoken word swap: noising and denoising between two speech runs that differ in one word.

The corrupted utterance is the clean one with word ``--word``'s units replaced by the units of a
word from another utterance (``splice_word``). Every word position is patched on its own, per
layer (rule ``--rule``: last unit -> last unit, or span mean -> every unit):

* denoising: clean activations into the corrupted run: which layer/position restores the word?
* noising: corrupted activations into the clean run: which layer/position breaks it?

The metric is logit(clean word) - logit(swapped word), text tokens, at the swapped word's last
unit of the patched run. Figures: one layer x word heatmap per mode.

    python examples/patch_word_swap.py --out runs/patch_swap               # tiny random SpiritLM
    python examples/patch_word_swap.py --checkpoint PATH --manifest m.jsonl --id s1 --word 1 \\
        --donor s4 --donor-word 3 --out DIR

Without ``--checkpoint`` the model is a tiny random SpiritLM-format checkpoint: runs in seconds,
numbers meaningless (random weights).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from speech_lens import load_model
from speech_lens.data.manifest import read_manifest
from speech_lens.patching.result import write_csv
from speech_lens.patching.word_swap import splice_word, word_swap
from speech_lens.report.patching import plot_layer_position

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--manifest", default=str(HERE / "data" / "sample_manifest.jsonl"))
    ap.add_argument("--checkpoint")
    ap.add_argument("--family", default=None)
    ap.add_argument("--id", default="s1", help="clean utterance")
    ap.add_argument("--word", type=int, default=1, help="word index to swap (default 1: 'cat')")
    ap.add_argument("--donor", default="s4", help="utterance giving the replacement word")
    ap.add_argument("--donor-word", type=int, default=3, help="its word index (default 3: 'bird')")
    ap.add_argument("--component", default="resid_pre")
    ap.add_argument("--rule", default="last", choices=["last", "mean", "each"])
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            model = load_model(args.checkpoint, family=args.family)
        else:
            from speech_lens.testing.families import build_family

            path, kw = build_family("spiritlm", tmp)
            model = load_model(path, **kw)
            print("NOTE: tiny checkpoint with RANDOM weights: the numbers below are meaningless.\n")
        utts = {u.id: u for u in read_manifest(args.manifest, layout=model.layout)}
        for uid in (args.id, args.donor):
            if uid not in utts:
                raise SystemExit(f"no utterance {uid!r} in {args.manifest}")
        clean = utts[args.id]
        corrupt = splice_word(clean, args.word, utts[args.donor], args.donor_word)
        print(f"clean:     {clean.text}\ncorrupted: {corrupt.text}")
        args.out.mkdir(parents=True, exist_ok=True)
        rows = []
        for mode in ("denoise", "noise"):
            r = word_swap(
                model,
                clean,
                corrupt,
                args.word,
                mode=mode,
                component=args.component,
                rule=args.rule,
            )
            rows += r.to_table()
            w = next(i for i, lab in enumerate(r.positions) if "->" in lab)  # the swapped word
            print(
                f"\n{mode}: {r.metric}; unpatched target {r.baseline:.3f}, source run {r.source_value:.3f}"
            )
            for li, lab in enumerate(r.layer_labels):
                print(f"  layer {lab:>3}: patch swapped word -> {float(r.values[li, w]):.3f}")
            fig = plot_layer_position(r, title=f"word swap ({mode}): {r.metric}")
            fig.write_html(args.out / f"word_swap_{mode}.html", include_plotlyjs=True)
        write_csv(rows, args.out / "word_swap.csv")
        print(f"\nwrote {args.out}/word_swap_denoise.html, word_swap_noise.html, word_swap.csv")


if __name__ == "__main__":
    main()
