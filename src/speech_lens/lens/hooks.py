"""Hook factories that read the residual stream out through the unembedding and reduce on the spot.

A :class:`LensBuffer` holds the small per-layer results (top-k, masses, ranks, pooled word
readouts). :func:`lens_hooks` returns ``(hook_name, fn)`` pairs, one per row of the lens, each
closing over the buffer; attach them with ``bridge.run_with_hooks`` (next to a user's own hooks)
or inside ``bridge.hooks()``. Each hook puts its activation through the model's own final norm
and unembedding in position chunks and reduces each ``[chunk, vocab]`` block before the next one
is made, so nothing of size ``[layers, pos, vocab]`` (or even ``[pos, vocab]``) is ever held.

Rows: row ``i < n_layers`` reads ``blocks.i.hook_resid_pre`` (row 0 = the embeddings); row
``n_layers`` is the model's output: its own logits at ``hook_unembed`` for a float32 model; for a
bf16 / fp16 model the last block's ``hook_resid_post`` read out in float32 like every other row
(the readout is always float32: :mod:`speech_lens.readout`). Ranks count ties against the
target (``readout.TIE_RULE``).
A buffer may hold a subset of the rows (``LensBuffer.layers``); hooks go only there.

Batches: :func:`batch_lens_hooks` fills one buffer per sequence of a padded batch. Each row's
hook gathers every sequence's positions from the batch activation at once (``BatchIndex``) and
streams them, laid end to end, through :func:`stream_rows`: a chunk of positions may span
several sequences, and each buffer reduces its own slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from speech_lens._tl import HookFn, resid_post_name, resid_pre_name, unembed_name
from speech_lens.lens.numerics import at_least_float32, readout_norm, readout_unembed
from speech_lens.lens.readout import HiddenTransform, LensBuffer, Readout, chunk_len, stream_rows


class LensComplete(Exception):
    """Raised by the last lens hook when no later activation is needed (no output row asked
    for): the forward pass stops there and the lens runner catches it."""


@dataclass(frozen=True, eq=False)
class BatchIndex:
    """Where each buffer's positions sit in a padded batch: flat position ``f`` is
    ``act[batch_rows[f], columns[f]]`` (buffers laid end to end, as in :func:`stream_rows`)."""

    batch_rows: Int[Tensor, " flat"]
    columns: Int[Tensor, " flat"]

    @classmethod
    def of(cls, buffers: Sequence[LensBuffer], offsets: Sequence[int]) -> BatchIndex:
        rows = [torch.full_like(b.positions, i) for i, b in enumerate(buffers)]
        cols = [b.positions + int(o) for b, o in zip(buffers, offsets, strict=True)]
        return cls(torch.cat(rows), torch.cat(cols))

    def gather(self, act: Tensor, ix: Tensor | None = None) -> Tensor:
        """``act[batch_rows, columns]`` (at flat positions ``ix`` if given): ``[flat, ...]``."""
        r, c = self.batch_rows, self.columns
        if ix is not None:
            r, c = r[ix], c[ix]
        return act[r.to(act.device), c.to(act.device)]


def resid_hook(
    buffers: Sequence[LensBuffer],
    index: BatchIndex,
    readout: Readout,
    layer: int,
    lens: HiddenTransform | None = None,
    *,
    chunk: int,
    last: bool = False,
) -> HookFn:
    """Hook for ``blocks.{layer}.hook_resid_pre`` (or the last block's ``hook_resid_post`` for
    the output row): lens -> final norm -> unembed, in float32, -> reduce, for every sequence of
    the batch at once. ``last``: stop the forward pass afterwards."""
    row = buffers[0].row_of(layer)

    def hook(act: Tensor, *, hook: Any) -> None:
        with torch.no_grad():
            # the batch's activation is read once, for every row; float32 from here on
            h = at_least_float32(index.gather(act))
            if lens is not None:
                h = lens.transform_hidden(h, layer)
            normed = readout_norm(readout.norm, h)
            del h
            stream_rows(
                buffers,
                row,
                lambda ix: readout_unembed(readout.unembed, normed[ix.to(normed.device)]),
                readout,
                chunk,
            )
        if last:
            raise LensComplete
        return None

    return hook


def logits_hook(
    buffers: Sequence[LensBuffer], index: BatchIndex, readout: Readout, *, chunk: int
) -> HookFn:
    """Hook for ``hook_unembed``: the model's own logits, reduced like every other row."""
    row = buffers[0].row_of(readout.n_layers)

    def hook(act: Tensor, *, hook: Any) -> None:
        with torch.no_grad():
            stream_rows(buffers, row, lambda ix: index.gather(act, ix), readout, chunk)
        return None

    return hook


def batch_lens_hooks(
    buffers: Sequence[LensBuffer],
    offsets: Sequence[int],
    readout: Readout,
    lens: HiddenTransform | None = None,
    *,
    stop_early: bool = True,
) -> list[tuple[str, HookFn]]:
    """One ``(hook name, fn)`` per lens row held by the buffers (all hold the same rows), each
    filling that row of every buffer; ``offsets[b]``: column of buffer ``b``'s position 0 in
    the padded batch. With ``stop_early`` and no output row, the hook of the last row held
    stops the forward pass (:class:`LensComplete`)."""
    if not buffers:
        raise ValueError("no lens buffers")
    layers = buffers[0].layers
    if any(b.layers != layers for b in buffers):
        raise ValueError("the buffers of one batch must hold the same lens rows")
    n = readout.n_layers
    if not layers or min(layers) < 0 or max(layers) > n:
        raise ValueError(f"lens rows {layers} out of range 0..{n}")
    index = BatchIndex.of(buffers, offsets)
    chunk = chunk_len(buffers[0].chunk_size, readout.vocab_size)
    stop = stop_early and n not in layers
    hooks: list[tuple[str, HookFn]] = [
        (
            resid_pre_name(i),
            resid_hook(
                buffers, index, readout, i, lens, chunk=chunk, last=stop and i == max(layers)
            ),
        )
        for i in layers
        if i < n
    ]
    if n in layers and readout.native_float32:
        hooks.append((unembed_name(), logits_hook(buffers, index, readout, chunk=chunk)))
    elif n in layers:  # a low-precision model's logits: read its final residual in float32
        out = resid_hook(buffers, index, readout, n, None, chunk=chunk)
        hooks.append((resid_post_name(n - 1), out))
    return hooks


def lens_hooks(
    buffer: LensBuffer, readout: Readout, lens: HiddenTransform | None = None
) -> list[tuple[str, HookFn]]:
    """One ``(hook name, fn)`` per lens row, ready for ``run_with_hooks(fwd_hooks=...)`` on the
    unpadded sequence (batch of one); the forward pass runs to the end."""
    return batch_lens_hooks([buffer], [0], readout, lens, stop_early=False)
