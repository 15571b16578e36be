"""Mismatched-word baseline for current-word Recall@k, computed from stored records alone.

Every spoken word's pooled top-k (``UtteranceRecord.top_ids``) is scored against the text target
(``UtteranceRecord.target_ids``) of a partner: another spoken word of the data set, drawn
uniformly among the words of a different type (word string), so a word is never scored against
itself or a repeat of itself. The draw depends only on the records (in order) and ``seed``. A
lens whose top-k holds the current word scores near 1 on Recall@k and near the rate at which an
unrelated word appears on this baseline: the gap is what the readout knows about the word.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from speech_lens.lens.records import UtteranceRecord

# a fixed second seed word, so the draw is independent of the bootstrap stream of the same seed
MISMATCH_STREAM = 17


def has_targets(records: Sequence[UtteranceRecord], match: str) -> bool:
    """True if every record stores its words' text targets under ``match`` (newer records)."""
    return all(match in r.target_ids for r in records)


def stored_k(records: Sequence[UtteranceRecord]) -> int:
    """How many pooled top ids every stored word has (the largest k the baseline can score)."""
    return min((len(top[0]) for r in records for top in r.top_ids), default=0)


def mismatched_partners(words: Sequence[str], seed: int) -> np.ndarray:
    """For each word (flat index), the index of a word of a different type, drawn uniformly."""
    types, inverse = np.unique(np.asarray(words, dtype=object), return_inverse=True)
    if len(types) < 2:
        raise ValueError(f"mismatched-word baseline: needs two word types, the data has {types}")
    n = len(words)
    order = np.argsort(inverse, kind="stable")  # words grouped by type: one block per type
    counts = np.bincount(inverse)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])[inverse]
    own = counts[inverse]
    rng = np.random.default_rng((seed, MISMATCH_STREAM))
    x = rng.integers(0, n - own)  # a position outside the word's own type block
    x = np.where(x >= start, x + own, x)
    return order[x]


def mismatched_hits(
    records: Sequence[UtteranceRecord], match: str, ks: Sequence[int], seed: int
) -> dict[int, np.ndarray]:
    """Per k, ``[utterance, row]`` counts of spoken words whose pooled top-k holds the partner's
    target ids (``mismatched_partners``) under ``match``. A k beyond the stored top-k length
    (``stored_k``) is left out: the records cannot score it."""
    if not has_targets(records, match):
        raise ValueError(f"mismatched-word baseline: records without target ids for {match!r}")
    words = [w for r in records for w in r.words]
    targets = [set(ids) for r in records for ids in r.target_ids[match]]
    partner = mismatched_partners(words, seed)
    rows = len(records[0].row_layers)
    hits = {int(k): np.zeros((len(records), rows)) for k in ks if k <= stored_k(records)}
    g = 0
    for i, r in enumerate(records):
        for j in range(len(r.words)):
            target = targets[partner[g]]
            top = r.top_ids[j]  # [row][stored k]
            for k, h in hits.items():
                h[i] += [any(t in target for t in ids[:k]) for ids in top]
            g += 1
    return hits
