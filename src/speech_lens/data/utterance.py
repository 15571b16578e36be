"""Utterances: word alignments + speech units, their readers/writers, dedup and word<->unit maps.

An :class:`Utterance` holds what an analysis needs to know about one spoken sentence: its words
with times in seconds, its speech units (frame-level, or deduplicated with run lengths in
frames), the unit frame rate, and optional prosody streams (SpiritLM Expressive pitch / style)
with their own rates. Utterances validate themselves on construction; every error names the
utterance id and the field.

Readers cover what researchers already have: the project's JSONL manifest (streamed, with a
:class:`LoadReport` of skipped records), slamkit metadata JSON (``aligned_text`` triples with
leading-space words), Praat TextGrid word tiers, SpiritLM / SpeechGPT unit strings and plain
unit lists.

Manifest schema (JSONL, one utterance per line; unknown keys are ignored)::

    {"id": "s1", "speaker": "spk1" | null, "split": "train" | "test" | ...,
     "text": "the cat sat",                       # optional; defaults to the words joined
     "words": [["the", 0.12, 0.28], ...],         # [word, start_sec, end_sec], sorted, no overlap
     "frame_rate": 25.0,                          # unit frames per second
     "units": [155, 79, ...],                     # or "155 79 ..." or, with layout=, "[Hu155][Hu79]"
     "durations": [3, 1, ...],                    # optional: present = deduplicated run lengths
     "pitch": {"units": [...], "frame_rate": 12.5},   # optional prosody streams, frame level
     "style": {"units": [...], "frame_rate": 1.0}}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from speech_lens.vocab import VocabLayout

# Times are compared with this slack: unit times are frame counts / rate, word times come from
# aligners as decimal seconds, and 12 * 0.04 != 0.48 in floating point.
TIME_EPS = 1e-6
# Labels aligners write for silence / pauses; intervals with these are not words.
SILENCE_LABELS = frozenset({"", "sil", "sp", "spn", "<eps>", "<sil>", "#", "<p:>", "pau"})

UnitRule = Literal["end", "midpoint"]


class DataError(ValueError):
    """Bad utterance data; ``utterance`` and ``field`` say where (also in the message)."""

    def __init__(self, utterance: str, field: str, message: str) -> None:
        self.utterance = utterance
        self.field = field
        self.reason = message
        super().__init__(f"utterance {utterance!r}: field {field}: {message}")


class DataWarning(UserWarning):
    """Records were skipped while loading a data set (see the reader's ``report``)."""


# --------------------------------------------------------------------------------------------
# Dedup
# --------------------------------------------------------------------------------------------


def dedup(frames: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Run-length dedup: ``[5,5,7,5] -> ((5,7,5), (2,1,1))`` (units, durations in frames)."""
    units: list[int] = []
    durs: list[int] = []
    for u in frames:
        u = int(u)
        if units and units[-1] == u:
            durs[-1] += 1
        else:
            units.append(u)
            durs.append(1)
    return tuple(units), tuple(durs)


def expand(units: Sequence[int], durations: Sequence[int]) -> tuple[int, ...]:
    """Inverse of :func:`dedup`: repeat each unit by its run length."""
    if len(units) != len(durations):
        raise ValueError(f"{len(units)} units but {len(durations)} durations")
    out: list[int] = []
    for u, d in zip(units, durations, strict=True):
        out.extend([int(u)] * int(d))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Word:
    """One aligned word: ``text`` without surrounding whitespace, ``start``/``end`` in seconds."""

    text: str
    start: float
    end: float


@dataclass(frozen=True)
class UnitStream:
    """A prosody stream (pitch / style): frame-level units at ``frame_rate`` Hz.

    ``durations`` may be given for run-length input; :meth:`frames` always returns the frame grid.
    """

    units: tuple[int, ...]
    frame_rate: float
    durations: tuple[int, ...] | None = None

    def frames(self) -> tuple[int, ...]:
        return self.units if self.durations is None else expand(self.units, self.durations)


@dataclass(frozen=True)
class Utterance:
    """One utterance: aligned words and speech units.

    ``units`` are frame-level when ``durations`` is None, else deduplicated with ``durations``
    run lengths in frames. ``frame_rate`` is the unit frame rate in Hz (25 for mHuBERT-25Hz /
    slamkit, 24.99 as SpiritLM writes it, 50 for SpeechGPT). ``pitch`` / ``style`` are optional
    prosody streams with their own rates (SpiritLM Expressive: 12.5 Hz and 1 Hz). ``text``
    defaults to the words joined by spaces.
    """

    id: str
    words: tuple[Word, ...]
    units: tuple[int, ...]
    durations: tuple[int, ...] | None
    frame_rate: float
    speaker: str | None = None
    pitch: UnitStream | None = None
    style: UnitStream | None = None
    text: str = ""
    split: str | None = None

    def __post_init__(self) -> None:
        uid = self.id
        if not isinstance(uid, str) or not uid:
            raise DataError(str(uid), "id", "must be a non-empty string")
        set_ = object.__setattr__
        set_(self, "units", int_tuple(self.units, uid, "units"))
        if not self.units:
            raise DataError(uid, "units", "empty utterance: no speech units")
        if self.durations is not None:
            set_(self, "durations", int_tuple(self.durations, uid, "durations"))
            if len(self.durations) != len(self.units):
                raise DataError(
                    uid,
                    "durations",
                    f"{len(self.durations)} run lengths for {len(self.units)} units",
                )
            bad = next((i for i, d in enumerate(self.durations) if d < 1), None)
            if bad is not None:
                raise DataError(uid, f"durations[{bad}]", f"run length {self.durations[bad]} < 1")
        neg = next((i for i, u in enumerate(self.units) if u < 0), None)
        if neg is not None:
            raise DataError(uid, f"units[{neg}]", f"negative unit {self.units[neg]}")
        check_rate(self.frame_rate, uid, "frame_rate")
        set_(self, "frame_rate", float(self.frame_rate))
        for name in ("pitch", "style"):
            s = getattr(self, name)
            if s is None:
                continue
            if not isinstance(s, UnitStream):
                raise DataError(uid, name, f"must be a UnitStream, got {type(s).__name__}")
            units = int_tuple(s.units, uid, f"{name}.units")
            durs = None if s.durations is None else int_tuple(s.durations, uid, f"{name}.durations")
            if durs is not None and (len(durs) != len(units) or min(durs, default=1) < 1):
                raise DataError(uid, f"{name}.durations", "must be one run length >= 1 per unit")
            if any(u < 0 for u in units):
                raise DataError(uid, f"{name}.units", "negative unit")
            if not units:
                raise DataError(uid, f"{name}.units", "empty stream")
            check_rate(s.frame_rate, uid, f"{name}.frame_rate")
            set_(self, name, UnitStream(units, float(s.frame_rate), durs))
        set_(self, "words", _check_words(self.words, uid, self.duration, self.frame_rate))
        if not self.text:
            set_(self, "text", " ".join(w.text for w in self.words))

    # --- sizes and forms ------------------------------------------------------------------
    @property
    def n_frames(self) -> int:
        return len(self.units) if self.durations is None else sum(self.durations)

    @property
    def duration(self) -> float:
        """Audio length in seconds covered by the units."""
        return self.n_frames / self.frame_rate

    @property
    def is_dedup(self) -> bool:
        return self.durations is not None

    def frames(self) -> tuple[int, ...]:
        """Frame-level units."""
        return self.units if self.durations is None else expand(self.units, self.durations)

    def dedup(self) -> Utterance:
        """Deduplicated form (consecutive repeats merged, run lengths kept in ``durations``).

        A stored deduplicated form is kept as it is: some tokenizers deduplicate within words
        only (the organisms'), so equal units may meet at a word boundary, and the model was
        trained on exactly that sequence.
        """
        if self.durations is not None:
            return self
        units, durs = dedup(self.frames())
        if units == self.units and durs == self.durations:
            return self
        return replace(self, units=units, durations=durs)

    def as_frames(self) -> Utterance:
        """Frame-level form (``durations`` None)."""
        return (
            self if self.durations is None else replace(self, units=self.frames(), durations=None)
        )

    def streams(self) -> dict[str, UnitStream]:
        """The prosody streams present, by name."""
        return {n: s for n, s in (("pitch", self.pitch), ("style", self.style)) if s is not None}

    # --- times and word mapping -----------------------------------------------------------
    def unit_frames(self) -> list[tuple[int, int]]:
        """``(start_frame, end_frame)`` of every unit of the dedup form (frame-level: 1 frame)."""
        durs = self.dedup().durations or ()
        out, f = [], 0
        for d in durs:
            out.append((f, f + d))
            f += d
        return out

    def unit_times(self, rule: UnitRule = "end") -> list[float]:
        """Reference time (s) of every dedup unit: its end (slamkit) or its midpoint."""
        fr = self.frame_rate
        if rule == "end":
            return [e / fr for _, e in self.unit_frames()]
        if rule == "midpoint":
            return [(s + e) / 2 / fr for s, e in self.unit_frames()]
        raise ValueError(f"unit rule must be 'end' or 'midpoint', got {rule!r}")

    def unit_words(self, rule: UnitRule = "end") -> list[int]:
        """Word index of every deduplicated unit, -1 for units in silence.

        ``rule="end"`` is slamkit's: a unit belongs to the word whose interval contains its end
        time (``cumsum(duration) / rate``), taken as ``(start, end]`` so that a unit ending exactly
        on a boundary belongs to the word it lies in. ``rule="midpoint"`` uses the unit's
        midpoint and ``[start, end)`` intervals. See :func:`assign_words`.
        """
        return assign_words(self.unit_times(rule), self.words, rule)

    def check_layout(self, layout: VocabLayout) -> None:
        """Refuse units (and prosody units) outside the model's vocabulary layout."""
        _check_block(self.units, layout.units.count, self.id, "units", layout.units.pattern)
        for name, s in self.streams().items():
            if name in layout.prosody:
                b = layout.prosody[name]
                _check_block(s.units, b.count, self.id, f"{name}.units", b.pattern)


def assign_words(
    times: Sequence[float], words: Sequence[Word], rule: UnitRule = "end"
) -> list[int]:
    """Word index for each (time-sorted) reference time; -1 where no word contains it.

    ``end`` rule: a unit's end time ``t`` belongs to word ``(start, end]`` -- a unit ending exactly
    on a word's start lies wholly before it, one ending exactly on a word's end lies inside it.
    (slamkit's ``bisect`` on float times decides these exact ties by rounding noise.)
    ``midpoint`` rule: the unit's midpoint in ``[start, end)``. Times within ``TIME_EPS``
    count as equal.
    """
    end_rule = rule == "end"
    out: list[int] = []
    w = 0
    for t in times:
        while w < len(words) and (
            t > words[w].end + TIME_EPS if end_rule else t >= words[w].end - TIME_EPS
        ):
            w += 1
        if w < len(words):
            s = words[w].start
            inside = t > s + TIME_EPS if end_rule else t >= s - TIME_EPS
        else:
            inside = False
        out.append(w if inside else -1)
    return out


def int_tuple(xs: Any, uid: str, name: str) -> tuple[int, ...]:
    if isinstance(xs, str | bytes):
        raise DataError(uid, name, "must be a list of integers, got a string")
    try:
        out = tuple(xs)
    except TypeError:
        raise DataError(uid, name, f"must be a list of integers, got {type(xs).__name__}") from None
    for i, x in enumerate(out):
        if isinstance(x, bool) or not isinstance(x, int):
            if isinstance(x, float) and x.is_integer():
                continue
            if hasattr(x, "__index__"):  # numpy / torch integer scalars
                continue
            raise DataError(uid, f"{name}[{i}]", f"not an integer: {x!r}")
    return tuple(int(x) for x in out)


def check_rate(r: Any, uid: str, name: str) -> None:
    if isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r) or r <= 0:
        raise DataError(uid, name, f"must be a positive number of frames per second, got {r!r}")


def _check_words(words: Any, uid: str, duration: float, rate: float) -> tuple[Word, ...]:
    if isinstance(words, str):
        raise DataError(uid, "words", "must be a list of words, got a string")
    out: list[Word] = []
    for i, w in enumerate(words):
        if not isinstance(w, Word):
            if isinstance(w, list | tuple) and len(w) == 3:
                w = Word(w[0], w[1], w[2])
            else:
                raise DataError(
                    uid, f"words[{i}]", f"must be Word or [text, start, end], got {w!r}"
                )
        if not isinstance(w.text, str) or not w.text.strip():
            raise DataError(uid, f"words[{i}].text", f"empty word text {w.text!r}")
        for part in ("start", "end"):
            v = getattr(w, part)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise DataError(uid, f"words[{i}].{part}", f"not a finite time: {v!r}")
        if w.start < 0:
            raise DataError(uid, f"words[{i}].start", f"negative time {w.start}")
        if w.end < w.start:
            raise DataError(
                uid,
                f"words[{i}].end",
                f"word {w.text!r} ends ({w.end}) before it starts ({w.start})",
            )
        if out and w.start < out[-1].start:
            raise DataError(
                uid,
                f"words[{i}].start",
                f"words are not sorted: {w.text!r} starts at {w.start} before {out[-1].text!r} ({out[-1].start})",
            )
        if out and w.start < out[-1].end - TIME_EPS:
            raise DataError(
                uid,
                f"words[{i}].start",
                f"word {w.text!r} starts at {w.start}, overlapping {out[-1].text!r} which ends at {out[-1].end}",
            )
        out.append(Word(w.text.strip(), float(w.start), float(w.end)))
    if not out:
        raise DataError(uid, "words", "empty utterance: no words")
    # one frame of slack: units quantise the audio length to whole frames
    if out[-1].end > duration + 1 / rate + TIME_EPS:
        raise DataError(
            uid,
            f"words[{len(out) - 1}].end",
            f"word {out[-1].text!r} ends at {out[-1].end}s, past the audio end {duration:.3f}s "
            f"(units cover {duration:.3f}s at the given frame rate)",
        )
    return tuple(out)


def _check_block(units: Sequence[int], count: int, uid: str, name: str, pattern: str) -> None:
    bad = next((i for i, u in enumerate(units) if not 0 <= u < count), None)
    if bad is not None:
        raise DataError(
            uid,
            f"{name}[{bad}]",
            f"unit {units[bad]} is outside the model's layout ({pattern.format(k=0)}.."
            f"{pattern.format(k=count - 1)})",
        )
