"""Numeric guards: hooks that stop a forward pass at the first NaN / inf and say where.

A bf16 / fp16 model that overflows, or a checkpoint with a corrupted tensor, otherwise yields a
lens full of NaN ranks hours later with no hint of the cause. :func:`finite_guard_hooks` checks
the embeddings, every block's attention and MLP outputs and the logits; the first non-finite
activation in forward order raises :class:`NumericError` naming the hook (the earliest layer
that produced it) and the utterance. Pass the hooks as ``fwd_hooks=`` to ``word_lens`` /
``logit_lens`` (they run before the lens hooks of the same pass).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from speech_lens._tl import HookFn

__all__ = ["NumericError", "finite_guard_hooks", "guarded_hook_names"]


class NumericError(FloatingPointError):
    """A NaN or inf activation; the message names the hook and the utterance."""


def guarded_hook_names(n_layers: int) -> list[str]:
    """Hook points checked, in forward order (TL aliases; ``hook.name`` is the canonical name)."""
    names = ["hook_embed"]
    for i in range(n_layers):
        names += [f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_mlp_out"]
    return [*names, "hook_unembed"]


def _guard(utterance_id: str) -> HookFn:
    def hook(act: Tensor, *, hook: Any) -> None:
        # one reduction per hook point; all() syncs on GPU, which is cheap next to the lens
        if not bool(torch.isfinite(act).all()):
            bad = ~torch.isfinite(act)
            n_nan = int(torch.isnan(act).sum())
            pos = bad.reshape(-1, act.shape[-1]).any(-1).nonzero().squeeze(-1)
            raise NumericError(
                f"utterance {utterance_id}: non-finite activations at {hook.name} "
                f"({n_nan} NaN, {int(bad.sum()) - n_nan} inf, dtype {act.dtype}; first "
                f"positions {pos[:5].tolist()}); earlier hook points were finite"
            )
        return None

    return hook


def finite_guard_hooks(model: Any, utterance_id: str) -> list[tuple[str, HookFn]]:
    """``(hook name, fn)`` pairs for ``fwd_hooks=`` that raise :class:`NumericError` on NaN/inf."""
    fn = _guard(utterance_id)
    return [(name, fn) for name in guarded_hook_names(int(model.n_layers))]
