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

import json
import math
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from speech_lens.vocab import VocabError, VocabLayout

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
        set_(self, "units", _int_tuple(self.units, uid, "units"))
        if not self.units:
            raise DataError(uid, "units", "empty utterance: no speech units")
        if self.durations is not None:
            set_(self, "durations", _int_tuple(self.durations, uid, "durations"))
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
        _check_rate(self.frame_rate, uid, "frame_rate")
        set_(self, "frame_rate", float(self.frame_rate))
        for name in ("pitch", "style"):
            s = getattr(self, name)
            if s is None:
                continue
            if not isinstance(s, UnitStream):
                raise DataError(uid, name, f"must be a UnitStream, got {type(s).__name__}")
            units = _int_tuple(s.units, uid, f"{name}.units")
            durs = (
                None if s.durations is None else _int_tuple(s.durations, uid, f"{name}.durations")
            )
            if durs is not None and (len(durs) != len(units) or min(durs, default=1) < 1):
                raise DataError(uid, f"{name}.durations", "must be one run length >= 1 per unit")
            if any(u < 0 for u in units):
                raise DataError(uid, f"{name}.units", "negative unit")
            if not units:
                raise DataError(uid, f"{name}.units", "empty stream")
            _check_rate(s.frame_rate, uid, f"{name}.frame_rate")
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


def _int_tuple(xs: Any, uid: str, name: str) -> tuple[int, ...]:
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


def _check_rate(r: Any, uid: str, name: str) -> None:
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


# --------------------------------------------------------------------------------------------
# Unit strings
# --------------------------------------------------------------------------------------------

_PLAIN = re.compile(r"^\s*\d+(?:[\s,]+\d+)*\s*$")


def parse_plain_units(text: str, *, utterance: str = "?", field: str = "units") -> list[int]:
    """``"12 7 7 3"`` (SpiritLM ``encode_units`` / whitespace or comma separated) -> ints."""
    if not _PLAIN.match(text):
        raise DataError(utterance, field, f"not a plain list of unit integers: {text[:40]!r}")
    return [int(x) for x in re.split(r"[\s,]+", text.strip())]


def parse_unit_string(
    text: str,
    layout: VocabLayout,
    block: str = "units",
    *,
    utterance: str = "?",
    field: str = "units",
) -> list[int]:
    """A model's unit string -> unit indices: ``"[Hu12][Hu7]"`` (SpiritLM), ``"<12><7>"`` or
    ``"<sosp><12><7><eosp>"`` (SpeechGPT), ``"<Un12><Un7>"`` (SIMS). Modality markers at the ends
    are dropped; anything else that is not a unit token of ``block`` is refused."""
    s = text.strip()
    for tok in sorted(layout.marker_tokens.values(), key=len, reverse=True):
        if tok and s.startswith(tok):
            s = s[len(tok) :]
        if tok and s.endswith(tok):
            s = s[: -len(tok)]
    try:
        return layout.parse_units(s, block)
    except VocabError as e:
        raise DataError(utterance, field, str(e)) from None


def split_spiritlm_string(
    text: str, layout: VocabLayout, *, utterance: str = "?"
) -> dict[str, list[int]]:
    """A merged SpiritLM Expressive string ``[St71][Pi39][Hu99]...`` -> units per stream (in order)."""
    blocks = [layout.units, *layout.prosody.values()]
    names = ["units", *layout.prosody]
    alt = "|".join(f"(?:{b.regex.pattern})" for b in blocks)
    rx = re.compile(alt)
    out: dict[str, list[int]] = {n: [] for n in names}
    pos = 0
    s = text.strip()
    for m in rx.finditer(s):
        if s[pos : m.start()].strip():
            raise DataError(
                utterance, "units", f"unknown unit string {s[pos : m.start()]!r} at {pos}"
            )
        tok = m.group(0)
        for n, b in zip(names, blocks, strict=True):
            mm = b.regex.fullmatch(tok)
            if mm:
                k = int(mm.group(1))
                if not 0 <= k < b.count:
                    raise DataError(utterance, "units", f"{tok!r} outside 0..{b.count - 1}")
                out[n].append(k)
                break
        pos = m.end()
    if s[pos:].strip():
        raise DataError(utterance, "units", f"unknown unit string {s[pos:]!r} at {pos}")
    return out


def _units_field(v: Any, uid: str, name: str, layout: VocabLayout | None, block: str) -> Any:
    """A manifest ``units`` value: a list, a plain ``"12 7 3"`` string, or a model unit string."""
    if not isinstance(v, str):
        return v
    if _PLAIN.match(v):
        return parse_plain_units(v, utterance=uid, field=name)
    if layout is None:
        raise DataError(
            uid, name, f"is a unit string ({v[:30]!r}...); pass layout= to parse model unit strings"
        )
    return parse_unit_string(v, layout, block, utterance=uid, field=name)


# --------------------------------------------------------------------------------------------
# Manifest (the project's JSONL format)
# --------------------------------------------------------------------------------------------


def utterance_from_record(rec: Any, *, layout: VocabLayout | None = None) -> Utterance:
    """One manifest record (dict) -> :class:`Utterance`; every error names id and field."""
    if not isinstance(rec, dict):
        raise DataError("?", "record", f"must be a JSON object, got {type(rec).__name__}")
    uid = rec.get("id")
    if not isinstance(uid, str) or not uid:
        raise DataError(str(uid), "id", "missing or not a non-empty string")
    for key in ("words", "units", "frame_rate"):
        if key not in rec:
            raise DataError(uid, key, "missing")
    words = rec["words"]
    if not isinstance(words, list):
        raise DataError(uid, "words", "must be a list of [word, start_sec, end_sec]")
    ws = []
    for i, w in enumerate(words):
        if not isinstance(w, list | tuple) or len(w) != 3 or not isinstance(w[0], str):
            raise DataError(uid, f"words[{i}]", f"must be [word, start_sec, end_sec], got {w!r}")
        ws.append(Word(w[0], w[1], w[2]))
    streams: dict[str, UnitStream] = {}
    for name in ("pitch", "style"):
        s = rec.get(name)
        if s is None:
            continue
        if not isinstance(s, dict) or "units" not in s or "frame_rate" not in s:
            raise DataError(uid, name, 'must be {"units": [...], "frame_rate": Hz}')
        su = _units_field(s["units"], uid, f"{name}.units", layout, name)
        sd = s.get("durations")
        _check_rate(s["frame_rate"], uid, f"{name}.frame_rate")
        streams[name] = UnitStream(
            _int_tuple(su, uid, f"{name}.units"),
            float(s["frame_rate"]),
            None if sd is None else _int_tuple(sd, uid, f"{name}.durations"),
        )
    durs = rec.get("durations")
    utt = Utterance(
        id=uid,
        words=tuple(ws),
        units=_units_field(rec["units"], uid, "units", layout, "units"),
        durations=durs,
        frame_rate=rec["frame_rate"],
        speaker=_opt_str(rec.get("speaker"), uid, "speaker"),
        text=_opt_str(rec.get("text"), uid, "text") or "",
        split=_opt_str(rec.get("split"), uid, "split"),
        **streams,  # type: ignore[arg-type]
    )
    if layout is not None:
        utt.check_layout(layout)
    return utt


def _opt_str(v: Any, uid: str, name: str) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise DataError(uid, name, f"must be a string or null, got {v!r}")


def utterance_to_record(u: Utterance) -> dict[str, Any]:
    """:class:`Utterance` -> manifest record (inverse of :func:`utterance_from_record`)."""
    rec: dict[str, Any] = {
        "id": u.id,
        "speaker": u.speaker,
        "split": u.split,
        "text": u.text,
        "words": [[w.text, w.start, w.end] for w in u.words],
        "frame_rate": u.frame_rate,
        "units": list(u.units),
    }
    if u.durations is not None:
        rec["durations"] = list(u.durations)
    for name, s in u.streams().items():
        d: dict[str, Any] = {"units": list(s.units), "frame_rate": s.frame_rate}
        if s.durations is not None:
            d["durations"] = list(s.durations)
        rec[name] = d
    return rec


@dataclass(frozen=True)
class Skipped:
    """A manifest record that was not loaded, and why."""

    line: int
    id: str | None
    field: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line} (id {self.id!r}): field {self.field}: {self.reason}"


@dataclass
class LoadReport:
    """What a manifest pass read: counts, and every skipped record with line, id, field, reason."""

    path: str
    n_records: int = 0
    n_loaded: int = 0
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def by_field(self) -> dict[str, int]:
        """Skip counts per (top-level) field, e.g. ``{"units": 2, "words": 1}``."""
        return dict(Counter(re.split(r"[.\[]", s.field, maxsplit=1)[0] for s in self.skipped))

    def summary(self) -> str:
        head = f"{self.path}: {self.n_loaded} of {self.n_records} records loaded, {self.n_skipped} skipped"
        if not self.skipped:
            return head
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_field().items()))
        return head + f" ({counts})\n" + "\n".join(f"  {s}" for s in self.skipped[:20])


class ManifestReader:
    """Streams utterances from a JSONL manifest; never holds more than one record.

    Iterate it (repeatedly if you like); after (or during) a pass, ``report`` says how many
    records were read, loaded and skipped, with line, id, field and reason for each skip; a pass
    that skipped records ends with a :class:`DataWarning` saying how many. With
    ``strict=True`` the first bad record raises :class:`DataError` (message prefixed with the
    file and line) instead.
    """

    def __init__(
        self, path: str | Path, *, layout: VocabLayout | None = None, strict: bool = False
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest {self.path} does not exist")
        self.layout = layout
        self.strict = strict
        self.report = LoadReport(str(self.path))

    def __iter__(self) -> Iterator[Utterance]:
        self.report = rep = LoadReport(str(self.path))
        with self.path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rep.n_records += 1
                uid: str | None = None
                try:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(
                            "?", "json", f"not valid JSON: {e.msg} at column {e.colno}"
                        ) from None
                    if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                        uid = rec["id"]
                    utt = utterance_from_record(rec, layout=self.layout)
                except DataError as e:
                    if self.strict:
                        raise DataError(
                            e.utterance, e.field, f"{e.reason} ({self.path}:{lineno})"
                        ) from None
                    rep.skipped.append(Skipped(lineno, uid, e.field, e.reason))
                    continue
                rep.n_loaded += 1
                yield utt
        if rep.skipped:  # never drop records silently
            warnings.warn(
                f"{rep.path}: skipped {rep.n_skipped} of {rep.n_records} records "
                f"({', '.join(f'{k}: {v}' for k, v in sorted(rep.by_field().items()))}); "
                f"see reader.report",
                DataWarning,
                stacklevel=2,
            )


def read_manifest(
    path: str | Path, *, layout: VocabLayout | None = None, strict: bool = False
) -> ManifestReader:
    """Stream a JSONL manifest (see the README for the schema); ``reader.report`` counts skips.

    With ``layout`` (``model.layout``) unit ids are checked against the model's vocabulary and
    unit strings such as ``"[Hu12][Hu7]"`` are accepted in ``units``.
    """
    return ManifestReader(path, layout=layout, strict=strict)


def write_manifest(path: str | Path, utterances: Iterable[Utterance]) -> int:
    """Write utterances as JSONL atomically (temp file + ``os.replace``); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for u in utterances:
                f.write(json.dumps(utterance_to_record(u), ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


# --------------------------------------------------------------------------------------------
# slamkit metadata
# --------------------------------------------------------------------------------------------


def words_from_aligned_text(aligned: Any, *, utterance: str = "?") -> tuple[Word, ...]:
    """slamkit ``aligned_text`` ``[(" word", start, end), ...]`` -> words (leading spaces dropped;
    silence / empty entries skipped)."""
    if not isinstance(aligned, list):
        raise DataError(utterance, "aligned_text", "must be a list of [word, start, end]")
    out = []
    for i, t in enumerate(aligned):
        if not isinstance(t, list | tuple) or len(t) != 3 or not isinstance(t[0], str):
            raise DataError(
                utterance, f"aligned_text[{i}]", f"must be [word, start, end], got {t!r}"
            )
        if t[0].strip().lower() in SILENCE_LABELS:
            continue
        out.append(Word(t[0].strip(), t[1], t[2]))
    return tuple(out)


def read_slamkit(
    path: str | Path,
    *,
    units: Sequence[int] | None = None,
    durations: Sequence[int] | None = None,
    frame_rate: float = 25.0,
    split: str | None = None,
) -> list[Utterance]:
    """slamkit metadata (``file_name``, ``aligned_text``, ``text``) -> utterances.

    ``path`` is a JSON file with one record or a list of records, or a JSONL file. Units come from
    the record (``units``/``duration`` as slamkit's ``audio_represent`` returns them, also nested
    under ``audio_repr``) or, for a single record, from the ``units``/``durations`` arguments.
    slamkit units are 25 Hz (0.04 s per frame).
    """
    path = Path(path)
    raw = path.read_text(encoding="utf-8")
    try:
        data = json.loads(raw)
        recs = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        recs = [json.loads(line) for line in raw.splitlines() if line.strip()]
    if units is not None and len(recs) != 1:
        raise DataError(str(path), "units", f"units= given but {path} holds {len(recs)} records")
    out = []
    for i, rec in enumerate(recs):
        if not isinstance(rec, dict):
            raise DataError(f"{path}[{i}]", "record", "must be a JSON object")
        name = rec.get("file_name") or rec.get("id") or f"{path.stem}-{i}"
        uid = Path(str(name)).stem
        nested = rec.get("audio_repr")
        rep: dict[str, Any] = nested if isinstance(nested, dict) else rec
        u = units if units is not None else rep.get("units")
        d = durations if units is not None else rep.get("duration", rep.get("durations"))
        if u is None:
            raise DataError(uid, "units", f"{path}: record has no units; pass units=")
        words = words_from_aligned_text(rec.get("aligned_text"), utterance=uid)
        out.append(
            Utterance(
                id=uid,
                words=words,
                units=tuple(u),
                durations=None if d is None else tuple(d),
                frame_rate=frame_rate,
                text=str(rec.get("text", "")).strip(),
                split=split,
                speaker=rec.get("speaker"),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Praat TextGrid
# --------------------------------------------------------------------------------------------

# a quoted string | an "[3]" index (long format, skipped) | a bare token (number or keyword)
_TOKEN = re.compile(r'"((?:[^"]|"")*)"|\[\s*\d*\s*\]|([^\s=\[\]:"]+)')


def read_textgrid(
    path: str | Path, tier: str = "words", *, engine: Literal["builtin", "praatio"] = "builtin"
) -> tuple[Word, ...]:
    """Words of a Praat TextGrid interval tier (long or short text format, as MFA writes them).

    Empty and silence intervals (``""``, ``sil``, ``sp``, ``<eps>``...) are not words. The
    built-in reader has no dependency; ``engine="praatio"`` uses praatio (optional extra).
    """
    path = Path(path)
    if engine == "praatio":
        return _textgrid_praatio(path, tier)
    raw = path.read_bytes()
    text = (
        raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8-sig")
    )
    # strings may contain anything; numbers and keywords are bare tokens; labels like "xmin =" and
    # "intervals [3]:" carry no information the order does not already give
    toks: list[str | float] = []
    for m in _TOKEN.finditer(text):
        if m.group(1) is not None:
            toks.append(m.group(1).replace('""', '"'))
        elif m.group(2) is not None:
            t = m.group(2)
            try:
                toks.append(float(t))
            except ValueError:
                if t in ("<exists>", "<absent>"):
                    toks.append(t)
    it = iter(toks)
    try:
        if next(it) != "ooTextFile" or next(it) != "TextGrid":
            raise DataError(
                str(path), "header", 'not a Praat TextGrid (expected "ooTextFile" "TextGrid")'
            )
        next(it), next(it)  # xmin xmax
        if next(it) != "<exists>":
            raise DataError(str(path), "tiers", "TextGrid has no tiers")
        n_tiers = int(_num(next(it), path))
        names = []
        for _ in range(n_tiers):
            cls, name = next(it), next(it)
            _num(next(it), path), _num(next(it), path)
            n = int(_num(next(it), path))
            names.append(name)
            items: list[tuple[float, float, str]] = []
            for _ in range(n):
                if cls == "IntervalTier":
                    a, b, label = _num(next(it), path), _num(next(it), path), next(it)
                    items.append((a, b, str(label)))
                else:
                    _num(next(it), path), next(it)
            if name == tier:
                if cls != "IntervalTier":
                    raise DataError(str(path), f"tier {tier}", f"is a {cls}, not an IntervalTier")
                return _tier_words(items, path)
    except StopIteration:
        raise DataError(
            str(path), "TextGrid", "file ends early (truncated or not a TextGrid)"
        ) from None
    raise DataError(str(path), "tier", f"no tier named {tier!r}; tiers are {names}")


def _num(x: Any, path: Path) -> float:
    if not isinstance(x, float):
        raise DataError(str(path), "TextGrid", f"expected a number, found {x!r}")
    return x


def _tier_words(items: Iterable[tuple[float, float, str]], path: Path) -> tuple[Word, ...]:
    out = []
    for a, b, label in items:
        if not isinstance(label, str) or label.strip().lower() in SILENCE_LABELS:
            continue
        out.append(Word(label.strip(), float(a), float(b)))
    return tuple(out)


def _textgrid_praatio(path: Path, tier: str) -> tuple[Word, ...]:
    try:
        from praatio import textgrid
    except ImportError:
        raise ImportError(
            "engine='praatio' needs praatio: pip install 'speech-lens[textgrid]'"
        ) from None
    tg = textgrid.openTextgrid(str(path), includeEmptyIntervals=False)
    if tier not in tg.tierNames:
        raise DataError(
            str(path), "tier", f"no tier named {tier!r}; tiers are {list(tg.tierNames)}"
        )
    return _tier_words(((e.start, e.end, e.label) for e in tg.getTier(tier).entries), path)


def utterance_from_textgrid(
    path: str | Path,
    units: Sequence[int],
    *,
    frame_rate: float,
    durations: Sequence[int] | None = None,
    tier: str = "words",
    id: str | None = None,
    **kw: Any,
) -> Utterance:
    """A TextGrid word tier + units -> :class:`Utterance` (id defaults to the file stem)."""
    p = Path(path)
    return Utterance(
        id=id or p.stem,
        words=read_textgrid(p, tier),
        units=tuple(units),
        durations=None if durations is None else tuple(durations),
        frame_rate=frame_rate,
        **kw,
    )
