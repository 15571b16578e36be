"""Every import of TransformerLens internals lives here, so a new TL release is a one-file change.

TransformerLens 4.x removed ``HookedTransformer``; models are ``TransformerBridge`` objects that
wrap the live HF model and keep the hook contract (``fn(act, *, hook)``, ``run_with_hooks``,
``hooks()``, ``run_with_cache``, ``blocks.{i}.hook_resid_pre`` aliases).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

# a TransformerLens hook: fn(activation, *, hook) -> replacement activation or None
HookFn = Callable[..., Tensor | None]

__all__ = [
    "HookFn",
    "TransformerBridge",
    "boot_bridge",
    "check_device_map_supported",
    "final_norm_and_unembed",
    "get_act_name",
    "resid_post_name",
    "resid_pre_name",
]


def boot_bridge(
    label: str,
    hf_model: torch.nn.Module,
    tokenizer: Any,
    *,
    device: str | torch.device | None,
    dtype: torch.dtype,
) -> TransformerBridge:
    """Wrap an already-loaded HF causal LM. No hub call: the config is copied from ``hf_model``.

    ``dtype`` must match the HF model's dtype (TL pitfall P4: it is not applied to a passed model).
    ``device``: TL records it in ``cfg.device`` but does not move a passed model, so it is moved
    here. ``device=None`` is for a model dispatched with accelerate (``hf_device_map`` set): it
    stays where its hooks put it, and TL's boot is called without ``device_map`` (which it
    refuses next to ``hf_model``); TL then reads ``hf_device_map`` and takes the embedding's
    device as ``cfg.device``.
    """
    if device is not None:
        if getattr(hf_model, "hf_device_map", None):
            raise ValueError("a dispatched model (hf_device_map set) is booted with device=None")
        hf_model.to(device)
    elif not getattr(hf_model, "hf_device_map", None):
        raise ValueError("device=None is only for a model dispatched with a device map")
    bridge = TransformerBridge.boot_transformers(
        label, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    bridge.eval()
    return bridge


def check_device_map_supported(devices: Any) -> None:
    """Raise ValueError for device maps TL 4.3's boot refuses (CPU/disk offload mixed with a
    GPU: unverified upstream), so a load is refused before any weight is read."""
    from transformer_lens.utilities.multi_gpu import MIXED_OFFLOAD_GPU_ERROR, is_mixed_offload_gpu

    if is_mixed_offload_gpu(list(devices)):
        raise ValueError(f"TransformerLens 4.3 refuses it: {MIXED_OFFLOAD_GPU_ERROR}")


def resid_pre_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def resid_post_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def final_norm_and_unembed(bridge: TransformerBridge) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model's own final norm and unembedding as the wrapped HF modules.

    Calling these (not ``bridge.ln_final`` / ``bridge.unembed``) fires no hook points, so a lens
    applied inside another run's hooks does not trigger that run's ``ln_final.*`` hooks.
    """
    norm = bridge.ln_final.original_component
    unembed = bridge.unembed.original_component
    if norm is None or unembed is None:
        raise TypeError(f"bridge {type(bridge).__name__} wraps no final norm / unembedding module")
    return norm, unembed


def unembed_name() -> str:
    """The logits hook (legacy alias of ``unembed.hook_out``)."""
    return "hook_unembed"
