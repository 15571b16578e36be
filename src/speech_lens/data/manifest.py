"""Manifests: JSONL utterance records, read with a report of what was skipped, written atomically."""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speech_lens.data.alignments import words_from_aligned_text
from speech_lens.data.units import PLAIN_UNITS, parse_plain_units, parse_unit_string
from speech_lens.data.utterance import (
    DataError,
    DataWarning,
    UnitStream,
    Utterance,
    Word,
    check_rate,
    int_tuple,
)
from speech_lens.vocab import VocabLayout


def _units_field(v: Any, uid: str, name: str, layout: VocabLayout | None, block: str) -> Any:
    """A manifest ``units`` value: a list, a plain ``"12 7 3"`` string, or a model unit string."""
    if not isinstance(v, str):
        return v
    if PLAIN_UNITS.match(v):
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
        check_rate(s["frame_rate"], uid, f"{name}.frame_rate")
        streams[name] = UnitStream(
            int_tuple(su, uid, f"{name}.units"),
            float(s["frame_rate"]),
            None if sd is None else int_tuple(sd, uid, f"{name}.durations"),
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
