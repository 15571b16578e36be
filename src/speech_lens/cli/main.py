"""The ``speech-lens`` command: one subcommand per analysis (argparse, no framework)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from speech_lens.cli.common import add_model_args
from speech_lens.cli.compare import add_compare
from speech_lens.cli.demo import add_demo
from speech_lens.cli.lens import add_lens
from speech_lens.cli.patch import add_patch
from speech_lens.cli.tokenize import add_tokenize
from speech_lens.cli.tuned import add_tuned_lens
from speech_lens.models.from_args import load_from_args
from speech_lens.models.spec import AdapterError
from speech_lens.testing.families import build_family


def _inspect(args: argparse.Namespace) -> int:

    path = args.checkpoint
    if path is None:  # the smallest possible main job: a tiny SpiritLM-format checkpoint built here
        path, _ = build_family("spiritlm", Path(tempfile.mkdtemp(prefix="speech-lens-")))
        print(f"no checkpoint given: built a tiny random SpiritLM-format checkpoint in {path}")
    model = load_from_args(args, path)
    info = model.describe()
    if args.json:
        info["partitions"] = [list(r) for r in model.layout.partition_table()]
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    print()
    rows = model.layout.partition_table()
    w0 = max(len(r[0]) for r in rows)
    print(f"{'partition':<{w0}}  {'count':>7}  ids")
    for name, count, ids in rows:
        print(f"{name:<{w0}}  {count:>7}  {ids}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speech-lens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="family, geometry and vocabulary partition of a checkpoint")
    add_model_args(p, required=False)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_inspect)

    add_tokenize(sub)
    add_tuned_lens(sub)
    add_patch(sub)
    add_lens(sub)
    add_demo(sub)
    add_compare(sub)
    # further subcommands register here (lens, tuned-lens, patch, demo, bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    args = build_parser().parse_args(argv)

    try:
        return int(args.func(args) or 0)
    except AdapterError as e:
        print(f"speech-lens: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
