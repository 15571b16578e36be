"""Audio table columns: which fields hold audio, text and words, and records from a row."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from speech_lens.audio.decode import AudioError, load_audio
from speech_lens.data.utterance import SILENCE_LABELS, DataError, Word

# --------------------------------------------------------------------------------------------
# Records and columns
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioRecord:
    """One utterance to tokenize: audio source, transcript, word timings (None: align them)."""

    id: str
    audio: Any
    text: str | None = None
    words: tuple[Word, ...] | None = None
    speaker: str | None = None
    split: str | None = None
    sample_rate: int | None = None  # as declared by the data set, checked against the file
    meta: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # file / row, for messages
    error: str | None = None  # the row could not be read; ``load`` raises this

    def load(self, sample_rate: int | None = None, **kw: Any) -> tuple[np.ndarray, int]:
        if self.error is not None:
            raise AudioError(self.error)
        return load_audio(
            self.audio,
            sample_rate=sample_rate,
            name=self.where or self.id,
            declared_rate=self.sample_rate,
            **kw,
        )

    @property
    def transcript(self) -> str | None:
        if self.text:
            return self.text
        return " ".join(w.text for w in self.words) if self.words else None


@dataclass(frozen=True)
class Columns:
    """Which table / manifest columns hold what. ``audio`` may name several columns (one
    rendering each); ``words`` then names one column per rendering, or one shared column."""

    id: str | None = "id"
    audio: tuple[str, ...] = ("audio",)
    text: str | None = "text"
    words: tuple[str, ...] = ("words",)
    speaker: str | None = "speaker"
    split: str | None = "split"
    sample_rate: str | None = "sample_rate"
    meta: tuple[str, ...] = ()
    required: frozenset[str] = frozenset({"audio"})  # fields whose columns must exist

    @classmethod
    def parse(cls, spec: str, base: Columns | None = None) -> Columns:
        """``"id=uid,audio=a1|a2,text=prompt,words=w1|w2,meta=correct|counterfactual"``; a
        preset name (``csfa``) may come first, e.g. ``"csfa,text=question"``."""
        base = base or cls()
        kw: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, eq, val = part.partition("=")
            key = key.strip()
            if not eq and key in COLUMN_PRESETS:
                base = COLUMN_PRESETS[key]
                continue
            if not eq or key not in (
                "id",
                "audio",
                "text",
                "words",
                "speaker",
                "split",
                "sample_rate",
                "meta",
            ):
                raise ValueError(
                    f"--columns entry {part!r}: expected FIELD=COLUMN with FIELD one of "
                    "id, audio, text, words, speaker, split, sample_rate, meta (or a preset: "
                    f"{', '.join(COLUMN_PRESETS)})"
                )
            vals = tuple(v.strip() for v in val.split("|") if v.strip())
            if key in ("audio", "words", "meta"):
                kw[key] = vals
            else:
                kw[key] = vals[0] if vals else None
        return replace(base, **kw, required=base.required | {k for k in kw if kw[k]})


# The paper's Common-Sense Facts Audio table, as far as it is known (one Parquet file: prompt text,
# several audio renderings, word timings of the prompt per rendering, correct and counterfactual
# completions). The exact column names of the released file are not verified; override with
# Columns.parse(...) if they differ.
CSFA_COLUMNS = Columns(
    id="id",
    audio=("audio",),
    text="prompt",
    words=("word_timings",),
    meta=("correct", "counterfactual", "category"),
)
COLUMN_PRESETS = {"default": Columns(), "csfa": CSFA_COLUMNS}


def parse_words(value: Any, where: str) -> tuple[Word, ...] | None:
    """Word timings in the shapes data sets use: ``[{"word", "start", "end"}, ...]``,
    ``[[w, s, e], ...]``, ``{"words": [...], "start": [...], "end": [...]}``, or a JSON string of
    one of these. Silence labels are dropped."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None  # an empty CSV cell: no timings
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise AudioError(f"{where}: word timings are not valid JSON ({e.msg})") from None
    if isinstance(value, dict):
        keys = {k.lower(): k for k in value}
        w = _pick(keys, ("words", "word", "text", "tokens"))
        s = _pick(keys, ("start", "starts", "start_time", "begin"))
        en = _pick(keys, ("end", "ends", "end_time", "stop"))
        if w is None or s is None or en is None:
            raise AudioError(
                f"{where}: word timings dict needs words/start/end lists, has {list(value)}"
            )
        value = list(zip(value[w], value[s], value[en], strict=True))
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise AudioError(f"{where}: word timings must be a list, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            keys = {k.lower(): k for k in item}
            w = _pick(keys, ("word", "text", "token", "label"))
            s = _pick(keys, ("start", "start_time", "begin", "xmin"))
            en = _pick(keys, ("end", "end_time", "stop", "xmax"))
            if w is None or s is None or en is None:
                raise AudioError(
                    f"{where}: word timing [{i}] needs word/start/end, has {list(item)}"
                )
            t = (item[w], item[s], item[en])
        elif isinstance(item, list | tuple) and len(item) == 3:
            t = tuple(item)
        else:
            raise AudioError(f"{where}: word timing [{i}] must be [word, start, end], got {item!r}")
        if not isinstance(t[0], str):
            raise AudioError(f"{where}: word timing [{i}] has no word text: {item!r}")
        if t[0].strip().lower() in SILENCE_LABELS:
            continue
        try:
            out.append(Word(t[0].strip(), float(t[1]), float(t[2])))
        except (TypeError, ValueError):
            raise AudioError(
                f"{where}: word timing [{i}] has non-numeric times: {item!r}"
            ) from None
    return tuple(out)


def _pick(keys: dict[str, str], options: tuple[str, ...]) -> str | None:
    return next((keys[o] for o in options if o in keys), None)


def records_from_row(
    row: dict[str, Any], cols: Columns, index: int, where: str
) -> list[AudioRecord]:
    """One table / manifest row -> one record per audio rendering."""
    missing = [c for f in cols.required for c in _names(cols, f) if c not in row]
    if missing:
        raise AudioError(f"{where}: missing column(s) {missing}; columns are {sorted(row)}")
    rid = row.get(cols.id) if cols.id else None
    rid = str(rid) if rid is not None else str(index)
    renderings: list[tuple[str, Any, Any]] = []  # (suffix, audio, words)
    word_cols = [c for c in cols.words if c in row]
    for k, acol in enumerate(cols.audio):
        a = row.get(acol)
        if a is None:
            raise AudioError(f"{where} (id {rid}): no audio in column {acol!r}")
        if (
            len(cols.audio) == 1
            and isinstance(a, list | tuple)
            and not (len(a) == 2 and isinstance(a[1], int))
        ):
            # a list of renderings in one column; words per rendering if given as a list of lists
            ws = row.get(word_cols[0]) if word_cols else None
            per = _per_rendering(ws, len(a))
            for j, aj in enumerate(a):
                renderings.append((f"#{j}", aj, per[j]))
            continue
        if len(word_cols) == len(cols.audio):
            ws = row.get(word_cols[k])
        else:
            ws = row.get(word_cols[0]) if word_cols else None
        renderings.append((f"#{acol}" if len(cols.audio) > 1 else "", a, ws))
    text = row.get(cols.text) if cols.text else None
    meta = {m: _jsonable(row.get(m)) for m in cols.meta}
    out = []
    for suffix, a, ws in renderings:
        uid = rid + suffix
        w = f"{where} (id {uid})"
        sr = row.get(cols.sample_rate) if cols.sample_rate else None
        if sr in ("", None):
            sr = None
        elif not str(sr).strip().isdigit():
            raise AudioError(f"{w}: column {cols.sample_rate!r} is not a sample rate: {sr!r}")
        out.append(
            AudioRecord(
                id=uid,
                audio=a,
                text=str(text) if text is not None else None,
                words=parse_words(ws, w),
                speaker=_opt(row.get(cols.speaker)) if cols.speaker else None,
                split=_opt(row.get(cols.split)) if cols.split else None,
                sample_rate=int(sr) if sr is not None else None,
                meta=meta,
                where=w,
            )
        )
    return out


def _names(cols: Columns, f: str) -> tuple[str, ...]:
    v = getattr(cols, f)
    if v is None:
        return ()
    return tuple(v) if isinstance(v, tuple) else (v,)


def _per_rendering(ws: Any, n: int) -> list[Any]:
    if ws is None:
        return [None] * n
    # list of lists (one timing list per rendering) vs one timing list shared by all renderings
    if (
        isinstance(ws, list | tuple)
        and len(ws) == n
        and all(
            isinstance(x, list | tuple | np.ndarray) and (len(x) == 0 or not isinstance(x[0], str))
            for x in ws
        )
    ):
        return list(ws)
    return [ws] * n


def _opt(v: Any) -> str | None:
    return None if v is None else str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return None  # audio bytes of a completion are not copied into a text manifest
    if isinstance(v, dict) and ("bytes" in v or "array" in v):
        return None
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


# --------------------------------------------------------------------------------------------
# Data set readers
# --------------------------------------------------------------------------------------------


def guarded(
    make: Callable[[], list[AudioRecord]], fallback_id: str, where: str
) -> list[AudioRecord]:
    """Read one row; a bad row becomes a record that fails on ``load`` (so a run with
    ``--skip-errors`` lists it and goes on instead of stopping the whole stream)."""
    try:
        return make()
    except (AudioError, DataError, ValueError) as e:
        msg = str(e) if where in str(e) else f"{where}: {e}"
        return [AudioRecord(id=fallback_id, audio=None, where=where, error=msg)]


def row_id(row: dict[str, Any], cols: Columns, i: int) -> str:
    v = row.get(cols.id) if cols.id else None
    return str(v) if v is not None else str(i)
