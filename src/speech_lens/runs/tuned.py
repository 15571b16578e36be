"""The tuned-lens runs: train and evaluate from CLI arguments, writing a lens folder."""

from __future__ import annotations

import sys
from typing import Any

from speech_lens.data.manifest import read_manifest
from speech_lens.data.utterance import Utterance
from speech_lens.lens.kl import lens_kl
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


def cli_train(args: Any) -> int:

    try:
        model, utts = cli_load(args)
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
        )
        print(
            f"saved tuned lens ({result.steps_done} steps, {result.tokens_seen} tokens) to {args.out}"
        )
        if held_u:
            held, _ = encode_training_data(model, held_u, args.data_mode, seed=seeds + 1)
            logit = lens_kl(
                model, None, held, batch_size=cfg.batch_size, progress=not args.no_progress
            )
            tuned = lens_kl(
                model, result.lens, held, batch_size=cfg.batch_size, progress=not args.no_progress
            )
            training = {**(result.lens.config.training or {}), "heldout_utterances": len(held_u)}
            training["heldout_kl_logit"] = [round(float(x), 6) for x in logit]
            training["heldout_kl_tuned"] = [round(float(x), 6) for x in tuned]
            result.lens.save(args.out, training=training)
            write_lens_provenance(model, result.lens, args.out, data=args.data)
            print(
                f"held-out KL(final ‖ lens), nats/token, {len(held_u)} utterances ({args.data_mode}):"
            )
            print(held_out_table(logit, tuned))
    except (TrainError, LensError) as e:
        print(f"speech-lens: error: {e}", file=sys.stderr)
        return 2
    return 0


def cli_eval(args: Any) -> int:

    try:
        model, utts = cli_load(args)
        lens = TunedLens.load(args.lens, model)
        mode = args.data_mode or lens.config.data_mode or "mix"
        if args.heldout is not None:
            utts = split_heldout(utts, args.heldout)[1]
        seqs, _ = encode_training_data(model, utts, mode, seed=args.seed + 1)
        logit = lens_kl(model, None, seqs, batch_size=args.batch_size)
        tuned = lens_kl(model, lens, seqs, batch_size=args.batch_size)
    except (TrainError, LensError) as e:
        print(f"speech-lens: error: {e}", file=sys.stderr)
        return 2
    print(f"KL(final ‖ lens), nats/token, {len(utts)} utterances ({mode}):")
    print(held_out_table(logit, tuned))
    return 0
