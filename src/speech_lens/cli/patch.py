"""`speech-lens patch`."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from speech_lens.cli.common import add_dry_run, add_model_args, parse_batch_size, run_dry_run
from speech_lens.data.manifest import read_manifest
from speech_lens.models.from_args import load_from_args
from speech_lens.patching.hooks import COMPONENTS
from speech_lens.patching.positions import RULES, PatchingError
from speech_lens.runs.experiments import EXPERIMENTS
from speech_lens.runs.patch import run_experiment


def add_patch(sub: Any) -> None:
    """``patch``: a worked activation-patching experiment -> CSV table + HTML figures."""

    def go(args: argparse.Namespace) -> int:

        layers = None
        if args.layers:  # "0,2,4-7" -> single layers; "4-7" patches layers 4..7 together
            layers = []
            for part in args.layers.split(","):
                a, _, b = part.partition("-")
                layers.append(int(a) if not b else tuple(range(int(a), int(b) + 1)))
        # run_experiment's options, shared with the dry run so it times the same work
        options = dict(
            experiment=args.experiment,
            component=args.component,
            rule=args.rule,
            layers=layers,
            word=args.word,
            read_layer=args.read_layer,
            batch_size=args.batch_size,
            memory_budget_gb=args.memory_budget,
            padding_side=args.padding_side,
        )
        if args.dry_run:
            return run_dry_run("patch", args, options)
        model = load_from_args(args)
        reader = read_manifest(args.data, layout=model.layout)
        utts = list(itertools.islice(reader, args.max_utterances))
        try:
            summary = run_experiment(model, utts, args.out, **options, data=args.data)
        except (PatchingError, ValueError) as e:  # ValueError: a memory budget that cannot fit
            print(f"speech-lens patch: error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(summary, indent=2))
        return 0

    components = tuple(COMPONENTS)
    experiments = tuple(EXPERIMENTS)  # the registry, read when the parser is built
    p = sub.add_parser("patch", help="activation patching between speech and text positions")
    add_model_args(p)
    p.add_argument("data", type=Path, help="JSONL manifest of utterances (units + word timings)")
    p.add_argument("--out", type=Path, required=True, help="output dir (CSV table + HTML figures)")
    p.add_argument("--experiment", choices=experiments, default="text-to-speech")
    p.add_argument("--component", choices=components, default="resid_pre")
    p.add_argument("--rule", choices=RULES, default="last", help="position rule")
    p.add_argument("--layers", help="e.g. '0,1,2' or '0-3,4-7' (ranges patched together); all")
    p.add_argument("--word", type=int, default=1, help="word index to swap (word-swap)")
    p.add_argument(
        "--read-layer", type=int, help="read the next word with the logit lens at this row"
    )
    p.add_argument("--max-utterances", type=int, default=50)
    p.add_argument(
        "--batch-size",
        type=parse_batch_size,
        default=1,
        help="utterances and patched runs per forward pass, or 'auto' (from memory)",
    )
    p.add_argument(
        "--memory-budget", type=float, help="GiB for --batch-size auto (default: free memory)"
    )
    p.add_argument("--padding-side", choices=("right", "left"), default="right")
    add_dry_run(p)
    p.set_defaults(func=go)
