"""The lens run's settings: LensRunConfig (what a run records and resumes by), built from CLI
arguments, and how each utterance is encoded for it."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speech_lens.data.manifest import read_manifest
from speech_lens.data.prompts import encode_prompt
from speech_lens.data.scramble import scramble_words
from speech_lens.data.utterance import Utterance
from speech_lens.data.word_targets import (
    WORD_PIECE_RULE,
    span_settings,
)
from speech_lens.lens.numerics import readout_settings
from speech_lens.lens.prior import LEAVE_ONE_OUT, FittedPrior, manifest_prior
from speech_lens.lens.records import DEFAULT_MATCH, MATCH_RULES
from speech_lens.lens.rows import check_layers, selected_rows
from speech_lens.options import DEFAULT_ZERO_UNIT_WORDS, ZERO_UNIT_WORDS
from speech_lens.provenance import file_digests

MODES = ("speech", "interleaved")


SPAN_SEED = "crc32(utterance id) xor seed"  # each interleaved prompt's sampler seed (_prompt_seed)


@dataclass(frozen=True)
class LensRunConfig:
    checkpoint: str
    data: str
    family: str
    mode: str = "speech"
    k: int = 10
    match: str = DEFAULT_MATCH
    ks: tuple[int, ...] = (1, 5, 10)
    limit: int | None = None
    n_boot: int = 1000
    seed: int = 0
    lens: str = "logit"  # or "tuned:PATH" (a tuned lens in the tuned-lens format)
    # interleaved runs only (None otherwise): which words are spoken, with the sampler's
    # parameters as prompts.span_settings fills them in (lens_config: the family's sampler)
    span_sampler: str | None = None
    span_mean: float | None = None
    speech_fraction: float | None = None
    zero_unit_words: str = DEFAULT_ZERO_UNIT_WORDS  # skip | miss | error (lens.logit)
    # lens rows read (sorted, holding the output row: lens/rows.py); None = every row
    layers: tuple[int, ...] | None = None
    # the scrambled-word-order control (data/scramble.py): the seed, None for the data as it is
    scramble_words: int | None = None
    # a training manifest the frequency prior is fit on (lens/prior.py); None: leave one
    # utterance out. Applied when aggregating, like match: not in the resume key
    prior_manifest: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: one of {MODES}")
        if self.layers is not None:  # the model's row count is checked by the run (rows())
            rows = tuple(int(i) for i in self.layers)
            if not rows or rows[0] < 0 or list(rows) != sorted(set(rows)):
                raise ValueError(
                    f"--layers {rows}: strictly increasing lens rows >= 0, at least one "
                    "(layers=None reads every row)"
                )
            object.__setattr__(self, "layers", rows)
        if self.zero_unit_words not in ZERO_UNIT_WORDS:
            raise ValueError(
                f"--zero-unit-words {self.zero_unit_words!r}: one of {ZERO_UNIT_WORDS}"
            )
        if self.match not in MATCH_RULES:
            raise ValueError(f"match rule {self.match!r}: one of {MATCH_RULES}")
        spans = (self.span_sampler, self.span_mean, self.speech_fraction)
        if self.mode != "interleaved":
            if spans != (None, None, None):
                raise ValueError(
                    f"span_sampler and its parameters are for interleaved runs, "
                    f"not {self.mode!r} ones"
                )
            return
        if self.span_sampler is None:
            raise ValueError(
                "an interleaved run needs span_sampler (lens_config takes the family's own)"
            )
        # the sampler's defaults filled in, so settings and resume key hold the values used
        filled = span_settings(self.span_sampler, self.span_mean, self.speech_fraction)
        for name, v in filled.items():
            object.__setattr__(self, name, v)

    def span_settings(self) -> dict[str, Any]:
        """How interleaved prompts chose their spoken words (all None in speech mode)."""
        return {
            "span_sampler": self.span_sampler,
            "span_mean": self.span_mean,
            "speech_fraction": self.speech_fraction,
            "span_seed": SPAN_SEED if self.mode == "interleaved" else None,
        }

    def resume_key(self) -> dict[str, Any]:
        """Settings that change per-utterance records (match, ks, limit do not: they are
        applied when aggregating, so a finished run can be re-scored without recomputing).
        The zero-unit-word policy is here too (``error`` refuses what the others record), and
        the readout (float32, ties against the target): records of another readout differ."""
        return {
            "checkpoint": self.checkpoint,
            "data": self.data,
            "family": self.family,
            "mode": self.mode,
            "k": self.k,
            "seed": self.seed,
            "lens": self.lens,
            "word_pieces": WORD_PIECE_RULE,
            **self.span_settings(),
            "zero_unit_words": self.zero_unit_words,
            **readout_settings(),
            # only for a selection, so a full run resumes a partial run written before selections
            **({} if self.layers is None else {"layers": list(self.layers)}),
            # only when set: runs of the data as it is resume from partial files written before
            **({} if self.scramble_words is None else {"scramble_words": self.scramble_words}),
        }

    def rows(self, n_layers: int) -> tuple[int, ...]:
        """The lens rows read on a model of ``n_layers`` layers; refuses a selection that does
        not fit it (naming ``--layers``)."""
        if self.layers is None:
            return tuple(range(n_layers + 1))
        return check_layers(self.layers, n_layers + 1)


def lens_utterances(utterances: Iterable[Utterance], cfg: LensRunConfig) -> list[Utterance]:
    """The utterances as the run lenses them: with ``cfg.scramble_words`` their words shuffled
    (seeded per utterance), each word's units moving with it (``data.scramble``)."""
    if cfg.scramble_words is None:
        return list(utterances)
    return [scramble_words(u, cfg.scramble_words) for u in utterances]


def _prompt_seed(cfg: LensRunConfig, uid: str) -> int:
    # deterministic per utterance, so a resumed interleaved run samples the same spans (SPAN_SEED)
    return (zlib.crc32(uid.encode()) ^ cfg.seed) & 0x7FFFFFFF


def encode_for_lens(model: Any, utt: Any, cfg: LensRunConfig) -> Any:

    if cfg.mode == "interleaved":
        return encode_prompt(
            model,
            utt,
            mode="interleaved",
            seed=_prompt_seed(cfg, utt.id),
            span_sampler=cfg.span_sampler,  # type: ignore[arg-type]  # checked by the config
            span_mean=cfg.span_mean,
            speech_fraction=cfg.speech_fraction,
        )
    return encode_prompt(model, utt, mode="speech")


def lens_config(args: Any, model: Any) -> LensRunConfig:
    """The run settings of ``speech-lens lens`` (and of the torchrun lens) from its arguments."""
    return LensRunConfig(
        checkpoint=str(Path(args.checkpoint).resolve()),
        data=str(Path(args.data).resolve()),
        family=model.spec.name,
        mode=args.mode,
        k=int(args.k),
        match=args.match,
        ks=tuple(sorted({1, 5, int(args.k)})),
        limit=args.limit,
        n_boot=args.n_boot,
        seed=args.seed,
        lens=getattr(args, "lens", "logit"),
        span_sampler=_span_sampler(args, model),
        zero_unit_words=getattr(args, "zero_unit_words", DEFAULT_ZERO_UNIT_WORDS),
        layers=selected_rows(
            model.n_layers + 1,
            stride=getattr(args, "layer_stride", None),
            layers=getattr(args, "layers", None),
        ),
        scramble_words=getattr(args, "scramble_words", None),
        prior_manifest=_resolved(getattr(args, "prior_manifest", None)),
    )


def _resolved(path: Any) -> str | None:
    return None if path is None else str(Path(path).resolve())


def _span_sampler(args: Any, model: Any) -> str | None:
    """``--span-sampler`` of an interleaved run, else the family's own (its spec's)."""
    chosen = getattr(args, "span_sampler", None)
    if args.mode != "interleaved":
        if chosen is not None:
            raise ValueError(f"--span-sampler {chosen}: only with --mode interleaved")
        return None
    return str(chosen or model.spec.prompt.span_sampler)


def training_prior(model: Any, cfg: LensRunConfig) -> FittedPrior | None:
    """The word counts of ``--prior-manifest`` the frequency prior is fit on (None: the prior
    leaves each utterance out of its own list)."""
    if cfg.prior_manifest is None:
        return None
    utts = read_manifest(cfg.prior_manifest, layout=model.layout)
    return manifest_prior(model, utts, source=cfg.prior_manifest)


def prior_setting(cfg: LensRunConfig) -> str:
    """What the run's frequency prior is fit on, as compared across runs: the training
    manifest's content (its sha256, not its path) or the leave-one-out rule."""
    if cfg.prior_manifest is None:
        return LEAVE_ONE_OUT
    return "manifest sha256:" + file_digests({"prior": Path(cfg.prior_manifest)})["prior"]
