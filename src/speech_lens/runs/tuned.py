"""The tuned-lens runs: train and evaluate from CLI arguments, writing a lens folder."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from speech_lens.data.manifest import read_manifest
from speech_lens.data.utterance import Utterance
from speech_lens.lens.kl import lens_kl
from speech_lens.lens.rows import describe_rows, selected_rows
from speech_lens.lens.train import (
    TrainConfig,
    config_from_args,
    train_tuned_lens,
    write_lens_provenance,
)
from speech_lens.lens.train_data import (
    TrainError,
    encode_training_data,
    held_out_table,
    split_heldout,
)
from speech_lens.lens.tuned import LensError, TunedLens
from speech_lens.models.from_args import load_from_args
from speech_lens.models.load import SpeechLM

# --------------------------------------------------------------------------------------------
# Command line: ``speech-lens tuned-lens train|eval`` (the parser is in cli.py)
# --------------------------------------------------------------------------------------------


def cli_load(args: Any) -> tuple[SpeechLM, list[Utterance]]:

    model = load_from_args(args)
    reader = read_manifest(args.data, layout=model.layout)
    utts = list(reader)
    if reader.report.n_skipped:
        print(reader.report.summary(), file=sys.stderr)
    if not utts:
        raise TrainError(f"{args.data}: no usable utterances")
    return model, utts


SAVE_DTYPES = {"float32": None, "float16": torch.float16}


def chosen_rows(args: Any, model: SpeechLM) -> tuple[int, ...] | None:
    """Lens rows from ``--layer-stride`` / ``--layers`` (with the output row), None = all."""
    try:
        return selected_rows(
            model.n_layers + 1,
            stride=getattr(args, "layer_stride", None),
            layers=getattr(args, "layers", None),
        )
    except ValueError as e:
        raise TrainError(str(e)) from None


def cli_train(args: Any) -> int:

    try:
        model, utts = cli_load(args)
        rows = chosen_rows(args, model)
        train_u, held_u = split_heldout(utts, args.heldout)
        seeds = args.seed if args.seed is not None else TrainConfig.seed
        seqs, modes = encode_training_data(model, train_u, args.data_mode, seed=seeds)
        cfg = config_from_args(args)
        info = {
            "data": str(args.data),
            "n_utterances": len(train_u),
            "modes": modes,
            "heldout_fraction": args.heldout,
        }
        result = train_tuned_lens(
            model,
            seqs,
            cfg,
            out=args.out,
            resume=not args.no_resume,
            progress=not args.no_progress,
            extra_config=info,
            data=args.data,
            layers=rows,
            params_dtype=SAVE_DTYPES[getattr(args, "save_dtype", None) or "float32"],
        )
        print(
            f"saved tuned lens ({result.steps_done} steps, {result.tokens_seen} tokens, "
            f"translators of {describe_rows(rows, model.n_layers + 1)}) to {args.out}"
        )
        if held_u:
            heldout_kl(args, model, result.lens, held_u, rows, seed=seeds + 1)
    except (TrainError, LensError) as e:
        print(f"speech-lens: error: {e}", file=sys.stderr)
        return 2
    return 0


def heldout_kl(
    args: Any,
    model: SpeechLM,
    lens: TunedLens,
    held_u: Sequence[Utterance],
    rows: Sequence[int] | None,
    *,
    seed: int,
) -> None:
    """Held-out KL, logit vs tuned lens, at the rows trained; stored in the lens config."""
    held, _ = encode_training_data(model, held_u, args.data_mode, seed=seed)
    batch = args.batch_size or TrainConfig.batch_size
    show = not args.no_progress
    logit = lens_kl(model, None, held, batch_size=batch, progress=show, layers=rows)
    tuned = lens_kl(model, lens, held, batch_size=batch, progress=show, layers=rows)
    training = {**(lens.config.training or {}), "heldout_utterances": len(held_u)}
    training["heldout_layers"] = list(range(model.n_layers + 1) if rows is None else rows)
    training["heldout_kl_logit"] = [round(float(x), 6) for x in logit]
    training["heldout_kl_tuned"] = [round(float(x), 6) for x in tuned]
    dtype = SAVE_DTYPES[getattr(args, "save_dtype", None) or "float32"]
    lens.save(args.out, params_dtype=dtype, training=training)
    write_lens_provenance(model, lens, args.out, data=args.data)
    print(f"held-out KL(final ‖ lens), nats/token, {len(held_u)} utterances ({args.data_mode}):")
    print(held_out_table(logit, tuned, layers=rows))


def eval_rows(args: Any, model: SpeechLM, lens: TunedLens) -> tuple[int, ...] | None:
    """``--layer-stride`` / ``--layers`` if given, else the rows the lens trained (+ output)."""
    rows = chosen_rows(args, model)
    given = getattr(args, "layer_stride", None) is not None or getattr(args, "layers", None)
    if given or lens.config.trained_layers is None:
        return rows
    trained = (*lens.trained_layers, model.n_layers)
    return None if trained == tuple(range(model.n_layers + 1)) else trained


def cli_eval(args: Any) -> int:

    try:
        model, utts = cli_load(args)
        lens = TunedLens.load(args.lens, model)
        mode = args.data_mode or lens.config.data_mode or "mix"
        if args.heldout is not None:
            utts = split_heldout(utts, args.heldout)[1]
        rows = eval_rows(args, model, lens)
        seqs, _ = encode_training_data(model, utts, mode, seed=args.seed + 1)
        logit = lens_kl(model, None, seqs, batch_size=args.batch_size, layers=rows)
        tuned = lens_kl(model, lens, seqs, batch_size=args.batch_size, layers=rows)
    except (TrainError, LensError) as e:
        print(f"speech-lens: error: {e}", file=sys.stderr)
        return 2
    print(
        f"KL(final ‖ lens), nats/token, {len(utts)} utterances ({mode}), "
        f"{describe_rows(rows, model.n_layers + 1)}:"
    )
    print(held_out_table(logit, tuned, layers=rows))
    return 0
