"""`speech-lens tuned-lens train|eval`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from speech_lens.cli.common import add_dry_run, add_layer_selection, add_model_args, run_dry_run
from speech_lens.runs import tuned as tuned_runs


def add_tuned_lens(sub: Any) -> None:
    """``tuned-lens train|eval``; defaults (None here) come from ``tuned_train.TrainConfig``."""

    def run(name: str) -> Any:
        def go(args: argparse.Namespace) -> int:

            if getattr(args, "dry_run", False):
                return run_dry_run("tuned-lens train", args)
            return int(getattr(tuned_runs, name)(args))

        return go

    modes = ("text", "speech", "interleaved", "mix")
    p = sub.add_parser("tuned-lens", help="train / evaluate a tuned lens (tuned-lens file format)")
    tsub = p.add_subparsers(dest="tuned_command", required=True)
    t = tsub.add_parser("train", help="train a tuned lens on a JSONL manifest of utterances")
    add_model_args(t)
    t.add_argument("data", type=Path, help="JSONL manifest of utterances (units + word timings)")
    t.add_argument("--out", type=Path, required=True, help="lens dir (config.json + params.pt)")
    t.add_argument("--data-mode", choices=modes, default="mix", help="prompt format to train on")
    for flag, typ, what in [
        ("--steps", int, "optimizer steps (250)"),
        ("--tokens-per-step", int, "token budget per step (65536)"),
        ("--batch-size", int, "sequences per forward pass (8)"),
        ("--max-seq-len", int, "longer sequences are split (2048)"),
        ("--lr-scale", float, "lr = lr_scale * (1 - momentum) (1.0)"),
        ("--momentum", float, "Nesterov momentum (0.9)"),
        ("--weight-decay", float, "(1e-3)"),
        ("--warmup-steps", int, "linear warm-up steps (0)"),
        ("--chunk-tokens", int, "positions unembedded at once (512)"),
        ("--seed", int, "data order and mode sampling (0)"),
        ("--checkpoint-every", int, "steps between checkpoints in --out (50)"),
    ]:
        t.add_argument(flag, type=typ, help=what)
    add_layer_selection(t)  # the output row has no translator: rows below it train
    t.add_argument(
        "--save-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="dtype of the saved translators (float16: half the bytes; tuned-lens loads it)",
    )
    t.add_argument("--heldout", type=float, default=0.1, help="held-out fraction (by id hash)")
    t.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --out")
    t.add_argument("--no-progress", action="store_true")
    add_dry_run(t)
    t.set_defaults(func=run("cli_train"))
    e = tsub.add_parser("eval", help="per-layer KL to the final distribution: logit vs tuned")
    add_model_args(e)
    e.add_argument("data", type=Path, help="JSONL manifest of utterances")
    e.add_argument("--lens", type=Path, required=True, help="tuned lens directory")
    e.add_argument("--data-mode", choices=modes, help="default: the lens's training mode")
    e.add_argument("--heldout", type=float, help="evaluate only this held-out fraction")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=8)
    add_layer_selection(e)  # default: the rows the lens trained
    e.set_defaults(func=run("cli_eval"))
