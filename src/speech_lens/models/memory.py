"""Memory estimates for loading a checkpoint and running it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from speech_lens.models.checkpoint import (
    has_tokenizer,
    lora_base_path,
    read_json,
    spec_in_checkpoint,
)
from speech_lens.models.devices import DevicePlan
from speech_lens.models.placement import activation_parts, plan_dispatch
from speech_lens.models.spec import AdapterError, AdapterSpec


def plan_load(
    path: str | Path,
    device_map: str | dict[str, str | int],
    *,
    family: str | None = None,
    spec: str | Path | AdapterSpec | None = None,
    dtype: torch.dtype | None = None,
    max_memory: dict[str | int, str | int] | None = None,
    offload_folder: str | Path | None = None,
    seq_len: int = 1024,
) -> DevicePlan:
    """Where ``load_model(path, device_map=...)`` would put every module and what each device
    would hold, from the config and the weight files' headers alone (no weight is read).
    Raises the same ``AdapterError`` the load would when a device cannot hold its part."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"checkpoint {path} is not a directory")
    weights_dir = lora_base_path(path) or path
    config = read_json(weights_dir / "config.json")
    tok_dir = path if has_tokenizer(path) else weights_dir
    the_spec = spec_in_checkpoint(path, weights_dir, config, tok_dir, family, spec)
    folder = Path(offload_folder) if offload_folder is not None else None
    return plan_dispatch(
        weights_dir,
        config,
        the_spec,
        dtype or torch.float32,
        device_map,
        max_memory,
        folder,
        seq_len,
    )[3]


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a lens run needs: weights, one forward's activations, the streaming lens buffers."""

    weights: int
    activations: int
    lens: int

    @property
    def total_gb(self) -> float:
        return (self.weights + self.activations + self.lens) / 2**30

    def __str__(self) -> str:
        g = 2**30
        return (
            f"weights {self.weights / g:.2f} GiB + activations {self.activations / g:.2f} GiB "
            f"+ lens buffers {self.lens / g:.2f} GiB"
        )


def estimate_memory(
    config: dict[str, Any],
    dtype: torch.dtype,
    *,
    seq_len: int = 1024,
    lens_chunk: int | None = None,
) -> MemoryEstimate:
    """Estimate from the HF config alone (nothing loaded), for Llama / Qwen2-shaped decoders."""
    d = int(config["hidden_size"])
    n_layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    d_head = int(config.get("head_dim") or d // heads)
    ff = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    tied = bool(config.get("tie_word_embeddings", False))
    per_layer = d * heads * d_head * 2 + d * kv * d_head * 2 + 3 * d * ff + 2 * d
    n_params = vocab * d * (1 if tied else 2) + n_layers * per_layer + d
    width = torch.finfo(dtype).bits // 8
    layer, logits, lens = activation_parts(config, dtype, seq_len, lens_chunk)
    return MemoryEstimate(weights=n_params * width, activations=layer + logits, lens=lens)
