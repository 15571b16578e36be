"""Audio in: decode (soundfile), mix to mono, resample (scipy ``resample_poly``), and data sets.

Data sets are read into :class:`AudioRecord` s (id, audio source, transcript, word timings if
the data has them, speaker, split, pass-through columns) from

* a folder of audio files with same-stem transcripts (``.txt``/``.lab``) and optional word
  timings (``.TextGrid`` word tier, or slamkit ``.json`` with ``aligned_text``);
* a JSONL or CSV manifest with audio paths (relative to the manifest);
* a Parquet file (or folder of them), a ``datasets.Dataset``, or a ``save_to_disk`` folder, with
  audio stored as bytes / ``{"bytes", "path"}`` structs / ``{"array", "sampling_rate"}``, one or
  several renderings per row (the Common-Sense-Facts-Audio layout: prompt text, audio renderings,
  word timings per rendering, correct and counterfactual completions).

Column names are configurable with :class:`Columns` (``Columns.parse("text=prompt,audio=a|b")``).
Every error names the file, row or column. soundfile, scipy, pyarrow and datasets are imported
lazily: ``pip install 'speech-lens[audio]'``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from speech_lens.data import (
    SILENCE_LABELS,
    DataError,
    Word,
    read_textgrid,
    words_from_aligned_text,
)

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au")
TRANSCRIPT_EXTS = (".txt", ".lab")
MIN_SAMPLE_RATE = 8000  # below this a 16 kHz speech tokenizer gets no band above 4 kHz
MAX_SAMPLE_RATE = 384000
SILENCE_DBFS = -60.0  # loudest 20 ms window below this = silence-only file


class AudioError(ValueError):
    """Audio that cannot be used; the message names the file (or row) and what is wrong."""


def _lazy(module: str, extra: str = "audio") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        pip = {"soundfile": "soundfile", "scipy.signal": "scipy", "pyarrow.parquet": "pyarrow"}
        raise ImportError(
            f"speech_lens.audio needs {pip.get(module, module)!r}: "
            f"pip install {pip.get(module, module)}  (or pip install 'speech-lens[{extra}]')"
        ) from None


# --------------------------------------------------------------------------------------------
# Decoding and resampling
# --------------------------------------------------------------------------------------------


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Polyphase resampling (scipy ``resample_poly``, Kaiser-windowed anti-aliasing FIR)."""
    if sr_in == sr_out:
        return np.asarray(x, dtype=np.float32)
    signal = _lazy("scipy.signal")
    g = math.gcd(int(sr_in), int(sr_out))
    y = signal.resample_poly(np.asarray(x, dtype=np.float64), sr_out // g, sr_in // g)
    return np.asarray(y, dtype=np.float32)


def describe_source(source: Any) -> str:
    if isinstance(source, str | Path):
        return str(source)
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return f"<{type(source).__name__}>"


def load_audio(
    source: Any,
    *,
    sample_rate: int | None = None,
    name: str | None = None,
    resample_ok: bool = True,
    declared_rate: int | None = None,
    silence_dbfs: float | None = SILENCE_DBFS,
) -> tuple[np.ndarray, int]:
    """Decode ``source`` to float32 mono, resampled to ``sample_rate`` (if given).

    ``source``: a path, encoded bytes, an HF ``{"bytes", "path"}`` struct, an
    ``{"array", "sampling_rate"}`` dict, or an ``(array, rate)`` pair. ``declared_rate`` (a data
    set's sample-rate column) must match the file's own. ``resample_ok=False`` turns a rate
    other than ``sample_rate`` into an error. Silence-only audio (loudest 20 ms window below
    ``silence_dbfs``) is refused.
    """
    where = name or describe_source(source)
    x, sr = _decode(source, where)
    if x.ndim == 2:
        x = x.mean(axis=1)  # mono mix; channels of a speech file carry the same speech
    if declared_rate is not None and int(declared_rate) != sr:
        raise AudioError(
            f"audio {where}: the data declares {declared_rate} Hz but the file is {sr} Hz"
        )
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"audio {where}: unsupported sample rate {sr} Hz (speech tokenizers need "
            f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz; 16000 is what they run at)"
        )
    if x.size == 0:
        raise AudioError(f"audio {where}: no samples (empty file)")
    if not np.all(np.isfinite(x)):
        raise AudioError(f"audio {where}: holds NaN or infinite samples")
    if silence_dbfs is not None:
        level = loudest_window_dbfs(x, sr)
        if level < silence_dbfs:
            raise AudioError(
                f"audio {where}: silence only (loudest 20 ms window {level:.1f} dBFS, "
                f"threshold {silence_dbfs:.0f} dBFS)"
            )
    if sample_rate is not None and sr != int(sample_rate):
        if not resample_ok:
            raise AudioError(
                f"audio {where}: wrong sample rate {sr} Hz, expected {sample_rate} Hz "
                "(resampling is off)"
            )
        x = resample(x, sr, int(sample_rate))
        sr = int(sample_rate)
    return np.ascontiguousarray(x, dtype=np.float32), sr


def loudest_window_dbfs(x: np.ndarray, sr: int, window_s: float = 0.02) -> float:
    n = max(1, int(sr * window_s))
    m = len(x) // n
    frames = x[: m * n].reshape(m, n) if m else x[None]
    rms = float(np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1)).max())
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def _decode(source: Any, where: str) -> tuple[np.ndarray, int]:
    if isinstance(source, tuple) and len(source) == 2:
        arr, sr = source
        return _from_array(arr, sr, where)
    if isinstance(source, dict):
        if source.get("array") is not None:
            return _from_array(source["array"], source.get("sampling_rate"), where)
        if source.get("bytes") is not None:
            return _decode_bytes(source["bytes"], where)
        if source.get("path"):
            return _decode_file(Path(source["path"]), where)
        raise AudioError(f"audio {where}: struct has neither bytes, path nor array")
    if isinstance(source, bytes | bytearray | memoryview):
        return _decode_bytes(bytes(source), where)
    if isinstance(source, str | Path):
        return _decode_file(Path(source), where)
    raise AudioError(f"audio {where}: cannot read audio from a {type(source).__name__}")


def _from_array(arr: Any, sr: Any, where: str) -> tuple[np.ndarray, int]:
    if sr is None:
        raise AudioError(f"audio {where}: an audio array needs its sampling_rate")
    a = np.asarray(arr)
    if np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float32) / float(np.iinfo(a.dtype).max + 1)
    if a.ndim == 2 and a.shape[0] < a.shape[1] and a.shape[0] <= 8:
        a = a.T  # (channels, samples) -> (samples, channels)
    if a.ndim not in (1, 2):
        raise AudioError(f"audio {where}: array of shape {a.shape} is not mono or multichannel")
    return a.astype(np.float32), int(sr)


def _decode_file(p: Path, where: str) -> tuple[np.ndarray, int]:
    if not p.is_file():
        raise AudioError(f"audio {where}: file does not exist")
    sf = _lazy("soundfile")
    try:
        x, sr = sf.read(str(p), dtype="float32", always_2d=False)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioError(f"audio {where}: unreadable ({type(e).__name__}: {e})") from None
    return np.asarray(x), int(sr)


def _decode_bytes(b: bytes, where: str) -> tuple[np.ndarray, int]:
    sf = _lazy("soundfile")
    if not b:
        raise AudioError(f"audio {where}: empty bytes")
    try:
        x, sr = sf.read(io.BytesIO(b), dtype="float32", always_2d=False)
    except Exception as e:
        raise AudioError(f"audio {where}: unreadable bytes ({type(e).__name__}: {e})") from None
    return np.asarray(x), int(sr)


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


def _guarded(
    make: Callable[[], list[AudioRecord]], fallback_id: str, where: str
) -> list[AudioRecord]:
    """Read one row; a bad row becomes a record that fails on ``load`` (so a run with
    ``--skip-errors`` lists it and goes on instead of stopping the whole stream)."""
    try:
        return make()
    except (AudioError, DataError, ValueError) as e:
        msg = str(e) if where in str(e) else f"{where}: {e}"
        return [AudioRecord(id=fallback_id, audio=None, where=where, error=msg)]


def _row_id(row: dict[str, Any], cols: Columns, i: int) -> str:
    v = row.get(cols.id) if cols.id else None
    return str(v) if v is not None else str(i)


class AudioDataset:
    """Records streamed from a source; ``len()`` is known up front (for progress bars). When
    rows hold a list of renderings, ``len()`` counts rows and ``exact`` is False."""

    def __init__(
        self, name: str, n: int, make: Callable[[], Iterator[AudioRecord]], exact: bool = True
    ) -> None:
        self.name, self._n, self._make, self.exact = name, n, make, exact

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[AudioRecord]:
        return self._make()


def read_audio_folder(root: str | Path, *, recursive: bool = True) -> AudioDataset:
    """Audio files under ``root`` with same-stem ``.txt``/``.lab`` transcripts and optional
    ``.TextGrid`` (word tier) or slamkit ``.json`` (``aligned_text``) word timings."""
    root = Path(root)
    if not root.is_dir():
        raise AudioError(f"audio folder {root} does not exist")
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in root.glob(pattern) if p.suffix.lower() in AUDIO_EXTS and p.is_file())
    if not files:
        raise AudioError(f"audio folder {root} holds no audio files ({', '.join(AUDIO_EXTS)})")
    ids = [str(p.relative_to(root).with_suffix("")) for p in files]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise AudioError(
            f"audio folder {root}: several audio files share the id(s) {sorted(dup)[:5]}"
        )

    def gen() -> Iterator[AudioRecord]:
        for p, uid in zip(files, ids, strict=True):
            yield _guarded(partial(_file_records, p, uid), uid, str(p))[0]

    return AudioDataset(str(root), len(files), gen)


def audio_file_record(p: Path, uid: str | None = None, text: str | None = None) -> AudioRecord:
    """One audio file and its same-stem sidecars (transcript, TextGrid or JSON word timings)."""
    uid = uid or p.stem
    if text is None:
        text = next(
            (
                p.with_suffix(e).read_text(encoding="utf-8").strip()
                for e in TRANSCRIPT_EXTS
                if p.with_suffix(e).is_file()
            ),
            None,
        )
    words = None
    tg, js = p.with_suffix(".TextGrid"), p.with_suffix(".json")
    if tg.is_file():
        words = read_textgrid(tg)
    elif js.is_file():
        rec = json.loads(js.read_text(encoding="utf-8"))
        if isinstance(rec, dict) and "aligned_text" in rec:
            words = words_from_aligned_text(rec["aligned_text"], utterance=uid)
            text = text or str(rec.get("text", "")).strip() or None
        else:
            words = parse_words(rec.get("words") if isinstance(rec, dict) else rec, str(js))
    return AudioRecord(id=uid, audio=p, text=text, words=words, where=str(p))


def _file_records(p: Path, uid: str) -> list[AudioRecord]:
    return [audio_file_record(p, uid)]


def read_audio_manifest(path: str | Path, columns: Columns | None = None) -> AudioDataset:
    """JSONL or CSV rows with an audio path column (relative paths: to the manifest's folder)."""
    path = Path(path)
    cols = columns or Columns()
    if not path.is_file():
        raise AudioError(f"manifest {path} does not exist")
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise AudioError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    for r in rows:
        for c in cols.audio:
            if isinstance(r.get(c), str) and r[c] and not Path(r[c]).is_absolute():
                r[c] = str(path.parent / r[c])
    n = len(rows) * (len(cols.audio) if len(cols.audio) > 1 else 1)

    def gen() -> Iterator[AudioRecord]:
        for i, r in enumerate(rows):
            w = f"{path}:{i + 1}"
            yield from _guarded(partial(records_from_row, r, cols, i, w), _row_id(r, cols, i), w)

    return AudioDataset(str(path), n, gen)


def read_audio_table(
    source: Any, columns: Columns | None = None, *, batch_size: int = 32
) -> AudioDataset:
    """Parquet file / folder of Parquet files, a ``datasets.Dataset``, or a ``save_to_disk`` folder."""
    cols = columns or Columns()
    if _is_hf_dataset(source):
        return _hf_dataset(source, cols, "<datasets.Dataset>")
    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        datasets = _lazy("datasets", extra="hf")
        return _hf_dataset(datasets.load_from_disk(str(path)), cols, str(path))
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise AudioError(f"table {path}: no Parquet file found")
    pq = _lazy("pyarrow.parquet")
    handles = []
    for f in files:
        try:
            handles.append((f, pq.ParquetFile(str(f))))
        except Exception as e:
            raise AudioError(f"table {f}: not a readable Parquet file ({e})") from None
    per_row = len(cols.audio) if len(cols.audio) > 1 else 1
    n = sum(h.metadata.num_rows for _, h in handles) * per_row
    pa = _lazy("pyarrow")
    exact = True
    for _, h in handles:
        sch = h.schema_arrow
        if per_row == 1 and cols.audio[0] in sch.names:
            t = sch.field(cols.audio[0]).type
            exact = exact and not (pa.types.is_list(t) or pa.types.is_large_list(t))

    def gen() -> Iterator[AudioRecord]:
        for f, h in handles:
            names = set(h.schema_arrow.names)
            want = [c for c in _all_columns(cols) if c in names]
            i = 0
            for batch in h.iter_batches(batch_size=batch_size, columns=want):
                for row in batch.to_pylist():
                    w = f"{f} row {i}"
                    yield from _guarded(
                        partial(records_from_row, row, cols, i, w), _row_id(row, cols, i), w
                    )
                    i += 1

    return AudioDataset(str(path), n, gen, exact)


def _all_columns(cols: Columns) -> list[str]:
    out = [*cols.audio, *cols.words, *cols.meta]
    out += [c for c in (cols.id, cols.text, cols.speaker, cols.split, cols.sample_rate) if c]
    return list(dict.fromkeys(out))


def _is_hf_dataset(x: Any) -> bool:
    return type(x).__module__.startswith("datasets") and hasattr(x, "features")


def _hf_dataset(ds: Any, cols: Columns, name: str) -> AudioDataset:
    datasets = _lazy("datasets", extra="hf")
    raw = datasets.Audio(decode=False)  # {"bytes", "path"}: decoded by soundfile, not torchcodec
    exact = True
    for c in cols.audio:
        f = ds.features.get(c)
        if isinstance(f, datasets.Audio):
            ds = ds.cast_column(c, raw)
        elif isinstance(f, list) and f and isinstance(f[0], datasets.Audio):
            ds, exact = ds.cast_column(c, [raw]), False
        elif isinstance(getattr(f, "feature", None), datasets.Audio):  # List / Sequence of Audio
            ds, exact = ds.cast_column(c, type(f)(raw)), False
        elif isinstance(f, list) or hasattr(f, "feature"):
            exact = False
    per_row = len(cols.audio) if len(cols.audio) > 1 else 1

    def gen() -> Iterator[AudioRecord]:
        for i, row in enumerate(ds):
            w = f"{name} row {i}"
            yield from _guarded(
                partial(records_from_row, dict(row), cols, i, w), _row_id(row, cols, i), w
            )

    return AudioDataset(name, len(ds) * per_row, gen, exact or per_row > 1)


def open_audio_dataset(
    source: Any, *, columns: Columns | None = None, kind: str = "auto", text: str | None = None
) -> AudioDataset:
    """Pick the reader: ``folder``, ``manifest`` (.jsonl/.json/.csv/.tsv), ``table`` (Parquet,
    HF dataset), or ``file`` (one audio file; its transcript is ``text`` or a same-stem file)."""
    if kind == "auto":
        kind = detect_kind(source)
    if kind == "table":
        return read_audio_table(source, columns)
    p = Path(source)
    if kind == "folder":
        return read_audio_folder(p)
    if kind == "manifest":
        return read_audio_manifest(p, columns)
    if kind == "file":
        if not p.is_file():
            raise AudioError(f"audio {p} does not exist")
        rec = audio_file_record(p, text=text)
        return AudioDataset(str(p), 1, lambda: iter([rec]))
    raise ValueError(f"unknown data set kind {kind!r}; one of auto, folder, manifest, table, file")


def detect_kind(source: Any) -> str:
    if _is_hf_dataset(source):
        return "table"
    p = Path(source)
    if p.is_dir():
        if (
            (p / "dataset_info.json").exists()
            or (p / "state.json").exists()
            or any(p.glob("*.parquet"))
        ):
            return "table"
        return "folder"
    suf = p.suffix.lower()
    if suf == ".parquet":
        return "table"
    if suf in (".jsonl", ".json", ".csv", ".tsv"):
        return "manifest"
    if suf in AUDIO_EXTS:
        return "file"
    if not p.exists():
        raise AudioError(f"input {p} does not exist")
    raise AudioError(f"input {p}: cannot tell what it is (folder, manifest, Parquet or audio file)")


def iter_records(sources: Iterable[Any], **kw: Any) -> Iterator[AudioRecord]:
    for s in sources:
        yield from open_audio_dataset(s, **kw)
