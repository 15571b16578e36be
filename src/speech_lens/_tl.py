"""Every import of TransformerLens internals lives here, so a new TL release is a one-file change.

TransformerLens 4.x removed ``HookedTransformer``; models are ``TransformerBridge`` objects that
wrap the live HF model and keep the hook contract (``fn(act, *, hook)``, ``run_with_hooks``,
``hooks()``, ``run_with_cache``, ``blocks.{i}.hook_resid_pre`` aliases).
"""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

__all__ = [
    "TransformerBridge",
    "boot_bridge",
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
    device: str | torch.device,
    dtype: torch.dtype,
) -> TransformerBridge:
    """Wrap an already-loaded HF causal LM. No hub call: the config is copied from ``hf_model``.

    ``dtype`` must match the HF model's dtype (TL pitfall P4: it is not applied to a passed model).
    """
    bridge = TransformerBridge.boot_transformers(
        label, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    bridge.eval()
    return bridge


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
