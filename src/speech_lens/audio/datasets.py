"""Audio datasets: folders, manifests, tables and HF datasets as one record stream."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from speech_lens.audio.columns import (
    AudioRecord,
    Columns,
    guarded,
    parse_words,
    records_from_row,
    row_id,
)
from speech_lens.audio.decode import AUDIO_EXTS, TRANSCRIPT_EXTS, AudioError, lazy
from speech_lens.data.alignments import read_textgrid, words_from_aligned_text


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
            yield guarded(partial(_file_records, p, uid), uid, str(p))[0]

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
            yield from guarded(partial(records_from_row, r, cols, i, w), row_id(r, cols, i), w)

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
        datasets = lazy("datasets", extra="hf")
        return _hf_dataset(datasets.load_from_disk(str(path)), cols, str(path))
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise AudioError(f"table {path}: no Parquet file found")
    pq = lazy("pyarrow.parquet")
    handles = []
    for f in files:
        try:
            handles.append((f, pq.ParquetFile(str(f))))
        except Exception as e:
            raise AudioError(f"table {f}: not a readable Parquet file ({e})") from None
    per_row = len(cols.audio) if len(cols.audio) > 1 else 1
    n = sum(h.metadata.num_rows for _, h in handles) * per_row
    pa = lazy("pyarrow")
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
                    yield from guarded(
                        partial(records_from_row, row, cols, i, w), row_id(row, cols, i), w
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
    datasets = lazy("datasets", extra="hf")
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
            yield from guarded(
                partial(records_from_row, dict(row), cols, i, w), row_id(row, cols, i), w
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
