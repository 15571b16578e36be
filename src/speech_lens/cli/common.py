"""Options shared by several commands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from speech_lens.cli import dryrun


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        p.add_argument("checkpoint", type=Path, help="checkpoint directory")
    else:
        p.add_argument("checkpoint", type=Path, nargs="?", help="checkpoint directory")
    p.add_argument("--family", help="family spec name (detected when omitted)")
    p.add_argument("--spec", type=Path, help="a user spec file (TOML) describing a new family")
    p.add_argument("--base-tokenizer", type=Path, help="base text tokenizer dir (SIMS stores none)")
    # one model over several devices (accelerate); parsed and checked in adapters.load_from_args
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="(float32)")
    p.add_argument("--device-map", help="auto | balanced | sequential | JSON module->device")
    p.add_argument("--max-memory", help='JSON device->size, e.g. {"0": "70GiB", "cpu": "100GiB"}')
    p.add_argument("--offload-folder", type=Path, help="where --device-map 'disk' weights go")


def add_dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would run, its memory and a time estimate from a short calibration",
    )


def run_dry_run(command: str, args: argparse.Namespace, *extra: Any) -> int:

    return dryrun.run(command, args, *extra)


def parse_batch_size(text: str) -> int | str:
    """``--batch-size``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive integer or 'auto'")
    return int(text)


def add_layer_selection(p: argparse.ArgumentParser) -> None:
    """``--layer-stride`` / ``--layers``: which lens rows a lens run reads (lens/rows.py)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--layer-stride",
        type=int,
        metavar="N",
        help="read lens rows 0, N, 2N, ... and always the output row (default 1: every row); "
        "rows not read are never unembedded",
    )
    g.add_argument(
        "--layers",
        metavar="ROWS",
        help="read these lens rows only: increasing, with the output row, e.g. 0,10,20-30 "
        "(0 = embeddings, n_layers = output)",
    )
