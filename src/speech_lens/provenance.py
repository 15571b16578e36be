"""Provenance: what produced an output (model, code, lens, data, settings), as plain JSON.

:func:`collect_provenance` returns a dict that every writer stores next to its numbers
(``metrics.json["provenance"]``, ``provenance.json`` beside a tuned lens, ...) and that
``speech-lens compare`` checks before putting runs on one axis::

    {"format": 1, "created_utc": "...",
     "model": {"path", "sha256", "files": {name: sha256}, "bytes", "config_sha256", "family",
               "spec": {"name", "path", "sha256"}, ...model.describe()},
     "versions": {"speech_lens", "transformer-lens", "transformers", "torch", "python"},
     "lens": {"kind": "logit"} | {"kind": "tuned", "path", "sha256", "files"},
     "data": {"path", "sha256"} | None,
     "settings": {...}}

Checkpoint digest: each weight file is hashed on its own (``sha256sum`` can check it) and the
checkpoint digest is the sha256 over the sorted ``"<relative name>\\0<file sha256>\\n"`` lines.
File digests are cached in ``$SPEECH_LENS_CACHE/hashes.json`` keyed by the resolved path, size
and ``mtime_ns``, so a 14 GB checkpoint is read once, not once per run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from speech_lens.files import atomic_write_text
from speech_lens.models.checkpoint import lora_base_path, weight_files

FORMAT = 1
HASH_CACHE = "hashes.json"
BAR_BYTES = 1 << 30  # show a progress bar when more than this many bytes must be hashed
POOLING = "max over unit positions"
PACKAGES = {
    "speech_lens": "speech-lens",
    "transformer-lens": "transformer-lens",
    "transformers": "transformers",
    "torch": "torch",
}
VOLATILE = ("created_utc",)  # differs between identical runs: never compared, not in metrics.json
LENS_FILES = ("config.json", "params.pt")  # the tuned-lens format (lens/tuned.py)
_CHUNK = 8 << 20


def cache_dir() -> Path:
    """Where speech_lens keeps caches (as ``adapters`` does for rebuilt tokenizers)."""
    return Path(os.environ.get("SPEECH_LENS_CACHE", Path.home() / ".cache" / "speech_lens"))


def _sha256_file(path: Path, bar: Any = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            if bar is not None:
                bar.update(len(block))
    return h.hexdigest()


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}  # no cache yet, or a damaged one: rehash rather than fail
    return raw if isinstance(raw, dict) else {}


def file_digests(files: Mapping[str, Path], *, desc: str = "sha256") -> dict[str, str]:
    """sha256 of each file (name -> hex), read from the cache when size and mtime match."""
    cache_path = cache_dir() / HASH_CACHE
    cache = _read_cache(cache_path)
    out: dict[str, str] = {}
    todo: list[tuple[str, Path, str, os.stat_result]] = []
    for name, f in files.items():
        try:
            st = f.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"cannot hash {f}: the file does not exist") from None
        key = str(f.resolve())
        hit = cache.get(key)
        if isinstance(hit, dict) and (hit.get("size"), hit.get("mtime_ns")) == (
            st.st_size,
            st.st_mtime_ns,
        ):
            out[name] = str(hit["sha256"])
        else:
            todo.append((name, f, key, st))
    if todo:
        total = sum(st.st_size for *_, st in todo)
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=desc, disable=total <= BAR_BYTES
        ) as bar:
            for name, f, key, st in todo:
                out[name] = _sha256_file(f, bar)
                cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": out[name]}
        with contextlib.suppress(OSError):  # a read-only cache only costs a rehash next time
            atomic_write_text(cache_path, json.dumps(cache, indent=0, sort_keys=True))
    return {name: out[name] for name in sorted(out)}


def combined_digest(digests: Mapping[str, str]) -> str:
    """One sha256 for a set of files: over the sorted ``name\\0digest\\n`` lines."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()


def checkpoint_files(path: Path) -> dict[str, Path]:
    """The files that hold a checkpoint's weights (index included), by name relative to ``path``.

    A LoRA adapter directory contributes its adapter files and its base checkpoint's weights
    (under ``base/``), since the merged model depends on both.
    """

    base = lora_base_path(path)
    if base is not None:
        files = {
            f.name: f
            for f in sorted(path.glob("adapter_model.*"))
            if f.suffix in (".safetensors", ".bin")
        }
        files["adapter_config.json"] = path / "adapter_config.json"
        return {**files, **{f"base/{n}": f for n, f in checkpoint_files(base).items()}}
    files = {f.relative_to(path).as_posix(): f for f in weight_files(path)}
    for idx in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / idx).exists():
            files[idx] = path / idx
    return files


def _text_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def model_provenance(model: Any) -> dict[str, Any]:
    """Identity of a loaded :class:`~speech_lens.adapters.SpeechLM`: weights, config, spec."""
    path = Path(model.path).resolve()
    files = checkpoint_files(path)
    digests = file_digests(files, desc=f"sha256 {path.name}")
    spec_path = Path(model.spec.source) if model.spec.source else None
    return {
        **model.describe(),
        "path": str(path),
        "sha256": combined_digest(digests),
        "files": digests,
        "bytes": sum(f.stat().st_size for f in files.values()),
        "config_sha256": _text_sha256(path / "config.json"),
        "spec": {
            "name": model.spec.name,
            "path": str(spec_path.resolve()) if spec_path and spec_path.is_file() else None,
            "sha256": _text_sha256(spec_path) if spec_path else None,
        },
    }


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key, dist in PACKAGES.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    out["python"] = platform.python_version()
    return out


def lens_provenance(lens: str) -> dict[str, Any]:
    """``"logit"`` or ``"tuned:PATH"`` (a tuned-lens directory) -> kind, path and digest."""
    if lens == "logit":
        return {"kind": "logit"}
    if not lens.startswith("tuned:") or len(lens) == len("tuned:"):
        raise ValueError(f"lens {lens!r}: 'logit' or 'tuned:PATH' (a tuned-lens directory)")
    d = Path(lens[len("tuned:") :]).resolve()
    missing = [n for n in LENS_FILES if not (d / n).is_file()]
    if missing:
        raise FileNotFoundError(f"tuned lens {d}: {', '.join(missing)} missing")
    digests = file_digests({n: d / n for n in LENS_FILES}, desc=f"sha256 {d.name}")
    return {"kind": "tuned", "path": str(d), "sha256": combined_digest(digests), "files": digests}


def data_provenance(data: str | Path) -> dict[str, Any]:
    """A manifest's path and sha256 (None when ``data`` names no file, e.g. in-memory data)."""
    p = Path(data)
    if not p.is_file():
        return {"path": str(data), "sha256": None}
    p = p.resolve()
    return {"path": str(p), "sha256": file_digests({p.name: p}, desc="sha256 data")[p.name]}


def _plain(value: Any, where: str) -> Any:
    """JSON-ready copy: tuples -> lists, paths -> str; anything else unknown is an error."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"provenance {where}: {type(value).__name__} is not JSON-serialisable")


def collect_provenance(
    model: Any,
    *,
    data: str | Path | None = None,
    lens: str = "logit",
    settings: Mapping[str, Any] = {},  # read only, never mutated
) -> dict[str, Any]:
    """Everything needed to say what produced an output (see the module docstring)."""
    return {
        "format": FORMAT,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model_provenance(model),
        "versions": package_versions(),
        "lens": lens_provenance(lens),
        "data": data_provenance(data) if data is not None else None,
        "settings": _plain(settings, "settings"),
    }


def stable(prov: Mapping[str, Any]) -> dict[str, Any]:
    """``prov`` without the fields that differ between identical runs (the timestamp), so an
    output that embeds it stays byte-identical when rerun."""
    return {k: v for k, v in prov.items() if k not in VOLATILE}


def provenance_rows(prov: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``field`` / ``value`` rows (nested keys dotted) for a report table."""
    rows: list[dict[str, Any]] = []

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, Mapping) and v:
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        else:
            shown = json.dumps(v) if isinstance(v, (list, dict)) or v is None else v
            rows.append({"field": prefix, "value": shown})

    walk("", prov)
    return rows


def provenance_table(provs: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Several provenances side by side: one row per field, one column per label."""
    rows: dict[str, dict[str, Any]] = {}
    for label, prov in provs.items():
        for row in provenance_rows(prov):
            rows.setdefault(row["field"], {"field": row["field"]})[label] = row["value"]
    return list(rows.values())


def write_provenance(path: str | Path, prov: Mapping[str, Any]) -> Path:
    """Write ``prov`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(prov, indent=2, ensure_ascii=False) + "\n")
