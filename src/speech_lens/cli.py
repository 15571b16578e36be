"""The ``speech-lens`` command: one subcommand per analysis (argparse, no framework)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def _inspect(args: argparse.Namespace) -> int:
    from speech_lens.adapters import load_model

    path = args.checkpoint
    if path is None:  # the smallest possible main job: a tiny SpiritLM-format checkpoint built here
        from speech_lens.testing import build_family

        path, _ = build_family("spiritlm", Path(tempfile.mkdtemp(prefix="speech-lens-")))
        print(f"no checkpoint given: built a tiny random SpiritLM-format checkpoint in {path}")
    model = load_model(path, family=args.family, spec=args.spec, base_tokenizer=args.base_tokenizer)
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


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        p.add_argument("checkpoint", type=Path, help="checkpoint directory")
    else:
        p.add_argument("checkpoint", type=Path, nargs="?", help="checkpoint directory")
    p.add_argument("--family", help="family spec name (detected when omitted)")
    p.add_argument("--spec", type=Path, help="a user spec file (TOML) describing a new family")
    p.add_argument("--base-tokenizer", type=Path, help="base text tokenizer dir (SIMS stores none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speech-lens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="family, geometry and vocabulary partition of a checkpoint")
    _add_model_args(p, required=False)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_inspect)

    # further subcommands register here (lens, tuned-lens, patch, demo, bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    args = build_parser().parse_args(argv)
    from speech_lens.adapters import AdapterError

    try:
        return int(args.func(args) or 0)
    except AdapterError as e:
        print(f"speech-lens: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
