"""One utterance's lens record: word ranks under every match rule, masses and registered
metrics summed over its speech positions (what a run appends per utterance, so it can resume)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from speech_lens.data.encoded import SPEECH, EncodedPrompt, WordTarget
from speech_lens.lens.registry import LENS_METRICS, MASS_METRICS, UNIT_TOP1
from speech_lens.lens.results import LensResult
from speech_lens.lens.unit_edges import unit_edge_ranks
from speech_lens.vocab import VocabLayout

MATCH_RULES = ("first", "first-spaced", "first-bare", "any")


DEFAULT_MATCH = "first"


def match_ids(target: WordTarget, rule: str = DEFAULT_MATCH) -> tuple[int, ...]:
    """The token ids that count as a hit for ``target`` under ``rule``."""
    if rule == "first":
        ids = [*target.spaced[:1], *target.bare[:1]]
    elif rule == "first-spaced":
        ids = list(target.spaced[:1])
    elif rule == "first-bare":
        ids = list(target.bare[:1])
    elif rule == "any":
        ids = [*target.spaced, *target.bare]
    else:
        raise ValueError(f"unknown match rule {rule!r}; one of {MATCH_RULES}")
    if not ids:
        raise ValueError(f"word {target.word!r} has no tokens under match rule {rule!r}")
    return tuple(dict.fromkeys(ids))


@dataclass(frozen=True)
class UtteranceRecord:
    """Everything the dataset metrics need from one utterance; JSON-serialisable.

    ``ranks[rule]["current" | "next"][j][row]``: pooled text rank of spoken word ``j`` under
    ``rule`` (0 = top-1; -1 for "next" of the utterance's last word). ``top_ids[j][row]``: the
    pooled top-k text ids. ``mass_sums[group][row]``: probability mass summed over the speech
    (unit) positions; ``unit_top1[row]``: how many of them have a speech unit as top-1 overall.
    ``words_without_units``: utterance word indices of spoken words with no unit position (not
    in ``words``); ``n_utterance_words``: the utterance's word count (which of them have a next
    word). ``target_ids[rule][j]``: the token ids that count as a hit for spoken word ``j`` under
    ``rule`` (``match_ids``; empty in records written before the mismatched-word baseline).
    ``layers``: the lens rows read (true indices, 0 = embeddings, ``n_layers`` = output), one per
    ``[row]`` entry above; empty in records written before layer selection (every row).
    ``next_target_ids[rule][j]``: the same for the word after spoken word ``j`` (empty for the
    utterance's last word), which the next-word frequency prior scores (``lens/prior.py``).
    ``unit_ranks[rule]["first" | "last"][j][row]``: the current word's rank read at word ``j``'s
    first / last unit position alone, ``k`` meaning "not in the top k" (``lens/unit_edges.py``).
    Both are empty in records written before them.
    """

    utterance_id: str
    n_layers: int
    layers: list[int] = field(default_factory=list, kw_only=True)
    words: list[str]
    word_index: list[int]
    next_words: list[str]
    ranks: dict[str, dict[str, list[list[int]]]]
    top_ids: list[list[list[int]]]
    mass_sums: dict[str, list[float]]
    unit_top1: list[int]
    n_speech_positions: int
    words_without_units: list[int] = field(default_factory=list)
    n_utterance_words: int = 0
    # registered (non-built-in) speech-position metrics: name -> row sums (lens/registry.py)
    position_sums: dict[str, list[float]] = field(default_factory=dict)
    # rule -> per spoken word its hit ids: what the mismatched-word baseline scores (lens/mismatch)
    target_ids: dict[str, list[list[int]]] = field(default_factory=dict)
    # confounds of the measurement (issue 17 §1): next-word hit ids and first/last-unit ranks
    next_target_ids: dict[str, list[list[int]]] = field(default_factory=dict)
    unit_ranks: dict[str, dict[str, list[list[int]]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["position_sums"]:
            del d["position_sums"]  # the record format without registered metrics is unchanged
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> UtteranceRecord:
        return cls(**d)

    @property
    def row_layers(self) -> list[int]:
        """The lens row of each ``[row]`` entry (every row for records without ``layers``)."""
        return list(self.layers) or list(range(self.n_layers + 1))

    def rank_array(self, rule: str, which: str) -> np.ndarray:
        """``[row, word]`` ranks (-1 = no target)."""
        r = self.ranks[rule][which]
        if not r:
            return np.zeros((len(self.row_layers), 0), dtype=np.int64)
        return np.asarray(r, dtype=np.int64).T


def utterance_record(
    result: LensResult, prompt: EncodedPrompt, layout: VocabLayout
) -> UtteranceRecord:
    """Reduce a ``word_lens`` result on ``prompt`` to an :class:`UtteranceRecord`."""
    w = result.words
    if w is None:
        raise ValueError(
            f"utterance {prompt.utterance_id}: the lens result has no word readout (use word_lens)"
        )
    # only unit positions are read here, so a lens restricted to them (positions="speech") will do
    speech = prompt.positions_of(SPEECH)
    col = torch.searchsorted(result.positions, speech).clamp(max=len(result.positions) - 1)
    if not torch.equal(result.positions[col], speech):
        raise ValueError(f"utterance {prompt.utterance_id}: the lens must read every unit position")
    ranks: dict[str, dict[str, list[list[int]]]] = {}
    for rule in MATCH_RULES:
        cur = [w.rank_of(j, match_ids(t, rule)).tolist() for j, t in enumerate(w.current)]
        nxt = [
            w.rank_of(j, match_ids(t, rule)).tolist() if t is not None else [-1] * result.n_rows
            for j, t in enumerate(w.next)
        ]
        ranks[rule] = {"current": cur, "next": nxt}
    targets = {rule: [list(match_ids(t, rule)) for t in w.current] for rule in MATCH_RULES}
    next_targets = {
        rule: [list(match_ids(t, rule)) if t is not None else [] for t in w.next]
        for rule in MATCH_RULES
    }
    sums, unit_top1, others = position_sums(result, col, layout)
    return UtteranceRecord(
        utterance_id=prompt.utterance_id,
        n_layers=result.n_layers,
        layers=list(result.row_layers),
        words=list(w.words),
        word_index=list(w.word_index),
        next_words=[t.word if t is not None else "" for t in w.next],
        ranks=ranks,
        top_ids=[w.topk_ids[:, j].tolist() for j in range(len(w))],
        mass_sums=sums,
        unit_top1=unit_top1,
        n_speech_positions=int(speech.numel()),
        words_without_units=list(w.no_unit_words),
        n_utterance_words=len(prompt.words),
        position_sums=others,
        target_ids=targets,
        next_target_ids=next_targets,
        unit_ranks=unit_edge_ranks(result, targets),
    )


def position_sums(
    result: LensResult, columns: torch.Tensor, layout: VocabLayout
) -> tuple[dict[str, list[float]], list[int], dict[str, list[float]]]:
    """Every registered speech-position metric summed over the speech positions, per row:
    (group masses, unit top-1 counts, other metrics by name)."""
    masses: dict[str, list[float]] = {}
    unit_top1: list[int] = []
    others: dict[str, list[float]] = {}
    for name, metric in LENS_METRICS.items():
        values = metric.values(result, columns, layout)  # [row, n_speech]
        if name == UNIT_TOP1:
            unit_top1 = [int(x) for x in values.sum(1).tolist()]
        elif name in MASS_METRICS:
            masses[MASS_METRICS[name]] = values.double().sum(1).tolist()
        else:
            others[name] = values.double().sum(1).tolist()
    return masses, unit_top1, others
