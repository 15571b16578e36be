"""`speech-lens lens`: run the lens from CLI arguments."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from speech_lens.cli.common import add_dry_run, add_layer_selection, add_model_args, run_dry_run
from speech_lens.data.manifest import read_manifest
from speech_lens.models.from_args import load_from_args
from speech_lens.runs.lens import RunError, parse_batch_size, peak_layer, run_dataset
from speech_lens.runs.lens_settings import lens_config


def cli_lens(args: Any) -> int:
    """``speech-lens lens CHECKPOINT DATA --out DIR``."""

    model = load_from_args(args)
    try:
        cfg = lens_config(args, model)
        reader = read_manifest(args.data, layout=model.layout)
        utts = list(reader)
        m = run_dataset(
            model,
            utts,
            args.out,
            cfg,
            restart=args.restart,
            progress=not args.no_progress,
            batch_size=parse_batch_size(getattr(args, "batch_size", 1)),
            memory_budget_gb=getattr(args, "memory_budget", None),
            padding_side=getattr(args, "padding_side", "right"),
        )
    except (ValueError, RunError, FileNotFoundError) as e:
        print(f"speech-lens lens: error: {e}", file=sys.stderr)
        return 2
    if reader.report.n_skipped:
        print(reader.report.summary(), file=sys.stderr)
    k = int(args.k)
    best, i = peak_layer(m, k)
    print(
        f"{m.n_utterances} utterances, {m.n_words} words; current-word Recall@{k} "
        f"(match {m.match}) peaks at layer {best}: {m.recall_current[k].mean[i]:.3f}; "
        f"wrote {Path(args.out) / 'report.html'}"
    )
    return 0


def add_lens(sub: Any) -> None:
    """``lens``: the word-level logit lens over a data set (``run_lens.cli_lens``)."""

    def go(args: argparse.Namespace) -> int:

        if args.dry_run:
            return run_dry_run("lens", args)
        return cli_lens(args)

    p = sub.add_parser("lens", help="logit lens over a data set -> report.html, metrics, CSVs")
    add_model_args(p)
    p.add_argument("data", type=Path, help="JSONL manifest of utterances (units + word timings)")
    p.add_argument("--out", type=Path, required=True, help="output dir (resumable)")
    p.add_argument("--k", type=int, default=10, help="Recall@k headline k (1 and 5 come too)")
    p.add_argument("--match", default="first", help="first | first-spaced | first-bare | any")
    p.add_argument("--mode", choices=("speech", "interleaved"), default="speech")
    p.add_argument(
        "--span-sampler",
        help="poisson | spiritlm | alternate: which words an interleaved prompt speaks "
        "(default: the family's own, from its spec)",
    )
    p.add_argument("--lens", default="logit", help="logit | tuned:PATH (a tuned-lens directory)")
    p.add_argument("--limit", type=int, help="first N utterances only")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws for the CIs")
    p.add_argument("--seed", type=int, default=0, help="bootstrap and span-sampling seed")
    p.add_argument("--restart", action="store_true", help="discard a partial run in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--batch-size", default="1", help="utterances per forward pass, or 'auto' (from memory)"
    )
    p.add_argument(
        "--memory-budget", type=float, help="GiB for --batch-size auto (default: free memory)"
    )
    p.add_argument("--padding-side", choices=("right", "left"), default="right")
    add_layer_selection(p)
    p.add_argument(
        "--zero-unit-words",
        choices=("skip", "miss", "error"),
        default="skip",
        help="spoken words with no unit position: leave out of Recall@k and count them (skip), "
        "score them as misses (miss), or stop with an error naming the word (error)",
    )
    p.add_argument(
        "--scramble-words",
        type=int,
        metavar="SEED",
        help="control run: shuffle each utterance's words (seeded), each word's units moving "
        "with it; next-word Recall@k should fall to its frequency prior, transcription not",
    )
    p.add_argument(
        "--prior-manifest",
        type=Path,
        metavar="TRAIN.jsonl",
        help="fit the frequency prior on this (training) manifest's words instead of leaving "
        "each utterance out of its own",
    )
    add_dry_run(p)
    p.set_defaults(func=go)
