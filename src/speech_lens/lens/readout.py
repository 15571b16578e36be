"""Lens readouts: the final norm + unembedding applied to residuals, reduced on the fly."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from speech_lens._tl import final_norm_and_unembed
from speech_lens.lens.numerics import is_full_precision, rank_against, readout_logits
from speech_lens.options import DEFAULT_CHUNK_ELEMENTS
from speech_lens.vocab import VocabLayout

# Vocabulary groups whose probability mass is measured (columns of LensBuffer.mass)
MASS_GROUPS = ("text", "unit", "speech", "marker", "other")


class HiddenTransform(Protocol):
    """A lens applied to the residual before the final norm (tuned lens: ``h + A h + b``)."""

    def transform_hidden(self, h: Tensor, layer: int) -> Tensor: ...


@dataclass(frozen=True)
class Readout:
    """The model's own final norm and unembedding, plus the vocabulary partitions.

    ``norm`` and ``unembed`` are the wrapped HF modules (not the bridge components), so calling
    them inside a hook does not fire ``ln_final.*`` / ``unembed.*`` hooks a second time. They
    always run in float32 (:func:`speech_lens.readout.readout_logits`; float64 on a float64
    model); ``native_float32``: the model's own final norm and unembedding are float32 (or
    float64) already, so its logits are that readout.
    """

    norm: torch.nn.Module
    unembed: torch.nn.Module
    n_layers: int
    vocab_size: int
    text_mask: Bool[Tensor, " vocab"]
    # The non-text ids are few (units, prosody, markers, control, padding rows), so masses are
    # read from those columns only and text mass is the rest: no pass over the whole vocabulary.
    unit_idx: Int[Tensor, " n"]
    prosody_idx: Int[Tensor, " n"]
    marker_idx: Int[Tensor, " n"]
    other_idx: Int[Tensor, " n"]  # control ids and unused rows: neither text nor speech/marker
    text_end: int  # one past the last text id
    text_holes: Int[Tensor, " n"]  # non-text ids below text_end
    n_text: int
    native_float32: bool = True

    @classmethod
    def of(cls, model: Any) -> Readout:
        norm, unembed = final_norm_and_unembed(model.bridge)
        vocab = int(model.layout.vocab_size)
        out_features = getattr(unembed, "out_features", vocab)
        if out_features != vocab:
            raise ValueError(
                f"model {getattr(model, 'path', '?')}: unembedding has {out_features} outputs "
                f"but the vocabulary layout has {vocab} ids"
            )
        device = getattr(model, "output_device", model.device)  # logits' device (device_map)
        return cls.for_layout(model.layout, norm, unembed, int(model.n_layers), device)

    @classmethod
    def for_layout(
        cls,
        layout: VocabLayout,
        norm: torch.nn.Module,
        unembed: torch.nn.Module,
        n_layers: int,
        device: torch.device | str = "cpu",
    ) -> Readout:
        native = is_full_precision(norm, unembed)
        marker = torch.zeros(layout.vocab_size, dtype=torch.bool)
        for i in layout.marker_ids.values():
            marker[i] = True
        text, unit, speech = layout.text_mask, layout.unit_mask, layout.speech_mask
        other = ~text & ~speech & ~marker
        text_ids = text.nonzero().squeeze(-1)
        if text_ids.numel() == 0:
            raise ValueError("the vocabulary layout has no text ids")
        end = int(text_ids.max()) + 1

        def idx(m: Tensor) -> Tensor:
            return m.nonzero().squeeze(-1).to(device)

        return cls(
            norm=norm,
            unembed=unembed,
            n_layers=n_layers,
            vocab_size=int(layout.vocab_size),
            text_mask=text.to(device),
            unit_idx=idx(unit),
            prosody_idx=idx(speech & ~unit),
            marker_idx=idx(marker),
            other_idx=idx(other),
            text_end=end,
            text_holes=idx(~text[:end]),
            n_text=int(text_ids.numel()),
            native_float32=native,
        )

    def masses(self, logprobs: Float[Tensor, "c vocab"]) -> Float[Tensor, "c group"]:
        """Probability on text, unit, speech (units + prosody), marker and other (control,
        unused) ids: the columns of MASS_GROUPS."""

        def mass(ix: Tensor) -> Tensor:
            if ix.numel() == 0:
                return logprobs.new_zeros(logprobs.shape[0])
            return logprobs.index_select(1, ix).exp().sum(-1)

        unit, prosody = mass(self.unit_idx), mass(self.prosody_idx)
        marker, other = mass(self.marker_idx), mass(self.other_idx)
        speech = unit + prosody
        text = (1.0 - speech - marker - other).clamp(min=0.0)
        return torch.stack([text, unit, speech, marker, other], dim=-1)

    def logits(self, h: Float[Tensor, "pos d_model"]) -> Float[Tensor, "pos vocab"]:
        """Final norm + unembedding of ``h`` in float32."""
        return readout_logits(self.norm, self.unembed, h)


@dataclass(eq=False)
class LensBuffer:
    """Preallocated per-row results of one streaming lens pass over one sequence.

    ``positions`` are the absolute positions read (sorted). ``word_positions[j]`` are the
    positions pooled for word ``j`` (each a subset of ``positions``); ``cand_ids`` / ``cand_word``
    list, flat, the candidate token ids whose pooled rank is measured and the word each belongs to.
    """

    n_rows: int
    positions: Int[Tensor, " pos"]
    k: int
    targets: Int[Tensor, "pos n_targets"] | None = None
    word_positions: Sequence[Int[Tensor, " n"]] = ()
    cand_ids: Int[Tensor, " n_cand"] | None = None
    cand_word: Int[Tensor, " n_cand"] | None = None
    chunk_size: int | None = None
    # lens rows held, one per buffer row (default ``0..n_rows-1``): a layer subset keeps only these
    layers: tuple[int, ...] = ()
    # outputs, filled by the hooks
    topk_ids: Int[Tensor, "row pos k"] = field(init=False)
    topk_logprobs: Float[Tensor, "row pos k"] = field(init=False)
    topk_ids_all: Int[Tensor, "row pos k"] = field(init=False)
    topk_logprobs_all: Float[Tensor, "row pos k"] = field(init=False)
    mass: Float[Tensor, "row pos group"] = field(init=False)
    target_ranks: Int[Tensor, "row pos n_targets"] | None = field(init=False)
    target_logprobs: Float[Tensor, "row pos n_targets"] | None = field(init=False)
    word_topk_ids: Int[Tensor, "row word k"] = field(init=False)
    word_topk_logits: Float[Tensor, "row word k"] = field(init=False)
    cand_ranks: Int[Tensor, "row n_cand"] = field(init=False)
    cand_logits: Float[Tensor, "row n_cand"] = field(init=False)
    filled: Bool[Tensor, " row"] = field(init=False)

    def __post_init__(self) -> None:
        r, p, k = self.n_rows, int(self.positions.shape[0]), self.k
        self.layers = tuple(int(i) for i in self.layers) or tuple(range(r))
        if len(self.layers) != r:
            raise ValueError(f"{len(self.layers)} lens rows {self.layers} for a buffer of {r} rows")
        self.topk_ids = torch.full((r, p, k), -1, dtype=torch.long)
        self.topk_logprobs = torch.full((r, p, k), float("nan"))
        self.topk_ids_all = torch.full((r, p, k), -1, dtype=torch.long)
        self.topk_logprobs_all = torch.full((r, p, k), float("nan"))
        self.mass = torch.full((r, p, len(MASS_GROUPS)), float("nan"))
        if self.targets is not None:
            t = self.targets.shape[1]
            self.target_ranks = torch.full((r, p, t), -1, dtype=torch.long)
            self.target_logprobs = torch.full((r, p, t), float("nan"))
        else:
            self.target_ranks = self.target_logprobs = None
        w = len(self.word_positions)
        self.word_topk_ids = torch.full((r, w, k), -1, dtype=torch.long)
        self.word_topk_logits = torch.full((r, w, k), float("nan"))
        c = 0 if self.cand_ids is None else int(self.cand_ids.shape[0])
        self.cand_ranks = torch.full((r, c), -1, dtype=torch.long)
        self.cand_logits = torch.full((r, c), float("nan"))
        self.filled = torch.zeros(r, dtype=torch.bool)
        # position -> index into `positions`, and the index range each word spans
        index = {int(q): i for i, q in enumerate(self.positions.tolist())}
        self._word_index: list[Tensor] = []
        for j, wp in enumerate(self.word_positions):
            missing = [int(q) for q in wp.tolist() if int(q) not in index]
            if missing:
                raise ValueError(f"word {j}: positions {missing} are not among the lens positions")
            if wp.numel() == 0:
                raise ValueError(f"word {j}: no positions to pool over")
            self._word_index.append(torch.tensor([index[int(q)] for q in wp.tolist()]))
        self._first_idx = [int(ix.min()) for ix in self._word_index]
        self._last_idx = [int(ix.max()) for ix in self._word_index]
        self._word_cands: list[Tensor] = [
            (self.cand_word == j).nonzero().squeeze(-1) if self.cand_word is not None else None  # type: ignore[misc]
            for j in range(w)
        ]

    # ------------------------------------------------------------------------------------------
    def chunk_len(self, vocab: int) -> int:
        return chunk_len(self.chunk_size, vocab)

    def row_of(self, layer: int) -> int:
        """Index into this buffer's rows of lens row ``layer``."""
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise KeyError(
                f"lens row {layer} is not among this buffer's rows {self.layers}"
            ) from None

    @torch.no_grad()
    def consume(
        self,
        row: int,
        rows_of: Callable[[Tensor], Float[Tensor, "c vocab"]],
        readout: Readout,
    ) -> None:
        """Fill ``row``: ``rows_of(index)`` gives the logits at ``positions[index]``."""
        stream_rows([self], row, rows_of, readout, self.chunk_len(readout.vocab_size))

    def _pool_words(
        self,
        row: int,
        logits: Tensor,
        c0: int,
        c1: int,
        running: dict[int, Tensor],
        readout: Readout,
    ) -> None:
        """Max-pool ``logits`` (positions ``c0..c1-1``) into the words; rank the finished ones."""
        first_idx, last_idx = self._first_idx, self._last_idx
        done: list[int] = []
        for j, ix in enumerate(self._word_index):
            if last_idx[j] < c0 or first_idx[j] >= c1:
                continue
            local = ix[(ix >= c0) & (ix < c1)] - c0
            m = logits.index_select(0, local.to(logits.device)).amax(0)
            running[j] = m if j not in running else torch.maximum(running[j], m)
            if last_idx[j] < c1:
                done.append(j)
        if not done:
            return
        pooled = torch.stack([running.pop(j) for j in done])  # [w, vocab], w <= chunk
        text = pooled.masked_fill(~readout.text_mask, float("-inf"))
        k = min(self.k, readout.n_text)
        vals, ids = text.topk(k, dim=-1)
        for a, j in enumerate(done):
            self.word_topk_ids[row, j, :k] = ids[a].cpu()
            self.word_topk_logits[row, j, :k] = vals[a].cpu()
            cands = self._word_cands[j]
            if cands is None or cands.numel() == 0:
                continue
            assert self.cand_ids is not None
            cid = self.cand_ids[cands].to(pooled.device)
            v = pooled[a].index_select(0, cid)
            # rank among text ids: how many other text ids have a pooled logit >= (ties count
            # against the candidate); a non-text candidate is not among the text ids
            row_vals = text[a].unsqueeze(0).expand(v.shape[0], -1)
            rank = rank_against(row_vals, v, readout.text_mask[cid])
            self.cand_ranks[row, cands] = rank.cpu()
            self.cand_logits[row, cands] = v.cpu()

    def _reduce_positions(self, row: int, logprobs: Tensor, c0: int, c1: int, r: Readout) -> None:
        vals, ids = logprobs.topk(self.k, dim=-1)
        self.topk_ids_all[row, c0:c1] = ids.cpu()
        self.topk_logprobs_all[row, c0:c1] = vals.cpu()
        self.mass[row, c0:c1] = r.masses(logprobs).cpu()
        if self.targets is not None:
            assert self.target_ranks is not None and self.target_logprobs is not None
            t = self.targets[c0:c1].to(logprobs.device)
            valid = t >= 0
            lp = logprobs.gather(1, t.clamp(min=0))
            for j in range(t.shape[1]):
                rank = rank_against(logprobs, lp[:, j])  # ties count against the target
                self.target_ranks[row, c0:c1, j] = torch.where(valid[:, j], rank, -1).cpu()
            self.target_logprobs[row, c0:c1] = lp.masked_fill(~valid, float("nan")).cpu()
        # text top-k: text ids all sit below text_end; blank the few non-text ids among them
        k = min(self.k, r.n_text)
        head = logprobs[:, : r.text_end]
        head.index_fill_(1, r.text_holes, float("-inf"))
        vals, ids = head.topk(k, dim=-1)
        self.topk_ids[row, c0:c1, :k] = ids.cpu()
        self.topk_logprobs[row, c0:c1, :k] = vals.cpu()


def chunk_len(chunk_size: int | None, vocab: int) -> int:
    """Positions unembedded at once: ``chunk_size``, or about DEFAULT_CHUNK_ELEMENTS logits."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, DEFAULT_CHUNK_ELEMENTS // vocab)


@torch.no_grad()
def stream_rows(
    buffers: Sequence[LensBuffer],
    row: int,
    logits_of: Callable[[Tensor], Float[Tensor, "c vocab"]],
    readout: Readout,
    chunk: int,
) -> None:
    """Fill buffer row ``row`` of every buffer in one stream of chunks.

    The buffers' positions are laid end to end (buffer 0's, then buffer 1's, ...);
    ``logits_of(flat_index)`` gives the logits at those flat positions. A chunk may span several
    buffers: it is unembedded once and each buffer reduces its own slice, so short sequences of a
    batch share the unembedding matmul.
    """
    sizes = [int(b.positions.shape[0]) for b in buffers]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)
    # words pooled so far whose last position lies in a later chunk: word -> running max
    running: list[dict[int, Tensor]] = [{} for _ in buffers]
    for f0 in range(0, total, chunk):
        f1 = min(total, f0 + chunk)
        logits = logits_of(torch.arange(f0, f1)).float()
        parts = [
            (i, max(f0, s) - s, min(f1, s + n) - s, max(f0, s) - f0)
            for i, (s, n) in enumerate(zip(starts, sizes, strict=True))
            if s < f1 and s + n > f0
        ]
        for i, c0, c1, a in parts:
            buffers[i]._pool_words(row, logits[a : a + c1 - c0], c0, c1, running[i], readout)
        # torch's own log_softmax (bit-equal to log_softmax of the model's logits); the raw
        # logits are dropped before the probabilities are made: at most two [chunk, vocab]
        # blocks are alive
        logprobs = torch.log_softmax(logits, dim=-1)
        del logits
        for i, c0, c1, a in parts:
            buffers[i]._reduce_positions(row, logprobs[a : a + c1 - c0], c0, c1, readout)
        del logprobs
    for b in buffers:
        b.filled[row] = True
