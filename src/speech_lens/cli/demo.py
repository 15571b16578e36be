"""`speech-lens demo`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from speech_lens.cli.common import add_dry_run, run_dry_run
from speech_lens.runs.demo import run_demo


def add_demo(sub: Any) -> None:
    def run(args: argparse.Namespace) -> int:

        if args.dry_run:
            return run_dry_run("demo", args)
        run_demo(
            args.out,
            organisms=args.organisms,
            limit=args.limit,
            patch_utterances=args.patch_utterances,
        )
        return 0

    p = sub.add_parser("demo", help="every analysis on the shipped model organisms -> report.html")
    p.add_argument("--out", type=Path, default=Path("demo_report"), help="output directory")
    p.add_argument("--organisms", type=Path, help="organisms directory (default: the repository's)")
    p.add_argument("--limit", type=int, default=150, help="held-out utterances to analyse (150)")
    p.add_argument("--patch-utterances", type=int, default=20, help="utterances for patching")
    add_dry_run(p)
    p.set_defaults(func=run)
