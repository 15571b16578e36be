"""Streamed lens KL: the final distribution, per-layer readouts and their KL, without caching logits."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from speech_lens._tl import final_norm_and_unembed, resid_post_name, resid_pre_name
from speech_lens.lens.numerics import readout_logits
from speech_lens.lens.train_data import TrainError, pad_right
from speech_lens.lens.tuned import TunedLens, unembed_weight
from speech_lens.models.load import SpeechLM

# --------------------------------------------------------------------------------------------
# Streaming the residuals
# --------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the last resid_pre hook: the rest of the forward is not needed."""


@dataclass(frozen=True)
class FinalDist:
    """The final distribution at the valid positions, in the form the KL needs.

    ``KL(p‖q) = Σ p log p − Σ p·logits_q + logsumexp(logits_q)·Σ p``: keeping ``p`` and
    ``Σ p log p`` avoids a log-softmax and an exp over ``[n, vocab]`` per layer.
    """

    probs: Float[Tensor, "n vocab"]
    plogp: Float[Tensor, " n"]
    mass: Float[Tensor, " n"]  # Σ p, 1 up to rounding; kept so the identity is exact

    @classmethod
    def from_residual(cls, model: SpeechLM, h: Float[Tensor, "n d_model"], chunk: int) -> FinalDist:
        """Final norm + unembedding of the last residual, ``chunk`` rows at a time, so that
        only ``probs`` is ``[n, vocab]`` (no full logits / log-prob copies alongside it)."""
        norm, unembed = final_norm_and_unembed(model.bridge)
        n, vocab = h.shape[0], int(unembed_weight(unembed).shape[0])
        probs = torch.empty(n, vocab, device=h.device)
        plogp = torch.empty(n, device=h.device)
        for s in range(0, n, chunk):
            logp = readout_logits(norm, unembed, h[s : s + chunk]).log_softmax(-1)
            p = torch.exp(logp, out=probs[s : s + chunk])
            plogp[s : s + chunk] = torch.einsum("nv,nv->n", p, logp)
        return cls(probs, plogp, probs.sum(-1))

    def __getitem__(self, sl: slice) -> FinalDist:
        return FinalDist(self.probs[sl], self.plogp[sl], self.mass[sl])


LayerFn = Callable[[int, Float[Tensor, "n d_model"], FinalDist], None]


def stream_layers(
    model: SpeechLM,
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"],
    fn: LayerFn,
    chunk: int = 512,
    layers: Sequence[int] | None = None,
) -> None:
    """Call ``fn(layer, resid_pre[mask], final_dist[mask])`` for layer 0..n_layers-1 (or for
    the blocks among ``layers``; pass 2 then stops at the last of them).

    Two frozen passes (see module docstring); only one layer's residual is alive at a time.
    Pass 1 stops at the last block's output and unembeds it ``chunk`` positions at a time.
    """
    bridge = model.bridge
    tokens = tokens.to(model.device)
    mask = mask.to(model.device)
    read = [i for i in (range(model.n_layers) if layers is None else layers) if i < model.n_layers]
    if not read:  # only the output row: its KL is 0 by definition, nothing to stream
        return
    last = max(read)
    with torch.no_grad():
        got: list[Tensor] = []

        def final_resid(act: Tensor, *, hook: Any) -> None:
            got.append(act[mask])
            raise _StopForward  # the model's own unembedding of all positions is not needed

        final_name = resid_post_name(model.n_layers - 1)
        with contextlib.suppress(_StopForward):
            bridge.run_with_hooks(tokens, fwd_hooks=[(final_name, final_resid)], use_cache=False)
        if not got:  # pragma: no cover - would mean the bridge skipped a block
            raise RuntimeError(f"the hook on {final_name} never fired")
        final = FinalDist.from_residual(model, got.pop(), chunk)

        def read_layer(act: Tensor, *, hook: Any, layer: int) -> None:
            fn(layer, act[mask], final)
            if layer == last:
                raise _StopForward

        hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = [
            (resid_pre_name(i), functools.partial(read_layer, layer=i)) for i in read
        ]
        try:
            bridge.run_with_hooks(tokens, fwd_hooks=hooks, use_cache=False)
        except _StopForward:
            pass
        else:  # pragma: no cover - would mean the bridge skipped a block
            raise RuntimeError(f"the hook on {resid_pre_name(last)} never fired")


def kl_sum(
    lens: TunedLens | None,
    model: SpeechLM,
    layer: int,
    h: Float[Tensor, "n d_model"],
    final: FinalDist,
) -> Tensor:
    """Σ over positions of KL(p_final ‖ lens_layer(h)); ``lens=None`` is the logit lens."""
    if lens is None:
        norm, unembed = final_norm_and_unembed(model.bridge)
        logits = readout_logits(norm, unembed, h)
    else:
        logits = lens(h, layer)
    logits = logits.float()
    cross = torch.einsum("nv,nv->n", final.probs, logits) - torch.logsumexp(logits, -1) * final.mass
    return (final.plogp - cross).sum()


def lens_kl(
    model: SpeechLM,
    lens: TunedLens | None,
    sequences: Sequence[Tensor],
    *,
    batch_size: int = 8,
    chunk_tokens: int = 512,
    progress: bool = False,
    layers: Sequence[int] | None = None,
) -> Float[Tensor, " layer"]:
    """Mean KL(final ‖ lens) per token at ``resid_pre`` of every layer (``lens=None``: logit lens).

    Returns ``n_layers + 1`` values; the last row reads the final residual and is 0 by definition.
    ``layers``: the lens rows to read (sorted, e.g. ``layer_stride``); then one value per row
    read, in that order, and rows not read are never unembedded.
    """
    model.require_eval()
    seqs = [s for s in sequences if len(s) > 0]
    if not seqs:
        raise TrainError("no sequences to evaluate")
    rows = list(range(model.n_layers + 1)) if layers is None else [int(i) for i in layers]
    if not rows or rows != sorted(set(rows)) or rows[0] < 0 or rows[-1] > model.n_layers:
        raise ValueError(
            f"layers {rows}: sorted lens rows in 0..{model.n_layers}, at least one, no repeats"
        )
    total = torch.zeros(len(rows), dtype=torch.float64)
    n_tok = 0

    def fn(layer: int, h: Tensor, final: FinalDist) -> None:
        for s in range(0, h.shape[0], chunk_tokens):
            total[rows.index(layer)] += float(
                kl_sum(lens, model, layer, h[s : s + chunk_tokens], final[s : s + chunk_tokens])
            )

    batches = [seqs[i : i + batch_size] for i in range(0, len(seqs), batch_size)]
    for batch in tqdm(batches, desc="held-out KL", disable=not progress):
        tokens, mask = pad_right(batch)
        n_tok += int(mask.sum())
        with torch.no_grad():
            stream_layers(model, tokens, mask, fn, chunk_tokens, layers=rows)
    return (total / n_tok).float()
