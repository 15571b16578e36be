"""Padding utterances of different lengths into one batch, and sizing batches from a memory budget.

A causal LM reads a right-padded row exactly as the unpadded sequence (no real token attends to a
later pad). Left padding needs the attention mask *and* position ids counted from each row's first
real token, or rotary positions shift; :class:`PaddedBatch` carries both for either side, so
``bridge.run_with_hooks(batch.tokens, attention_mask=..., position_ids=...)`` gives every row the
numbers of its own one-by-one run: equal up to float summation order (matmuls of another shape sum
in another order; tests/test_batching.py checks fp32 rows to 1e-5 on the tiny checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from speech_lens.models.devices import free_memory_gb
from speech_lens.models.memory import estimate_memory

__all__ = [
    "PADDING_SIDES",
    "PaddedBatch",
    "auto_batch_size",
    "pad_batch",
    "padded_inputs",
    "plan_batches",
]

PADDING_SIDES = ("right", "left")


@dataclass(frozen=True, eq=False)
class PaddedBatch:
    """Rows of ``tokens`` hold the sequences; sequence ``b``'s position ``p`` sits at column
    ``offsets[b] + p`` (offset 0 on the right-padded side)."""

    tokens: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    position_ids: Int[Tensor, "batch seq"]
    lengths: tuple[int, ...]
    offsets: tuple[int, ...]
    side: str

    def __len__(self) -> int:
        return len(self.lengths)

    def columns(self, b: int) -> slice:
        """Columns of row ``b`` that hold its real tokens."""
        return slice(self.offsets[b], self.offsets[b] + self.lengths[b])

    def forward_kwargs(self, device: torch.device | str) -> dict[str, Tensor]:
        """Keyword arguments for ``bridge.run_with_hooks`` / ``bridge(...)`` besides the tokens."""
        return {
            "attention_mask": self.attention_mask.to(device),
            "position_ids": self.position_ids.to(device),
        }


def pad_batch(seqs: Sequence[Tensor], *, side: str = "right", pad_id: int = 0) -> PaddedBatch:
    """Pad 1-D id sequences into one batch (``pad_id`` only fills masked columns)."""
    if side not in PADDING_SIDES:
        raise ValueError(f"padding side {side!r}: one of {PADDING_SIDES}")
    if not seqs:
        raise ValueError("pad_batch: no sequences to pad")
    rows = [torch.as_tensor(s, dtype=torch.long) for s in seqs]
    for i, r in enumerate(rows):
        if r.dim() != 1 or r.numel() == 0:
            raise ValueError(
                f"sequence {i}: must be a non-empty 1-D id sequence, got shape {tuple(r.shape)}"
            )
    lengths = tuple(int(r.numel()) for r in rows)
    width = max(lengths)
    tokens = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = tuple(0 if side == "right" else width - n for n in lengths)
    for b, (r, off) in enumerate(zip(rows, offsets, strict=True)):
        tokens[b, off : off + r.numel()] = r
        mask[b, off : off + r.numel()] = 1
    # positions count real tokens only; pad columns get 0 (they are masked anyway)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return PaddedBatch(tokens, mask, position_ids, lengths, offsets, side)


def padded_inputs(
    model: Any, seqs: Sequence[Tensor], side: str = "right"
) -> tuple[PaddedBatch, Tensor, dict[str, Any]]:
    """What one padded forward pass of ``model`` takes: the batch, its tokens on the model's
    device and the keyword arguments (mask and position ids). Sequences of one length need no
    mask: they get the plain forward pass, as a one-by-one run makes it."""
    batch = pad_batch(seqs, side=side)
    if len(set(batch.lengths)) == 1:
        return batch, batch.tokens.to(model.device), {}
    if side == "left" and _dtype(model) == torch.float64:
        # HF eager attention takes the softmax in fp32: the fp64 mask minimum becomes -inf, a
        # fully masked pad row turns NaN and the NaN reaches the real tokens
        raise ValueError(
            "left padding gives NaN logits on a float64 model (HF eager attention); "
            "use padding_side='right'"
        )
    return batch, batch.tokens.to(model.device), batch.forward_kwargs(model.device)


def _dtype(model: Any) -> torch.dtype:
    return next(model.bridge.parameters()).dtype


def _bytes_per_row(model: Any, seq_len: int) -> int:

    config = model.hf_model.config.to_dict()
    return estimate_memory(config, _dtype(model), seq_len=seq_len).activations


def _free_bytes(model: Any, memory_budget_gb: float | None) -> tuple[int, str]:
    """Bytes left for activations, and where that number came from (for error messages)."""

    config = model.hf_model.config.to_dict()
    fixed = estimate_memory(config, _dtype(model), seq_len=1)
    if memory_budget_gb is not None:
        # a stated budget covers everything: the loaded weights and the lens buffers too
        free = memory_budget_gb * 2**30 - fixed.weights - fixed.lens
        return int(free), f"budget {memory_budget_gb:g} GiB minus weights and lens buffers"
    available = free_memory_gb(model.device)
    if available is None:
        raise ValueError(
            f"cannot measure free memory on {model.device}: pass memory_budget_gb "
            "(--memory-budget) or a fixed batch size"
        )
    # the weights are already loaded, so free memory has them counted
    return int(available * 2**30 - fixed.lens), f"{available:.1f} GiB available now"


def auto_batch_size(
    model: Any,
    seq_len: int,
    *,
    memory_budget_gb: float | None = None,
    max_batch: int = 32,
    headroom: float = 0.8,
    extra_bytes_per_token: int = 0,
) -> int:
    """How many sequences of ``seq_len`` tokens fit one forward pass in the budget (or the free
    memory now), keeping ``1 - headroom`` of it spare; refuses if not even one fits.
    ``extra_bytes_per_token``: memory each row keeps per token beyond the forward itself (e.g.
    activations cached for later patching)."""
    free, source = _free_bytes(model, memory_budget_gb)
    per_row = _bytes_per_row(model, seq_len) + int(extra_bytes_per_token) * seq_len
    n = int(free * headroom) // max(per_row, 1)
    if n < 1:
        raise ValueError(
            f"one sequence of {seq_len} tokens needs about {per_row / 2**30:.2f} GiB of "
            f"activations, but only {max(free, 0) * headroom / 2**30:.2f} GiB are usable "
            f"({source}); shorten the utterances or raise the budget"
        )
    return max(1, min(int(max_batch), n))


def plan_batches(
    model: Any,
    lengths: Sequence[int],
    batch_size: int | str = 1,
    *,
    memory_budget_gb: float | None = None,
    max_batch: int = 32,
    extra_bytes_per_token: int = 0,
) -> list[list[int]]:
    """Group indices into batches of similar length (longest first, so the first batch shows at
    once whether memory suffices). ``batch_size``: an int, or ``"auto"`` to size each batch from
    the memory budget for its longest sequence (``extra_bytes_per_token`` as in
    :func:`auto_batch_size`). Indices within a batch keep input order."""
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    if batch_size == "auto":
        out: list[list[int]] = []
        i = 0
        while i < len(order):
            size = auto_batch_size(
                model,
                int(lengths[order[i]]),
                memory_budget_gb=memory_budget_gb,
                max_batch=max_batch,
                extra_bytes_per_token=extra_bytes_per_token,
            )
            out.append(sorted(order[i : i + size]))
            i += size
        return out
    if isinstance(batch_size, str) or int(batch_size) < 1:
        raise ValueError(f"batch size {batch_size!r}: a positive integer or 'auto'")
    b = int(batch_size)
    return [sorted(order[i : i + b]) for i in range(0, len(order), b)]
