"""Speech tokenizers: audio -> frame-level units, behind one small Protocol and a registry.

A :class:`SpeechTokenizer` takes float32 mono audio at its ``expected_sample_rate`` and returns
:class:`FrameUnits`: one unit per frame (not deduplicated; dedup with run lengths happens in
``speech_lens.data`` so word alignment can use the full frame grid), the frame rate, and
optional prosody streams (SpiritLM Expressive pitch / style). ``family`` names the vocabulary
layout the units are meant for (a spec name such as ``spiritlm`` or ``sims``).

Implementations here are thin, lazily imported adapters to the real tokenizers:

* ``spiritlm`` / ``spiritlm-expressive``: Meta's ``spiritlm`` package (HuBERT 25 Hz + 500-unit
  linear quantizer; F0 VQ-VAE pitch at 12.5 Hz and w2v2 style at 1 Hz).
* ``sims`` / ``speechgpt`` / ``mhubert``: a transformers ``HubertModel`` (layer-11 features) plus
  a k-means codebook, as slamkit (SIMS: mHuBERT-25Hz, 500 units) and SpeechGPT (mHuBERT
  ``vp_en_es_fr_it3``, 50 Hz, 1000 units) do.
* ``organism``: the model organisms' own tokenizer, saved next to each organism checkpoint.

``get_speech_tokenizer(name_or_checkpoint)`` resolves a registered name, a ``module:attr``
factory, or a checkpoint directory (its family picks the tokenizer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from speech_lens.audio.decode import resample
from speech_lens.data.utterance import UnitStream


class SpeechTokenizerError(ValueError):
    """Audio a tokenizer cannot take, or a tokenizer that returned something malformed."""


class MissingTokenizerFiles(FileNotFoundError):
    """A real tokenizer's package or checkpoint files are not installed; the message lists them."""


@dataclass(frozen=True)
class FrameUnits:
    """Frame-level units (``units[i]`` covers ``[i / frame_rate, (i + 1) / frame_rate)``)."""

    units: np.ndarray  # int64 [frames]
    frame_rate: float
    streams: dict[str, UnitStream] = field(default_factory=dict)  # "pitch", "style"
    # A tokenizer with its own dedup (e.g. within words only) gives (units, run lengths) here.
    runs: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    # A word-synchronous tokenizer gives the word times it used, on its unit grid.
    words: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        u = np.asarray(self.units)
        if u.ndim != 1:
            raise SpeechTokenizerError(f"units must be 1-D (one per frame), got shape {u.shape}")
        if u.size and not np.issubdtype(u.dtype, np.integer) and not np.all(np.mod(u, 1) == 0):
            raise SpeechTokenizerError(f"units must be integers, got dtype {u.dtype}")
        u = u.astype(np.int64)
        if u.size and u.min() < 0:
            raise SpeechTokenizerError(f"negative unit {int(u.min())}")
        object.__setattr__(self, "units", u)
        r = self.frame_rate
        if isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r) or r <= 0:
            raise SpeechTokenizerError(f"frame_rate must be a positive number, got {r!r}")
        object.__setattr__(self, "frame_rate", float(r))
        if self.runs is not None:
            ru, rd = self.runs
            if len(ru) != len(rd) or sum(rd) != u.size or any(d < 1 for d in rd):
                raise SpeechTokenizerError(
                    f"runs: {len(ru)} units with {len(rd)} run lengths summing to {sum(rd)} "
                    f"for {u.size} frames"
                )
            if not np.array_equal(np.repeat(np.asarray(ru, dtype=np.int64), rd), u):
                raise SpeechTokenizerError("runs do not expand to the frame-level units")

    @property
    def n_frames(self) -> int:
        return int(self.units.shape[0])

    @property
    def duration(self) -> float:
        return self.n_frames / self.frame_rate


@runtime_checkable
class SpeechTokenizer(Protocol):
    """audio (float32 mono at ``expected_sample_rate``) -> :class:`FrameUnits`."""

    family: str  # the vocabulary layout (spec name) the units are meant for
    expected_sample_rate: int

    def __call__(self, audio: np.ndarray, sample_rate: int) -> FrameUnits: ...


def check_audio(audio: Any, sample_rate: int, expected: int, who: str) -> np.ndarray:
    """Refuse what a tokenizer cannot take: not 1-D float audio, wrong rate, empty, not finite."""
    a = np.asarray(audio)
    if a.ndim != 1:
        raise SpeechTokenizerError(
            f"{who} takes mono audio as a 1-D array, got shape {a.shape} (mix or pick a channel)"
        )
    if not np.issubdtype(a.dtype, np.floating):
        raise SpeechTokenizerError(
            f"{who} takes float audio in [-1, 1], got dtype {a.dtype} (divide int16 PCM by 32768)"
        )
    if int(sample_rate) != int(expected):
        raise SpeechTokenizerError(
            f"{who} expects {expected} Hz audio, got {sample_rate} Hz; resample first "
            f"(speech_lens.audio.load_audio(path, sample_rate={expected}) does)"
        )
    if a.size == 0:
        raise SpeechTokenizerError(f"{who}: empty audio")
    if not np.all(np.isfinite(a)):
        raise SpeechTokenizerError(f"{who}: audio holds NaN or infinite samples")
    return a.astype(np.float32, copy=False)


def tokenize_audio(tokenizer: SpeechTokenizer, audio: np.ndarray, sample_rate: int) -> FrameUnits:
    """Resample to the tokenizer's rate if needed, then tokenize."""

    want = int(tokenizer.expected_sample_rate)
    if int(sample_rate) != want:
        audio = resample(np.asarray(audio, dtype=np.float32), int(sample_rate), want)
    out = tokenizer(np.asarray(audio, dtype=np.float32), want)
    if not isinstance(out, FrameUnits):
        raise SpeechTokenizerError(
            f"tokenizer {type(tokenizer).__name__} returned {type(out).__name__}, not FrameUnits"
        )
    return out


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

Factory = Callable[..., SpeechTokenizer]
REGISTRY: dict[str, Factory] = {}

# Checkpoint family (spec name) -> tokenizer name. Organisms are found by their tokenizer file.
FAMILY_TOKENIZERS = {
    "spiritlm": "spiritlm",
    "spiritlm-expressive": "spiritlm-expressive",
    "speechgpt": "speechgpt",
    "sims": "sims",
}


def register_speech_tokenizer(
    name: str, factory: Factory | None = None, *, overwrite: bool = False
) -> Any:
    """Register ``factory(**kw) -> SpeechTokenizer`` under ``name`` (also usable as a decorator)."""

    def add(f: Factory) -> Factory:
        if name in REGISTRY and not overwrite and REGISTRY[name] is not f:
            raise ValueError(f"speech tokenizer {name!r} is already registered")
        REGISTRY[name] = f
        return f

    return add(factory) if factory is not None else add


def unregister_speech_tokenizer(name: str) -> None:
    REGISTRY.pop(name, None)


def available_speech_tokenizers() -> list[str]:
    return sorted(REGISTRY)


def missing_package_error(package: str, install: str, files: str) -> ImportError:
    return ImportError(
        f"this speech tokenizer needs the {package!r} package ({install}) and its checkpoint "
        f"files: {files}"
    )


def missing_files(who: str, root: Path, names: list[str], how: str) -> None:
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise MissingTokenizerFiles(
            f"{who}: checkpoint files missing under {root}: {', '.join(missing)}. {how}"
        )
