"""Current-word ranks read at a spoken word's first unit position alone and at its last alone.

A confound of pooled current-word Recall@k: at a word's onset the model predicts the *next*
token, which in text space is the current word itself, so a lens can "transcribe" a word at its
first unit without having heard it. Recall@k from the first unit vs from the last unit tells
the two apart (issue 17 §1): a readout that holds the word only once its units have been heard
scores on the last unit, one that guesses it from the context scores on the first.

Computed while the run still holds the ``word_lens`` result (no extra forward pass and nothing
per position kept in the records): the result's per-position text top-k (``topk_ids``,
``topk_logprobs``, the run's ``k``) at the word's first and last unit position gives each match
rule's rank, stored per word and row (``UtteranceRecord.unit_ranks``). Ranks are pessimistic as
everywhere (``numerics.TIE_RULE``): the number of *listed* text ids whose log-prob is >= the
target's. The list shows only k ids, so a rank of k or more is stored as ``k`` ("not in the top
k"), and so is a target in a tie group that reaches the end of the list (ids beyond it may tie
too). A single-unit word's first- and last-unit ranks are its pooled rank (up to the float
rounding of log-probs vs logits), when that rank is below k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from speech_lens.lens.results import LensResult

EDGES = ("first", "last")  # the unit position a rank is read at, in UtteranceRecord.unit_ranks


def listed_rank(ids: Tensor, logprobs: Tensor, targets: Sequence[int]) -> Tensor:
    """Per row, the pessimistic rank of the best of ``targets`` among a top-k list (``ids``,
    ``logprobs``: ``[row, k]``, best first; ``-1`` ids pad a list shorter than k), or ``k``
    where no target is listed or the target's tie group reaches the list's end."""
    k = ids.shape[1]
    valid = ids >= 0
    hit = torch.isin(ids, torch.tensor(list(targets), dtype=ids.dtype)) & valid
    found = hit.any(1)
    v = logprobs.masked_fill(~hit, float("-inf")).amax(1, keepdim=True)  # the best target
    ge = (logprobs >= v) & valid
    rank = ge.sum(1) - 1  # listed ids >= the target, the target itself not counted
    # the tie group (other ids == v) touches the last listed slot: ids beyond it may tie too
    last = valid.sum(1).clamp(min=1) - 1
    n_tied = ((logprobs == v) & valid).sum(1)
    at_end = ge.gather(1, last[:, None])[:, 0] & (n_tied > 1) & (valid.sum(1) == k)
    return torch.where(found & ~at_end, rank, torch.full_like(rank, k))


def unit_edge_ranks(
    result: LensResult, targets: dict[str, list[list[int]]]
) -> dict[str, dict[str, list[list[int]]]]:
    """``rule -> {"first" | "last" -> [word][row] rank}`` of each pooled word's current-word
    ``targets[rule][j]`` (its hit ids) at its first / last unit position (module doc)."""
    w = result.words
    if w is None:
        raise ValueError("unit_edge_ranks needs a word_lens result")
    out: dict[str, dict[str, list[list[int]]]] = {r: {e: [] for e in EDGES} for r in targets}
    for j, pos in enumerate(w.positions):
        for edge, p in zip(EDGES, (pos.min(), pos.max()), strict=True):
            col = int(torch.searchsorted(result.positions, p.reshape(1)))
            if col >= len(result.positions) or int(result.positions[col]) != int(p):
                raise ValueError(f"word {j} ({w.words[j]!r}): unit position {int(p)} was not read")
            ids, lp = result.topk_ids[:, col], result.topk_logprobs[:, col]
            for rule, per_word in targets.items():
                out[rule][edge].append(listed_rank(ids, lp, per_word[j]).tolist())
    return out


def edge_hits(
    ranks: Sequence[Sequence[Sequence[int]]], n_rows: int, ks: Sequence[int]
) -> dict[int, np.ndarray]:
    """Per k, ``[utterance, row]`` counts of words whose rank at one unit position is below k;
    ``ranks[u][j][row]``: utterance u's ``unit_ranks[rule][edge]``."""
    arrays = [np.asarray(r, dtype=np.int64).reshape(-1, n_rows) for r in ranks]
    return {
        int(k): np.stack([((a >= 0) & (a < k)).sum(0) for a in arrays]).astype(np.float64)
        for k in ks
    }
