"""`speech-lens compare`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from speech_lens.runs.compare import CompareError, compare_runs


def cli_compare(args: Any) -> int:
    """``speech-lens compare RUN_DIR... --out DIR [--allow FIELD[,FIELD]]``."""

    allow = [a for group in args.allow or [] for a in group.split(",")]
    try:
        cmp = compare_runs(args.runs, allow=allow, out=Path(args.out))
    except CompareError as e:
        print(f"speech-lens compare: error: {e}", file=sys.stderr)
        return 2
    note = f"; allowed differences: {', '.join(cmp.allowed)}" if cmp.allowed else ""
    print(f"compared {len(cmp.runs)} runs{note}; wrote {Path(args.out) / 'compare.html'}")
    return 0


def add_compare(sub: Any) -> None:
    def go(args: argparse.Namespace) -> int:

        return cli_compare(args)

    p = sub.add_parser(
        "compare", help="lens runs of several models on one relative-depth axis (same settings)"
    )
    p.add_argument("runs", nargs="+", type=Path, help="output directories of `speech-lens lens`")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--allow",
        action="append",
        metavar="FIELD[,FIELD]",
        help="setting differences that are intended (e.g. k, lens, versions, versions.torch)",
    )
    p.set_defaults(func=go)
