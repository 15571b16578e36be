"""Idealised phoneme units (U0), their phonetic classes, and unit noise as a controlled dose.

U0 = one unit per phoneme, the phonemes espeak-ng gives for each word (IPA, US English, stress
dropped; espeak-ng is GPL and stays a build-time tool of ``scripts/``, never imported here). The
59 phonemes below are those of every Austen word type (mini-SIMS, ``organisms/minisims/
u0_units.json``); unit id = index in ``U0_PHONEMES`` (sorted, the same ids as mini-SIMS).

Noise of dose p, per word occurrence, on the word's phoneme sequence (before deduplication):
each unit is independently substituted by another unit of its phonetic class with probability
p or deleted with probability p/4 (else kept); after each original unit a unit is inserted with
probability p/4, drawn from the same class as that unit (the left neighbour) and different from
it. Then consecutive repeats are merged, as for real units. A word whose units were all deleted
(and nothing inserted) keeps its first original unit: the LM and the lens need >= 1 unit per
word. The random draws are a function of (seed, utterance, occurrence) only -- not of p -- so
the noise is coupled across doses: the substitutions at p are a subset of those at any p' > p.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The one table of phonetic classes: every U0 phoneme in exactly one class.
PHONEME_CLASSES: dict[str, tuple[str, ...]] = {
    c: tuple(ps.split())
    for c, ps in {
        "vowel": "i iː ɪ ᵻ ɛ æ ɐ ə ʌ ɑː ɔ ɔː ʊ uː ɜː ɚ",
        # diphthongs, triphthongs and r-coloured vowel sequences (one espeak phoneme each)
        "diphthong": "aɪ aɪə aɪɚ aʊ eɪ oʊ ɔɪ iə ɑːɹ ɔːɹ ɛɹ ɪɹ ʊɹ",
        "stop": "p b t d k ɡ ʔ ɾ",  # incl. the glottal stop and the flap
        "fricative": "f v θ ð s z ʃ ʒ h x",
        "affricate": "tʃ dʒ",
        "nasal": "m n ŋ n̩",  # incl. syllabic n
        "liquid_glide": "l ɹ r j w əl",  # incl. syllabic l
    }.items()
}
U0_PHONEMES: tuple[str, ...] = tuple(sorted(p for ps in PHONEME_CLASSES.values() for p in ps))
CLASS_OF: dict[str, str] = {p: c for c, ps in PHONEME_CLASSES.items() for p in ps}
U0_INDEX: dict[str, int] = {p: i for i, p in enumerate(U0_PHONEMES)}
MAX_P = 0.8  # substitution p + deletion p/4 must fit in one draw


def phoneme_ids(phonemes: Sequence[str], word: str = "?") -> list[int]:
    """U0 unit ids of a word's phonemes; a phoneme outside the table is an error naming it."""
    bad = [p for p in phonemes if p not in U0_INDEX]
    if bad:
        raise ValueError(f"word {word!r}: phonemes {bad} are not U0 phonemes (u0.PHONEME_CLASSES)")
    return [U0_INDEX[p] for p in phonemes]


def dedup(units: Sequence[int]) -> list[int]:
    """Merge consecutive repeats (the usual unit deduplication)."""
    return [int(u) for i, u in enumerate(units) if i == 0 or u != units[i - 1]]


def _class_tables() -> tuple[np.ndarray, list[np.ndarray]]:
    """Per unit id: its class index, and the ids of the *other* units of its class."""
    names = list(PHONEME_CLASSES)
    cls = np.array([names.index(CLASS_OF[p]) for p in U0_PHONEMES])
    others = [np.flatnonzero((cls == cls[u]) & (np.arange(len(cls)) != u)) for u in range(len(cls))]
    return cls, others


CLASS_INDEX, CLASS_OTHERS = _class_tables()


def utterance_key(utterance: str | int) -> int:
    """A non-negative integer for the RNG seed sequence (crc32 of a string id)."""
    if isinstance(utterance, int):
        if utterance < 0:
            raise ValueError(f"utterance key must be >= 0, got {utterance}")
        return utterance
    return zlib.crc32(utterance.encode())


@dataclass(frozen=True)
class EditCounts:
    """What the noise did to one word before deduplication."""

    units: int = 0  # original units
    substituted: int = 0
    deleted: int = 0
    inserted: int = 0
    restored: int = 0  # 1 if every unit was deleted and the first was put back


@dataclass(frozen=True)
class UnitNoise:
    """Unit noise of dose ``p`` (see the module docstring), seeded by ``seed``."""

    p: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= MAX_P:
            raise ValueError(f"unit noise p must be in [0, {MAX_P}], got {self.p}")

    def edit(
        self, units: Sequence[int], utterance: str | int, occurrence: int
    ) -> tuple[list[int], EditCounts]:
        """The noisy unit sequence of one word occurrence before deduplication, and its edits."""
        if not units:
            raise ValueError(f"utterance {utterance!r}, word {occurrence}: no units to perturb")
        n = len(units)
        rng = np.random.default_rng([self.seed, utterance_key(utterance), occurrence])
        draws = rng.random((n, 2))  # [op, insertion], the same stream for every p
        picks = rng.integers(0, 1 << 30, size=(n, 2))  # [substitute, insert] choice in class
        p = self.p
        out: list[int] = []
        sub = dele = ins = 0
        for k, u in enumerate(units):
            others = CLASS_OTHERS[int(u)]
            if draws[k, 0] < p:
                out.append(int(others[picks[k, 0] % len(others)]))
                sub += 1
            elif draws[k, 0] < 1.25 * p:
                dele += 1
            else:
                out.append(int(u))
            if draws[k, 1] < p / 4:
                out.append(int(others[picks[k, 1] % len(others)]))
                ins += 1
        restored = 0
        if not out:
            out, restored = [int(units[0])], 1
        return out, EditCounts(n, sub, dele, ins, restored)

    def __call__(self, units: Sequence[int], utterance: str | int, occurrence: int) -> list[int]:
        """Deduplicated noisy units of one word occurrence: the same for the same (seed,
        utterance, occurrence); ``p = 0`` returns ``dedup(units)``."""
        return dedup(self.edit(units, utterance, occurrence)[0])


def load_lexicon(path: str | Path) -> dict[str, list[int]]:
    """U0 unit ids of every word of ``u0_lexicon.json`` (written by ``build_corpus.py u0``)."""
    raw = json.loads(Path(path).read_text())
    if tuple(raw.get("phonemes", ())) != U0_PHONEMES:
        raise ValueError(f"{path}: field 'phonemes' is not the U0 inventory of u0.py")
    return {w: phoneme_ids(ph, w) for w, ph in raw["words"].items()}


U0_FRAME_RATE = 12.5  # one frame per unit, the shipped organisms' unit rate


def u0_record(
    uid: str,
    split: str,
    words: Sequence[str],
    lexicon: dict[str, list[int]],
    noise: UnitNoise,
) -> dict[str, object]:
    """A manifest record of ``words`` spoken in U0 units with ``noise`` (keyed by ``uid``): one
    frame per unit at ``U0_FRAME_RATE``, each word's span exactly its units."""
    missing = [w for w in words if w not in lexicon]
    if missing:
        raise ValueError(f"utterance {uid}: no U0 phonemes for {missing} (u0_lexicon.json)")
    units: list[int] = []
    spans: list[list[object]] = []
    for j, w in enumerate(words):
        us = noise(lexicon[w], uid, j)
        start = len(units) / U0_FRAME_RATE
        units += us
        spans.append([w, round(start, 4), round(len(units) / U0_FRAME_RATE, 4)])
    return {
        "id": uid,
        "speaker": f"u0-p{noise.p:g}",
        "split": split,
        "text": " ".join(words),
        "words": spans,
        "frame_rate": U0_FRAME_RATE,
        "units": units,
        "durations": [1] * len(units),
    }
