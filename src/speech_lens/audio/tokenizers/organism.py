"""The unit tokenizer stored with a model organism checkpoint."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from speech_lens.audio.tokenizers.registry import (
    FrameUnits,
    MissingTokenizerFiles,
    SpeechTokenizerError,
    check_audio,
)
from speech_lens.data.utterance import Word
from speech_lens.models.spec import AdapterSpec

# --------------------------------------------------------------------------------------------
# Organisms
# --------------------------------------------------------------------------------------------

# File names an organism checkpoint may store its unit tokenizer under (first found wins).
ORGANISM_TOKENIZER_FILE = "unit_tokenizer.json"


def organism_tokenizer_path(checkpoint: Path) -> Path | None:
    """``unit_tokenizer.json`` in the organism checkpoint, or in its parent (``organisms/``, where
    all organisms built from one corpus share it) when the checkpoint is an organism."""
    if (checkpoint / ORGANISM_TOKENIZER_FILE).is_file():
        return checkpoint / ORGANISM_TOKENIZER_FILE
    shared = checkpoint.parent / ORGANISM_TOKENIZER_FILE
    if shared.is_file() and (checkpoint / "organism.json").is_file():
        return shared
    return None


class OrganismSpeechTokenizer:
    """The organisms' own tokenizer (``speech_lens.organisms.units.UnitTokenizer``: MFCC frames
    pooled in word-synchronous windows -> CMVN -> k-means), loaded from the checkpoint.

    It is word-synchronous (``needs_words``): units are cut inside each word's gap-extended span,
    deduplicated within a word only (its own ``runs``), and the word times come back on the
    unit grid (``FrameUnits.words``), exactly as the organism manifests were built.
    """

    needs_words = True

    def __init__(
        self, checkpoint: str | Path | None = None, *, path: str | Path | None = None
    ) -> None:
        if path is None:
            if checkpoint is None:
                raise ValueError("organism tokenizer: pass checkpoint= (directory) or path= (file)")
            ckpt = Path(checkpoint)
            path = organism_tokenizer_path(ckpt)
            if path is None:
                raise MissingTokenizerFiles(
                    f"organism checkpoint {ckpt} has no {ORGANISM_TOKENIZER_FILE} "
                    "(scripts/build_corpus.py units writes it next to the organisms)"
                )
        self.path = Path(path)
        units_mod = importlib.import_module("speech_lens.organisms.units")
        self.inner = units_mod.UnitTokenizer.load(self.path)
        self.family = "spiritlm-organism"
        if checkpoint is not None and (Path(checkpoint) / "speech_lens.toml").is_file():
            self.family = AdapterSpec.from_toml(Path(checkpoint) / "speech_lens.toml").name
        self.expected_sample_rate = int(self.inner.config.sample_rate)
        self.frame_rate = float(self.inner.config.rate)
        self.n_units = int(self.inner.k)

    def __call__(self, audio: np.ndarray, sample_rate: int, words: Any = None) -> FrameUnits:

        a = check_audio(audio, sample_rate, self.expected_sample_rate, "organism tokenizer")
        if not words:
            raise SpeechTokenizerError(
                "the organism tokenizer is word-synchronous: it needs the word timings of the audio"
            )
        spans = [(w.text, float(w.start), float(w.end)) for w in words]
        units, durs, wq = self.inner.encode(a, spans)
        frames = np.repeat(np.asarray(units, dtype=np.int64), np.asarray(durs, dtype=np.int64))
        return FrameUnits(
            frames,
            self.frame_rate,
            runs=(tuple(int(u) for u in units), tuple(int(d) for d in durs)),
            words=tuple(Word(w, float(s), float(e)) for w, s, e in wq),
        )
