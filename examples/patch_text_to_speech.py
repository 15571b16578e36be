"""Text -> speech activation patching: does the speech run's next-word prediction follow the text?

For every word w of each utterance, the residual stream (``--component``) of the *text* run at w's
token(s) is written into the *speech* run at w's units (``--rule``: last sub-token -> last unit,
or the mean of the text span -> every unit), one layer at a time. The metric is the log-prob of
the next word's text token at w's last unit. Curves: mean over words of the patched value per
layer, against the unpatched speech run and the text run itself.

    python examples/patch_text_to_speech.py --out runs/patch_t2s          # tiny random SpiritLM
    python examples/patch_text_to_speech.py --checkpoint PATH --manifest data.jsonl --out DIR

Without ``--checkpoint`` a tiny random SpiritLM-format checkpoint is built in a temporary
directory: it runs offline in seconds, and its curves are meaningless (random weights).
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from speech_lens import load_model
from speech_lens.data.manifest import read_manifest
from speech_lens.patching.cross_modal import cross_modal
from speech_lens.patching.pairs import mean_curve, stack_curves
from speech_lens.patching.result import write_csv
from speech_lens.report.patching import plot_layer_curves, plot_layer_position

HERE = Path(__file__).parent
DIRECTION = "text-to-speech"


def main(direction: str = DIRECTION, doc: str | None = __doc__) -> None:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output directory (HTML + CSV)")
    ap.add_argument("--manifest", default=str(HERE / "data" / "sample_manifest.jsonl"))
    ap.add_argument("--checkpoint", help="model directory (default: build a tiny SpiritLM)")
    ap.add_argument("--family", default=None, help="family name when --checkpoint is given")
    ap.add_argument("--component", default="resid_pre")
    ap.add_argument("--rule", default="last", choices=["last", "mean", "each"])
    ap.add_argument("--max-utterances", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            model = load_model(args.checkpoint, family=args.family)
        else:
            from speech_lens.testing.families import build_family

            path, kw = build_family("spiritlm", tmp)
            model = load_model(path, **kw)
            print("NOTE: tiny checkpoint with RANDOM weights: the curves below are meaningless;")
            print("      pass --checkpoint (e.g. a model organism) for real numbers.\n")
        reader = read_manifest(args.manifest, layout=model.layout)
        utts = list(itertools.islice(reader, args.max_utterances))
        results = []
        for u in utts:
            results += cross_modal(
                model, u, direction=direction, component=args.component, rule=args.rule
            )
        curve = mean_curve(results)
        print(
            f"{direction}, {args.component}, rule={args.rule}: {curve['n']} words in {len(utts)} utterances"
        )
        print(f"  unpatched target   mean next-word log-prob {curve['baseline']:.3f}")
        print(f"  source run itself  mean next-word log-prob {curve['source']:.3f}")
        for lab, m, se in zip(
            curve["layers"], curve["mean"].tolist(), curve["sem"].tolist(), strict=True
        ):
            print(f"  patch layer {lab:>3}: {m:.3f} ± {se:.3f}")

        args.out.mkdir(parents=True, exist_ok=True)
        write_csv([row for r in results for row in r.to_table()], args.out / f"{direction}.csv")
        fig = plot_layer_curves(
            {f"patched ({args.component}, rule={args.rule})": curve["mean"]},
            layers=curve["layers"],
            references={"unpatched target": curve["baseline"], "source run": curve["source"]},
            title=f"{direction}: next-word log-prob at the patched word (mean of {curve['n']} words)",
            yaxis="log P(next word, text token)",
        )
        fig.write_html(args.out / f"{direction}_curve.html", include_plotlyjs=True)
        first = [r for r in results if r.extra["utterance"] == utts[0].id]
        heat = plot_layer_position(stack_curves(first))
        heat.write_html(args.out / f"{direction}_{utts[0].id}_heatmap.html", include_plotlyjs=True)
        print(
            f"wrote {args.out}/{direction}.csv, {direction}_curve.html, {direction}_{utts[0].id}_heatmap.html"
        )


if __name__ == "__main__":
    main()
