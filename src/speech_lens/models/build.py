"""An empty model of a checkpoint's architecture, filled and checked key by key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from speech_lens.models.checkpoint import base_config_dict
from speech_lens.models.spec import AdapterError, AdapterSpec, WeightFileError


def empty_model(
    path: Path, config: dict[str, Any], spec: AdapterSpec, dtype: torch.dtype, rows: int
) -> tuple[Any, Any]:
    """The HF model on the meta device (no memory), with ``rows`` embedding rows."""

    base = dict(base_config_dict(config, spec, path))
    arch = (base.get("architectures") or [None])[0]
    if spec.architectures and arch is not None and arch not in spec.architectures:
        raise AdapterError(
            f"{path / 'config.json'}: architecture {arch} is not one of {spec.name}'s "
            f"{', '.join(spec.architectures)}"
        )
    base["vocab_size"] = rows  # SIMS: the nested config may predate the resize
    model_type = base.pop("model_type", None)
    if model_type is None:
        raise AdapterError(f"{path / 'config.json'}: no model_type in the (base) config")
    hf_config = AutoConfig.for_model(model_type, **base)
    hf_config._attn_implementation = "eager"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model, hf_config


def expected_keys(model: torch.nn.Module, tied: bool) -> set[str]:
    expected = set(model.state_dict())
    if tied:
        expected.discard("lm_head.weight")
    return expected


def check_keys(path: Path, keys: set[str], expected: set[str], model: Any) -> None:
    missing = sorted(expected - keys)
    unexpected = sorted(k for k in keys - expected if "rotary_emb" not in k)
    if missing or unexpected:
        raise WeightFileError(
            f"weights in {path} do not match {model.config.model_type} config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )


def strip_prefix(path: Path, spec: AdapterSpec, keys: list[str]) -> dict[str, str]:
    """Checkpoint key -> model key (SIMS stores the LM under ``lm.``)."""
    p = spec.weights_prefix
    if not p:
        return {k: k for k in keys}
    if not any(k.startswith(p) for k in keys):
        raise WeightFileError(f"weights in {path} have no keys with the {spec.name} prefix {p!r}")
    return {k: k[len(p) :] for k in keys if k.startswith(p)}


def materialize_buffers(model: torch.nn.Module, hf_config: Any, check: bool = True) -> None:
    for module in model.modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            with torch.device("cpu"):
                fresh = type(module)(config=hf_config)
            for bname, buf in fresh.named_buffers(recurse=False):
                module.register_buffer(bname, buf, persistent=False)
            if hasattr(fresh, "attention_scaling"):
                module.attention_scaling = fresh.attention_scaling
    leftovers = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if check and leftovers:
        raise WeightFileError(f"tensors left unloaded: {leftovers[:5]}")
