"""Lens results: frozen per-prompt and per-word readouts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from speech_lens.data.encoded import WordTarget
from speech_lens.lens.readout import MASS_GROUPS, LensBuffer


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
    no_unit_words: tuple[int, ...] = ()
    n_utterance_words: int = 0

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
        no_unit_words: tuple[int, ...] = (),
        n_utterance_words: int = 0,
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
            no_unit_words=no_unit_words,
            n_utterance_words=n_utterance_words,
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
    whole vocabulary; log-probs, masses and ranks use the full softmax over the whole vocabulary,
    read out in float32 whatever the model's dtype (:mod:`speech_lens.readout`).
    ``target_ranks`` count the other ids with a log-prob >= the target's (0 = strictly top-1;
    ties count against the target; -1 where no target).
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
    # lens rows held (``layers=`` subset), one per array row; None: all ``n_layers + 1``
    layers: tuple[int, ...] | None = None

    @classmethod
    def from_buffer(
        cls,
        b: LensBuffer,
        tokens: Tensor,
        targets: Tensor | None = None,
        words: WordLensResult | None = None,
        lens_name: str = "logit",
        n_layers: int | None = None,
    ) -> LensResult:
        n = b.n_rows - 1 if n_layers is None else int(n_layers)
        return cls(
            tokens=tokens,
            positions=b.positions,
            n_layers=n,
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
            layers=None if b.layers == tuple(range(n + 1)) else b.layers,
        )

    @property
    def n_rows(self) -> int:
        return len(self.row_layers)

    @property
    def row_layers(self) -> tuple[int, ...]:
        """The lens row (0 = embeddings, ``n_layers`` = output) of each array row."""
        return tuple(range(self.n_layers + 1)) if self.layers is None else self.layers

    def row_of(self, layer: int) -> int:
        """Array row holding lens row ``layer``."""
        try:
            return self.row_layers.index(int(layer))
        except ValueError:
            raise KeyError(f"lens row {layer} was not computed (rows {self.row_layers})") from None

    @property
    def layer_labels(self) -> list[str]:
        n = self.n_layers
        return ["embed" if i == 0 else "output" if i == n else str(i) for i in self.row_layers]

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
