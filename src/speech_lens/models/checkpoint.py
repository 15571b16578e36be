"""A checkpoint directory: its config, weight files, tokenizer, LoRA base and family."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer

from speech_lens.models.spec import (
    CHECKPOINT_SPEC,
    AdapterError,
    AdapterSpec,
    WeightFileError,
    available_families,
    get_spec,
)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def spec_in_checkpoint(
    path: Path,
    weights_dir: Path,
    config: dict[str, Any],
    tok_dir: Path,
    family: str | None,
    spec: str | Path | AdapterSpec | None,
) -> AdapterSpec:
    if spec is not None:
        return get_spec(spec)
    if family is None and (path / CHECKPOINT_SPEC).exists():
        return AdapterSpec.from_toml(path / CHECKPOINT_SPEC)
    if family is not None:
        return get_spec(family)
    return detect_family(weights_dir, config, tok_dir)


def detect_family(
    path: Path, config: dict[str, Any] | None = None, tok_dir: Path | None = None
) -> AdapterSpec:
    """Pick the one shipped spec whose detection rules match; refuse when none or several do."""
    config = config if config is not None else read_json(path / "config.json")
    vocab = _tokenizer_vocab(tok_dir or path)
    matches = []
    for s in available_families().values():
        d = s.detect
        if d.config_model_type is not None and config.get("model_type") != d.config_model_type:
            continue
        if (d.tokens_present or d.tokens_absent) and vocab is None:
            continue
        if vocab is not None and any(t not in vocab for t in d.tokens_present):
            continue
        if vocab is not None and any(t in vocab for t in d.tokens_absent):
            continue
        first_unit = s.units.pattern.format(k=0)
        if (
            vocab is not None
            and s.units.first_id is not None
            and vocab.get(first_unit) != s.units.first_id
        ):
            continue
        if d.config_model_type is None and not d.tokens_present:
            continue  # a spec with no rule never matches by detection
        matches.append(s)
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(available_families())
    if not matches:
        raise AdapterError(
            f"cannot detect the family of {path}: no spec matches its config.json "
            f"(model_type={config.get('model_type')!r}) and tokenizer; pass family= one of {names}, "
            f"or spec='my_model.toml'"
        )
    raise AdapterError(
        f"{path} matches several families ({', '.join(m.name for m in matches)}); pass family= explicitly"
    )


def read_json(p: Path) -> dict[str, Any]:
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise AdapterError(
            f"{p} is missing: a checkpoint directory needs its config.json"
        ) from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{p} is not valid JSON: {e}") from None


def has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model"))


def _tokenizer_vocab(path: Path) -> dict[str, int] | None:
    """Token strings of a stored tokenizer, read from its files without building it."""
    if not has_tokenizer(path):
        return None
    tok = auto_tokenizer(path)
    return dict(tok.get_vocab())


def auto_tokenizer(path: Path, **kw: Any) -> Any:

    try:
        return AutoTokenizer.from_pretrained(str(path), **kw)
    except Exception as e:  # transformers raises many types here; name the directory
        raise AdapterError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from e


def lora_base_path(path: Path) -> Path | None:
    cfg_path = path / "adapter_config.json"
    if not cfg_path.exists():
        return None
    cfg = read_json(cfg_path)
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{cfg_path}: field base_model_name_or_path is empty")
    base_path = Path(base)
    if not base_path.is_absolute():
        base_path = (path / base_path).resolve() if (path / base_path).is_dir() else base_path
    if not base_path.is_dir():
        raise AdapterError(
            f"{cfg_path}: base_model_name_or_path={base!r} is not a local directory; download the base "
            f"checkpoint (e.g. SpeechGPT-7B-cm for -com) and point the field at it"
        )
    return base_path


def merge_lora(hf: Any, adapter_dir: Path) -> Any:
    try:
        from peft import PeftModel
    except ImportError:
        raise AdapterError(
            f"{adapter_dir} is a LoRA adapter (adapter_config.json); merging it needs peft: "
            f"pip install 'speech-lens[lora]'"
        ) from None
    try:
        merged = PeftModel.from_pretrained(hf, str(adapter_dir)).merge_and_unload()
    except Exception as e:
        raise WeightFileError(f"cannot apply the LoRA adapter in {adapter_dir}: {e}") from e
    return merged


def weight_files(path: Path) -> list[Path]:
    index = [path / f for f in ("model.safetensors.index.json", "pytorch_model.bin.index.json")]
    for idx in index:
        if idx.exists():
            shards = sorted(set(read_json(idx).get("weight_map", {}).values()))
            if not shards:
                raise WeightFileError(f"{idx}: weight_map is empty")
            files = [path / s for s in shards]
            for f in files:
                if not f.exists():
                    raise WeightFileError(
                        f"{idx} lists shard {f.name}, which is missing from {path}"
                    )
            return files
    for f in ("model.safetensors", "pytorch_model.bin"):
        if (path / f).exists():
            return [path / f]
    raise WeightFileError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, safetensors preferred; pickles loaded with ``weights_only``."""
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        out.update(_read_weight_file(f))
    return out


def _read_weight_file(f: Path) -> dict[str, torch.Tensor]:
    if f.suffix == ".safetensors":
        try:
            return load_file(str(f))
        except Exception as e:
            raise WeightFileError(f"weight file {f} is corrupt or not safetensors: {e}") from e
    return _load_pickle(f)


def base_config_dict(config: dict[str, Any], spec: AdapterSpec, path: Path) -> dict[str, Any]:
    if spec.nested_config is None:
        return config
    base = config.get(spec.nested_config)
    if not isinstance(base, dict):
        raise AdapterError(
            f"{path / 'config.json'}: field {spec.nested_config!r} (the base LM config) is missing"
        )
    return base


def checkpoint_keys(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the weight files' headers (safetensors) or lazily mapped
    pickles: nothing is read into memory."""
    out: dict[str, tuple[int, ...]] = {}
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            out.update(_safetensors_items(f, lambda sf, k: tuple(sf.get_slice(k).get_shape())))
        else:
            out.update({k: tuple(v.shape) for k, v in _load_pickle(f, mmap=True).items()})
    return out


def _safetensors_items(f: Path, read: Callable[[Any, str], Any]) -> Iterator[tuple[str, Any]]:
    """``(name, read(handle, name))`` for each tensor of a safetensors file, opened lazily (one
    tensor or header at a time); a file that cannot be read is a ``WeightFileError`` naming it."""

    try:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield k, read(sf, k)
    except Exception as e:
        raise WeightFileError(f"weight file {f} is corrupt or not safetensors: {e}") from e


def _load_pickle(f: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict, read with ``weights_only=True``: pickled code is refused, never run."""
    try:
        sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise WeightFileError(
            f"weight file {f} could not be loaded safely (weights_only=True refuses pickled code): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if not isinstance(sd, dict):
        raise WeightFileError(f"weight file {f} holds a {type(sd).__name__}, not a state dict")
    return sd


def iter_state_dict(path: Path) -> Any:
    """``(name, tensor)`` one at a time, file by file: at most one tensor is in memory."""
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            yield from _safetensors_items(f, lambda sf, k: sf.get_tensor(k))
        else:
            yield from _load_pickle(f, mmap=True).items()
