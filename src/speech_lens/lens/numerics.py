"""The lens readout (final norm + unembedding) in float32, and the rank rule: one place for both.

Every lens path reads residuals out through :func:`readout_logits` (or its two halves,
:func:`readout_norm` and :func:`readout_unembed`): the streaming logit lens and tuned lens
(``hooks.Readout``), ``TunedLens.forward`` and tuned-lens training (``tuned_train``).

Why float32: a bf16 / fp16 model's own ``lm_head(norm(h))`` rounds logits to a grid of 2^-7
(bf16) relative steps, so many ids share a logit and ranks depend on tie handling. The readout
here upcasts the residual and the norm and unembedding weights (their exact values) and computes
in float32, whatever the model's dtype. For a float32 model this is the model's own modules,
unchanged; a float64 model keeps its float64 readout (never downcast). The unembedding is upcast a block of vocabulary rows at a time, so the extra memory
is one block, not a float32 copy of the whole matrix.

Ranks (:func:`rank_against`): ``TIE_RULE = "pessimistic"``: the rank of a target is the number
of *other* ids whose value is >= the target's (0 = strictly first), so a tie counts against the
target and a flat readout cannot score hits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate.utils import align_module_device
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

READOUT_DTYPE = "float32"  # at least: a float64 model reads out in float64
TIE_RULE = "pessimistic"
# rows of a low-precision unembedding upcast at once (8192 x 4096 fp32 = 128 MiB)
UNEMBED_BLOCK_ROWS = 8192

__all__ = [
    "READOUT_DTYPE",
    "TIE_RULE",
    "at_least_float32",
    "is_full_precision",
    "rank_against",
    "readout_logits",
    "readout_norm",
    "readout_settings",
    "readout_unembed",
]


def readout_settings() -> dict[str, str]:
    """What runs record (run settings, ``metrics.json``, resume keys)."""
    return {"readout_dtype": READOUT_DTYPE, "tie_rule": TIE_RULE}


FULL_PRECISION = (torch.float32, torch.float64)


def is_full_precision(*modules: nn.Module) -> bool:
    """Every parameter of ``modules`` is float32 or float64: the modules run as they are."""
    return all(p.dtype in FULL_PRECISION for m in modules for p in m.parameters())


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` upcast to float32 if it is of a lower precision (bf16, fp16); float64 stays."""
    return x if x.dtype in FULL_PRECISION else x.float()


@contextlib.contextmanager
def _materialised(module: nn.Module) -> Iterator[None]:
    """Offloaded weights (meta placeholders under a device map) loaded for the block."""
    if any(p.is_meta for p in module.parameters()):
        with align_module_device(module):
            yield
    else:
        yield


def readout_norm(norm: nn.Module, h: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
    """The final norm of ``h`` in float32 (bf16 / fp16 weights upcast; float64 stays).

    HF's RMSNorms compute in float32 and multiply by the weight last, so on a float32 input they
    return float32 (the weight promoted, its values exact): the module runs as it is, through
    its device-map hooks. A norm that returns its own dtype, or refuses a float32 input, runs
    on upcast copies of its parameters instead."""
    x = at_least_float32(h)
    if is_full_precision(norm):
        return norm(x)
    out = None
    with contextlib.suppress(RuntimeError):  # e.g. layer_norm refuses mixed dtypes
        out = norm(x)
    if out is not None and out.dtype in FULL_PRECISION:
        return out
    if hasattr(norm, "_hf_hook"):
        raise TypeError(
            f"final norm {type(norm).__name__} under a device map does not compute in float32 on "
            "a float32 input; load the model without a device map or in float32"
        )
    params = {n: p.detach().float() for n, p in norm.named_parameters()}
    out = torch.func.functional_call(norm, params, (x,))
    if out.dtype != torch.float32:
        raise TypeError(f"final norm {type(norm).__name__} returned {out.dtype} on float32 input")
    return out


def readout_unembed(unembed: nn.Module, x: Float[Tensor, "n d_model"]) -> Float[Tensor, "n vocab"]:
    """The unembedding of ``x`` in float32; a low-precision ``nn.Linear`` is upcast in row blocks."""
    if is_full_precision(unembed):
        return unembed(at_least_float32(x))
    with _materialised(unembed):
        if isinstance(unembed, nn.Linear):
            w, b = unembed.weight.detach(), unembed.bias
            xf = x.to(w.device, torch.float32)
            out = xf.new_empty(xf.shape[0], w.shape[0])
            for r0 in range(0, w.shape[0], UNEMBED_BLOCK_ROWS):
                r1 = min(w.shape[0], r0 + UNEMBED_BLOCK_ROWS)
                bias = None if b is None else b.detach()[r0:r1].float()
                out[:, r0:r1] = nn.functional.linear(xf, w[r0:r1].float(), bias)
            return out
        params = {n: p.detach().float() for n, p in unembed.named_parameters()}
        out = torch.func.functional_call(unembed, params, (x.float(),))
    if out.dtype != torch.float32:
        raise TypeError(f"unembedding {type(unembed).__name__} returned {out.dtype}")
    return out


def readout_logits(
    norm: nn.Module, unembed: nn.Module, h: Float[Tensor, "n d_model"]
) -> Float[Tensor, "n vocab"]:
    """``unembed(norm(h))`` in float32 whatever the model's dtype: the lens readout."""
    return readout_unembed(unembed, readout_norm(norm, h))


def rank_against(
    values: Float[Tensor, "n vocab"],
    target_values: Float[Tensor, " n"],
    target_in_values: Bool[Tensor, " n"] | bool = True,
) -> Int[Tensor, " n"]:
    """Pessimistic ranks: how many entries of each row of ``values`` are >= that row's target
    value, not counting the target itself (``target_in_values``: whether the target is one of
    the row's entries, e.g. False for a non-text id ranked among text ids). Ties count against
    the target: rank 0 means strictly above every other id."""
    ge = (values >= target_values.unsqueeze(-1)).sum(-1)
    return ge - torch.as_tensor(target_in_values, device=ge.device).long()
