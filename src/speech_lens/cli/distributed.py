"""The torchrun entry point: `python -m speech_lens.distributed` parses its options here."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch.distributed as dist

from speech_lens.cli import dryrun
from speech_lens.cli.common import add_layer_selection
from speech_lens.data.manifest import read_manifest
from speech_lens.data.utterance import DataError
from speech_lens.guards import NumericError
from speech_lens.lens.metrics import DatasetMetrics
from speech_lens.lens.train import config_from_args
from speech_lens.lens.train_data import TrainError, encode_training_data
from speech_lens.models.from_args import load_from_args
from speech_lens.models.load import DTYPES
from speech_lens.models.spec import AdapterError
from speech_lens.options import SPAN_SAMPLERS
from speech_lens.runs.distributed import (
    DistContext,
    init_distributed,
    merge_shards,
    run_distributed,
    train_tuned_lens_distributed,
)
from speech_lens.runs.lens import RunError
from speech_lens.runs.lens_settings import lens_config
from speech_lens.runs.tuned import chosen_rows

# ------------------------------------------------------------------------------------------------
# command line (torchrun -m speech_lens.distributed lens ...)
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m speech_lens.distributed",
        description="Sharded lens runs under torchrun; 'merge' combines finished shards.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("lens", "merge", "tuned-lens"):
        s = sub.add_parser(name)
        s.add_argument("checkpoint", type=Path)
        s.add_argument("data", type=Path, help="JSONL manifest of utterances")
        s.add_argument("--out", type=Path, required=True)
        s.add_argument("--family")
        s.add_argument("--spec", type=Path)
        s.add_argument("--base-tokenizer", type=Path)
        s.add_argument("--mode", default="speech", choices=["speech", "interleaved"])
        s.add_argument("--span-sampler", choices=SPAN_SAMPLERS, help="default: the family's")
        s.add_argument("--k", type=int, default=10)
        s.add_argument("--match", default="first")
        s.add_argument("--limit", type=int)
        s.add_argument("--n-boot", type=int, default=1000)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
        s.add_argument("--no-progress", action="store_true")
        if name != "merge":
            s.add_argument("--backend", choices=["gloo", "nccl"], help="default: nccl on GPU")
        if name != "merge":
            s.add_argument(
                "--dry-run",
                action="store_true",
                help="print one rank's plan, memory and calibrated time, then exit",
            )
            s.add_argument(
                "--world",
                type=int,
                default=int(os.environ.get("WORLD_SIZE", "1")),
                help="ranks to plan for with --dry-run (default: $WORLD_SIZE or 1)",
            )
        if name != "tuned-lens":
            s.add_argument(
                "--zero-unit-words",
                default="skip",
                choices=["skip", "miss", "error"],
                help="spoken words with no unit position (as speech-lens lens)",
            )
        add_layer_selection(s)  # tuned-lens: the translators trained (rows below the output)
        if name != "tuned-lens":
            s.add_argument(
                "--scramble-words",
                type=int,
                metavar="SEED",
                help="the scrambled-word-order control (as speech-lens lens)",
            )
            s.add_argument(
                "--prior-manifest",
                type=Path,
                help="fit the frequency prior on this manifest (as speech-lens lens)",
            )
        if name == "lens":
            s.add_argument("--restart", action="store_true", help="discard finished shards")
            s.add_argument("--no-guard", action="store_true", help="skip the NaN/inf checks")
        if name == "tuned-lens":  # defaults: tuned_train.TrainConfig
            s.add_argument(
                "--data-mode", default="text", choices=["text", "speech", "interleaved", "mix"]
            )
            s.add_argument("--steps", type=int)
            s.add_argument("--tokens-per-step", type=int)
            s.add_argument("--batch-size", type=int)
            s.add_argument("--max-seq-len", type=int)
            s.add_argument("--checkpoint-every", type=int)
            s.add_argument("--no-resume", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    if getattr(args, "dry_run", False):
        return dryrun.run("distributed", args)
    ctx = init_distributed(args.backend) if args.command != "merge" else DistContext()
    if args.command == "tuned-lens":
        return _cli_tuned(args, ctx)
    try:
        model = load_from_args(args, device=ctx.device, dtype=DTYPES[args.dtype])
        cfg = lens_config(args, model)
        utts = list(read_manifest(args.data, layout=model.layout))
        if args.command == "merge":
            m: DatasetMetrics | None = merge_shards(model, utts, args.out, cfg)
        else:
            m = run_distributed(
                model,
                utts,
                args.out,
                cfg,
                ctx,
                restart=args.restart,
                progress=not args.no_progress,
                guard=not args.no_guard,
            )
    except (RunError, NumericError, AdapterError, DataError, ValueError, FileNotFoundError) as e:
        print(f"speech-lens {args.command} (rank {ctx.rank}): error: {e}", file=sys.stderr)
        return 2
    finally:
        if ctx.backend is not None and dist.is_initialized():
            dist.destroy_process_group()
    if m is not None:
        print(
            f"{m.n_utterances} utterances, {m.n_words} words"
            + (f" over {ctx.world} rank(s)" if args.command == "lens" else " (merged shards)")
            + "; "
            f"wrote {args.out / 'metrics.json'} and {args.out / 'report.html'}"
        )
    return 0


def _cli_tuned(args: argparse.Namespace, ctx: DistContext) -> int:

    try:
        model = load_from_args(args, device=ctx.device, dtype=DTYPES[args.dtype])
        utts = list(read_manifest(args.data, layout=model.layout))
        if args.limit is not None:
            utts = utts[: args.limit]
        seqs, _ = encode_training_data(model, utts, args.data_mode, seed=args.seed)
        cfg = config_from_args(args)
        res = train_tuned_lens_distributed(
            model,
            seqs,
            cfg,
            ctx,
            out=args.out,
            resume=not args.no_resume,
            progress=not args.no_progress,
            data=args.data,
            layers=chosen_rows(args, model),
        )
    except (TrainError, AdapterError, DataError, ValueError, FileNotFoundError) as e:
        print(f"speech-lens tuned-lens (rank {ctx.rank}): error: {e}", file=sys.stderr)
        return 2
    finally:
        if ctx.backend is not None and dist.is_initialized():
            dist.destroy_process_group()
    if ctx.rank == 0:
        print(f"saved tuned lens ({res.steps_done} steps, {res.tokens_seen} tokens) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
