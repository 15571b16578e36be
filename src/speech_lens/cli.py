"""The ``speech-lens`` command: one subcommand per analysis (argparse, no framework)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def _inspect(args: argparse.Namespace) -> int:
    from speech_lens.adapters import load_from_args

    path = args.checkpoint
    if path is None:  # the smallest possible main job: a tiny SpiritLM-format checkpoint built here
        from speech_lens.testing import build_family

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


def _tokenize(args: argparse.Namespace) -> int:
    """Audio (file, folder, manifest or table) -> the checkpoint's speech units -> JSONL manifest."""
    from speech_lens.align import AlignmentCache, AlignmentError, get_aligner
    from speech_lens.audio import AudioError, Columns, open_audio_dataset
    from speech_lens.data import DataError
    from speech_lens.speech_tokenizers import (
        SpeechTokenizerError,
        check_compatible,
        checkpoint_spec,
        get_speech_tokenizer,
        tokenize_dataset,
    )

    spec = checkpoint_spec(args.model, family=args.family, spec=args.spec)
    tk_kw = json.loads(args.tokenizer_args) if args.tokenizer_args else {}
    try:
        tok = get_speech_tokenizer(args.tokenizer or args.model, **tk_kw)
    except (ImportError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"speech-lens: error: speech tokenizer: {e}", file=sys.stderr)
        return 2
    try:
        check_compatible(tok, spec, allow_family_mismatch=args.allow_family_mismatch)
        cols = Columns.parse(args.columns) if args.columns else None
        data = open_audio_dataset(args.input, columns=cols, kind=args.kind, text=args.text)
        aligner = get_aligner(args.align) if args.align != "none" else None
        summary = tokenize_dataset(
            data,
            tok,
            args.out,
            spec=spec,
            aligner=aligner,
            align_cache=AlignmentCache(args.align_cache),
            skip_errors=args.skip_errors,
            limit=args.limit,
            progress=not args.no_progress,
        )
    except (AudioError, AlignmentError, SpeechTokenizerError, DataError) as e:
        print(f"speech-lens: error: {e}", file=sys.stderr)
        return 2
    print(summary.text())
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary.as_dict(), indent=2))
    return 1 if summary.n_failed else 0


def _add_tokenize(sub: Any) -> None:
    p = sub.add_parser("tokenize", help="audio -> speech units + word timings -> JSONL manifest")
    p.add_argument(
        "input", help="audio file, folder, JSONL/CSV manifest, Parquet file or HF dataset dir"
    )
    p.add_argument(
        "--model", required=True, type=Path, help="checkpoint directory (picks layout + tokenizer)"
    )
    p.add_argument(
        "--out", required=True, type=Path, help="output JSONL manifest (resumed if present)"
    )
    p.add_argument(
        "--tokenizer", help="speech tokenizer name or module:factory (default: the checkpoint's)"
    )
    p.add_argument(
        "--tokenizer-args",
        help='JSON keyword arguments for the tokenizer, e.g. {"checkpoint_dir": "..."}',
    )
    p.add_argument("--family", help="family spec name (detected when omitted)")
    p.add_argument("--spec", type=Path, help="a user spec file (TOML)")
    p.add_argument(
        "--kind", default="auto", choices=["auto", "file", "folder", "manifest", "table"]
    )
    p.add_argument("--text", help="transcript of a single audio file INPUT (else its .txt/.lab)")
    p.add_argument(
        "--columns",
        help="column map, e.g. 'id=uid,text=prompt,audio=a1|a2,words=w1|w2,meta=correct'; "
        "a preset first: 'csfa' (Common-Sense Facts Audio) or 'csfa,text=question'",
    )
    p.add_argument(
        "--align",
        default="none",
        choices=["none", "pocketsphinx"],
        help="aligner for records without word timings",
    )
    p.add_argument(
        "--align-cache", type=Path, help="alignment cache dir (default $SPEECH_LENS_CACHE/align)"
    )
    p.add_argument(
        "--skip-errors", action="store_true", help="skip bad records (listed in the summary)"
    )
    p.add_argument("--allow-family-mismatch", action="store_true")
    p.add_argument("--limit", type=int, help="process at most N records")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--summary-json", type=Path, help="also write the summary as JSON")
    p.set_defaults(func=_tokenize)


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
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


def _add_dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would run, its memory and a time estimate from a short calibration",
    )


def _dry_run(command: str, args: argparse.Namespace, *extra: Any) -> int:
    from speech_lens import dryrun

    return dryrun.run(command, args, *extra)


def _add_tuned_lens(sub: Any) -> None:
    """``tuned-lens train|eval``; defaults (None here) come from ``tuned_train.TrainConfig``."""

    def run(name: str) -> Any:
        def go(args: argparse.Namespace) -> int:
            from speech_lens import tuned_train

            if getattr(args, "dry_run", False):
                return _dry_run("tuned-lens train", args)
            return int(getattr(tuned_train, name)(args))

        return go

    modes = ("text", "speech", "interleaved", "mix")
    p = sub.add_parser("tuned-lens", help="train / evaluate a tuned lens (tuned-lens file format)")
    tsub = p.add_subparsers(dest="tuned_command", required=True)
    t = tsub.add_parser("train", help="train a tuned lens on a JSONL manifest of utterances")
    _add_model_args(t)
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
    t.add_argument("--heldout", type=float, default=0.1, help="held-out fraction (by id hash)")
    t.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --out")
    t.add_argument("--no-progress", action="store_true")
    _add_dry_run(t)
    t.set_defaults(func=run("cli_train"))
    e = tsub.add_parser("eval", help="per-layer KL to the final distribution: logit vs tuned")
    _add_model_args(e)
    e.add_argument("data", type=Path, help="JSONL manifest of utterances")
    e.add_argument("--lens", type=Path, required=True, help="tuned lens directory")
    e.add_argument("--data-mode", choices=modes, help="default: the lens's training mode")
    e.add_argument("--heldout", type=float, help="evaluate only this held-out fraction")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=8)
    e.set_defaults(func=run("cli_eval"))


def _add_patch(sub: Any) -> None:
    """``patch``: a worked activation-patching experiment -> CSV table + HTML figures."""

    def go(args: argparse.Namespace) -> int:
        import itertools

        from speech_lens.adapters import load_from_args
        from speech_lens.data import read_manifest
        from speech_lens.patching import PatchingError, run_experiment

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
            return _dry_run("patch", args, options)
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

    # literal choices: importing speech_lens.patching here would load torch for every command
    components = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z")
    experiments = ("text-to-speech", "speech-to-text", "word-swap")
    p = sub.add_parser("patch", help="activation patching between speech and text positions")
    _add_model_args(p)
    p.add_argument("data", type=Path, help="JSONL manifest of utterances (units + word timings)")
    p.add_argument("--out", type=Path, required=True, help="output dir (CSV table + HTML figures)")
    p.add_argument("--experiment", choices=experiments, default="text-to-speech")
    p.add_argument("--component", choices=components, default="resid_pre")
    p.add_argument("--rule", choices=("last", "mean", "each"), default="last", help="position rule")
    p.add_argument("--layers", help="e.g. '0,1,2' or '0-3,4-7' (ranges patched together); all")
    p.add_argument("--word", type=int, default=1, help="word index to swap (word-swap)")
    p.add_argument(
        "--read-layer", type=int, help="read the next word with the logit lens at this row"
    )
    p.add_argument("--max-utterances", type=int, default=50)
    p.add_argument(
        "--batch-size",
        type=_batch_size,
        default=1,
        help="utterances and patched runs per forward pass, or 'auto' (from memory)",
    )
    p.add_argument(
        "--memory-budget", type=float, help="GiB for --batch-size auto (default: free memory)"
    )
    p.add_argument("--padding-side", choices=("right", "left"), default="right")
    _add_dry_run(p)
    p.set_defaults(func=go)


def _batch_size(text: str) -> int | str:
    """``--batch-size``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive integer or 'auto'")
    return int(text)


def _add_lens(sub: Any) -> None:
    """``lens``: the word-level logit lens over a data set (``run_lens.cli_lens``)."""

    def go(args: argparse.Namespace) -> int:
        from speech_lens.run_lens import cli_lens

        if args.dry_run:
            return _dry_run("lens", args)
        return cli_lens(args)

    p = sub.add_parser("lens", help="logit lens over a data set -> report.html, metrics, CSVs")
    _add_model_args(p)
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
    p.add_argument(
        "--zero-unit-words",
        choices=("skip", "miss", "error"),
        default="skip",
        help="spoken words with no unit position: leave out of Recall@k and count them (skip), "
        "score them as misses (miss), or stop with an error naming the word (error)",
    )
    _add_dry_run(p)
    p.set_defaults(func=go)


def _add_demo(sub: Any) -> None:
    def run(args: argparse.Namespace) -> int:
        from speech_lens.demo import run_demo

        if args.dry_run:
            return _dry_run("demo", args)
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
    _add_dry_run(p)
    p.set_defaults(func=run)


def _add_compare(sub: Any) -> None:
    def go(args: argparse.Namespace) -> int:
        from speech_lens.compare import cli_compare

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speech-lens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="family, geometry and vocabulary partition of a checkpoint")
    _add_model_args(p, required=False)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_inspect)

    _add_tokenize(sub)
    _add_tuned_lens(sub)
    _add_patch(sub)
    _add_lens(sub)
    _add_demo(sub)
    _add_compare(sub)
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
