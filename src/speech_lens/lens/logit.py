"""The streaming logit lens: every layer's residual read out through the model's own unembedding.

``logit_lens`` reads positions; ``word_lens`` also max-pools the lens logits over each spoken
word's unit positions (the paper's per-word readout) and ranks every candidate text token of the
word and of the next word, so any matching rule can be scored afterwards (``metrics.py``).
Both run a single ``run_with_hooks`` forward pass whose hooks reduce as they go (``hooks.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from speech_lens.hooks import (
    MASS_GROUPS,
    HiddenTransform,
    HookFn,
    LensBuffer,
    Readout,
    lens_hooks,
)
from speech_lens.prompts import SPEECH, EncodedPrompt, WordTarget

__all__ = ["LensResult", "WordLensResult", "logit_lens", "word_lens"]


@dataclass(frozen=True, eq=False)
class WordLensResult:
    """Per-layer readout of each spoken word, logits max-pooled over its unit positions.

    Rows are lens rows (0 = embeddings, ``n_layers`` = model output). ``topk_ids`` rank text ids
    only; ``cand_ranks[row, c]`` is how many text ids have a strictly higher pooled logit than
    candidate ``cand_ids[c]`` (0 = top-1), for the candidates of word ``cand_word[c]``.
    ``current[j]`` / ``next[j]`` are the targets of pooled word ``j`` (``next`` is None for the
    utterance's last word).
    """

    word_index: tuple[int, ...]
    words: tuple[str, ...]
    positions: tuple[Int[Tensor, " n"], ...]
    topk_ids: Int[Tensor, "row word k"]
    topk_logits: Float[Tensor, "row word k"]
    cand_ids: Int[Tensor, " n_cand"]
    cand_word: Int[Tensor, " n_cand"]
    cand_ranks: Int[Tensor, "row n_cand"]
    cand_logits: Float[Tensor, "row n_cand"]
    current: tuple[WordTarget, ...]
    next: tuple[WordTarget | None, ...]

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def from_buffer(
        cls,
        b: LensBuffer,
        word_index: tuple[int, ...],
        words: tuple[str, ...],
        current: tuple[WordTarget, ...],
        next: tuple[WordTarget | None, ...],
    ) -> WordLensResult:
        empty = torch.zeros(0, dtype=torch.long)
        return cls(
            word_index=word_index,
            words=words,
            positions=tuple(b.word_positions),
            topk_ids=b.word_topk_ids,
            topk_logits=b.word_topk_logits,
            cand_ids=b.cand_ids if b.cand_ids is not None else empty,
            cand_word=b.cand_word if b.cand_word is not None else empty,
            cand_ranks=b.cand_ranks,
            cand_logits=b.cand_logits,
            current=current,
            next=next,
        )

    def rank_of(self, j: int, ids: Sequence[int]) -> Int[Tensor, " row"]:
        """Best (smallest) pooled rank over ``ids`` for word ``j``, per row; -1 if ``ids`` empty."""
        if not ids:
            return torch.full((self.cand_ranks.shape[0],), -1, dtype=torch.long)
        sel = (self.cand_word == j) & torch.isin(self.cand_ids, torch.tensor(list(ids)))
        found = set(self.cand_ids[sel].tolist())
        if found != set(ids):
            raise KeyError(f"word {j} ({self.words[j]!r}): ids {set(ids) - found} were not ranked")
        return self.cand_ranks[:, sel].amin(dim=1)


@dataclass(frozen=True, eq=False)
class LensResult:
    """What every layer's residual decodes to, at each read position.

    Row ``i < n_layers`` is ``blocks.i.hook_resid_pre`` (row 0: the embeddings); row
    ``n_layers`` is the model's own output. ``topk_*`` rank text ids only, ``topk_*_all`` the
    whole vocabulary; log-probs, masses and ranks use the full softmax over the whole vocabulary.
    ``target_ranks`` count ids with a strictly higher log-prob (0 = top-1; -1 where no target).
    """

    tokens: Int[Tensor, " seq"]
    positions: Int[Tensor, " pos"]
    n_layers: int
    k: int
    topk_ids: Int[Tensor, "row pos k"]
    topk_logprobs: Float[Tensor, "row pos k"]
    topk_ids_all: Int[Tensor, "row pos k"]
    topk_logprobs_all: Float[Tensor, "row pos k"]
    mass: Float[Tensor, "row pos group"]
    target_ids: Int[Tensor, "pos n_targets"] | None = None
    target_ranks: Int[Tensor, "row pos n_targets"] | None = None
    target_logprobs: Float[Tensor, "row pos n_targets"] | None = None
    words: WordLensResult | None = None
    lens_name: str = "logit"

    @classmethod
    def from_buffer(
        cls,
        b: LensBuffer,
        tokens: Tensor,
        targets: Tensor | None = None,
        words: WordLensResult | None = None,
        lens_name: str = "logit",
    ) -> LensResult:
        return cls(
            tokens=tokens,
            positions=b.positions,
            n_layers=b.n_rows - 1,
            k=b.k,
            topk_ids=b.topk_ids,
            topk_logprobs=b.topk_logprobs,
            topk_ids_all=b.topk_ids_all,
            topk_logprobs_all=b.topk_logprobs_all,
            mass=b.mass,
            target_ids=targets,
            target_ranks=b.target_ranks,
            target_logprobs=b.target_logprobs,
            words=words,
            lens_name=lens_name,
        )

    @property
    def n_rows(self) -> int:
        return self.n_layers + 1

    @property
    def layer_labels(self) -> list[str]:
        return ["embed", *(str(i) for i in range(1, self.n_layers)), "output"]

    def group_mass(self, group: str) -> Float[Tensor, "row pos"]:
        return self.mass[..., MASS_GROUPS.index(group)]

    @property
    def unit_mass(self) -> Float[Tensor, "row pos"]:
        """Probability on speech-unit ids."""
        return self.group_mass("unit")

    @property
    def text_mass(self) -> Float[Tensor, "row pos"]:
        """Probability on text ids (every tokenizer id that is no unit, marker or control)."""
        return self.group_mass("text")

    @property
    def speech_mass(self) -> Float[Tensor, "row pos"]:
        """Probability on units plus prosody (pitch / style) ids."""
        return self.group_mass("speech")

    @property
    def marker_mass(self) -> Float[Tensor, "row pos"]:
        return self.group_mass("marker")

    @property
    def other_mass(self) -> Float[Tensor, "row pos"]:
        """Probability on control ids (BOS, EOS, chat tokens) and unused embedding rows."""
        return self.group_mass("other")


def _as_sequence(tokens: Tensor | Sequence[int]) -> Int[Tensor, " seq"]:
    t = torch.as_tensor(tokens, dtype=torch.long)
    if t.dim() == 2:
        if t.shape[0] != 1:
            raise ValueError(
                f"logit_lens reads one sequence at a time; got a batch of {t.shape[0]}"
            )
        t = t[0]
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(
            f"tokens must be a non-empty 1-D sequence of ids, got shape {tuple(t.shape)}"
        )
    return t


def _targets(targets: Tensor | str | None, tokens: Tensor) -> Tensor | None:
    if targets is None:
        return None
    if isinstance(targets, str):
        if targets != "next":
            raise ValueError(f"targets={targets!r}: pass id tensor [pos] / [pos, n] or 'next'")
        t = torch.full_like(tokens, -1)
        t[:-1] = tokens[1:]
        return t.unsqueeze(1)
    t = torch.as_tensor(targets, dtype=torch.long)
    if t.dim() == 1:
        t = t.unsqueeze(1)
    if t.dim() != 2 or t.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"targets must have shape [seq] or [seq, n] with seq={tokens.shape[0]}, "
            f"got {tuple(t.shape)}"
        )
    return t


def _run(
    model: Any,
    tokens: Tensor,
    buffer: LensBuffer,
    lens: HiddenTransform | None,
    fwd_hooks: Sequence[tuple[Any, HookFn]],
) -> None:
    model.require_eval()
    readout = Readout.of(model)
    hooks = lens_hooks(buffer, readout, lens)
    with torch.no_grad():
        # the user's hooks go first so that ours read what they wrote
        model.bridge.run_with_hooks(
            tokens.unsqueeze(0).to(model.device), fwd_hooks=[*fwd_hooks, *hooks]
        )
    if not bool(buffer.filled.all()):
        missing = (~buffer.filled).nonzero().squeeze(-1).tolist()
        raise RuntimeError(f"lens rows {missing} never fired (did a hook stop the forward early?)")


def logit_lens(
    model: Any,
    tokens: Tensor | Sequence[int],
    *,
    k: int = 10,
    targets: Tensor | str | None = None,
    lens: HiddenTransform | None = None,
    positions: Tensor | Sequence[int] | None = None,
    chunk_size: int | None = None,
    fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
) -> LensResult:
    """Logit lens (or, with ``lens=``, a tuned lens) over every layer of ``model`` on ``tokens``.

    ``targets``: ids ``[seq]`` or ``[seq, n]`` whose rank and log-prob are measured at every
    position (-1: none), or ``"next"`` for the next input token. ``positions``: the positions to
    read (default all). ``chunk_size``: positions unembedded at once (default: about 16M logits).
    ``fwd_hooks``: the caller's own hooks, run in the same forward pass before ours; hooks
    already attached with ``model.bridge.hooks()`` compose too.
    """
    seq = _as_sequence(tokens)
    pos = _positions(positions, seq)
    tg = _targets(targets, seq)
    buffer = LensBuffer(
        n_rows=model.n_layers + 1,
        positions=pos,
        k=_check_k(k, model),
        targets=None if tg is None else tg[pos],
        chunk_size=chunk_size,
    )
    _run(model, seq, buffer, lens, fwd_hooks)
    return LensResult.from_buffer(
        buffer, seq, None if tg is None else tg[pos], None, _lens_name(lens)
    )


def word_lens(
    model: Any,
    prompt: EncodedPrompt,
    targets: Sequence[WordTarget] | None = None,
    *,
    k: int = 10,
    lens: HiddenTransform | None = None,
    chunk_size: int | None = None,
    fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
) -> LensResult:
    """``logit_lens`` over all positions of ``prompt`` plus the pooled readout of its spoken words.

    ``targets`` holds one ``WordTarget`` per utterance word (``prompt.words``); by default they
    come from ``prompts.word_targets``. Each speech word's lens logits are max-pooled over its
    unit (SPEECH) positions; the pooled vector is ranked over text ids. Every sub-token of the
    word and of the next word (spaced and bare forms) is ranked, so every matching rule in
    ``metrics.MATCH_RULES`` can be scored from the result.
    """
    if targets is None:
        from speech_lens import prompts

        make = getattr(prompts, "word_targets", None)
        if make is None:
            raise ValueError("word_lens: pass targets (prompts.word_targets is not available)")
        targets = make(model, prompt.words)
    targets = list(targets)
    if len(targets) != len(prompt.words):
        raise ValueError(
            f"utterance {prompt.utterance_id}: {len(targets)} word targets for "
            f"{len(prompt.words)} words"
        )
    seq = _as_sequence(prompt.tokens)
    spans = list(prompt.speech_spans())
    word_pos: list[Tensor] = []
    idx: list[int] = []
    cur: list[WordTarget] = []
    nxt: list[WordTarget | None] = []
    cand_ids: list[int] = []
    cand_word: list[int] = []
    for s in spans:
        units = [p for p in s.positions if prompt.kind[p] == SPEECH]
        if not units:
            raise ValueError(
                f"utterance {prompt.utterance_id}: spoken word {s.index} ({s.text!r}) has no "
                f"unit positions in {s.start}..{s.end - 1}"
            )
        j = len(word_pos)
        word_pos.append(torch.tensor(units, dtype=torch.long))
        idx.append(s.index)
        c = targets[s.index]
        n = targets[s.index + 1] if s.index + 1 < len(targets) else None
        cur.append(c)
        nxt.append(n)
        ids = {*c.spaced, *c.bare}
        if n is not None:
            ids |= {*n.spaced, *n.bare}
        for i in sorted(ids):
            cand_ids.append(i)
            cand_word.append(j)
    buffer = LensBuffer(
        n_rows=model.n_layers + 1,
        positions=torch.arange(seq.shape[0]),
        k=_check_k(k, model),
        word_positions=word_pos,
        cand_ids=torch.tensor(cand_ids, dtype=torch.long),
        cand_word=torch.tensor(cand_word, dtype=torch.long),
        chunk_size=chunk_size,
    )
    _run(model, seq, buffer, lens, fwd_hooks)
    words = WordLensResult.from_buffer(
        buffer, tuple(idx), tuple(s.text for s in spans), tuple(cur), tuple(nxt)
    )
    return LensResult.from_buffer(buffer, seq, None, words, _lens_name(lens))


def _check_k(k: int, model: Any) -> int:
    n_text = int(model.layout.text_mask.sum())
    if not 1 <= k <= n_text:
        raise ValueError(f"k={k} must be between 1 and the {n_text} text ids of the model")
    return int(k)


def _positions(positions: Tensor | Sequence[int] | None, seq: Tensor) -> Tensor:
    n = int(seq.shape[0])
    if positions is None:
        return torch.arange(n)
    p = torch.as_tensor(positions, dtype=torch.long).flatten()
    p = torch.where(p < 0, p + n, p)
    if p.numel() == 0 or int(p.min()) < 0 or int(p.max()) >= n:
        raise ValueError(f"positions {positions} out of range for a sequence of {n} tokens")
    return torch.unique(p)  # sorted


def _lens_name(lens: HiddenTransform | None) -> str:
    return "logit" if lens is None else type(lens).__name__
