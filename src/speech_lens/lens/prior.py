"""Frequency prior of word Recall@k: what a readout that ignores its input scores, from records.

The prior is a fixed top-k list of text ids, the same at every layer and every word: the k ids
that hit the most words of the data set's *other* utterances (leave one utterance out, so an
utterance's own words never choose its list: a list fit on the scored words themselves would
leak them). A word is hit, as in Recall@k, when one of its hit ids under the match rule
(``UtteranceRecord.target_ids`` for the current word, ``next_target_ids`` for the next) is in
the list. The list is built greedily: each next id is the one whose words, not hit by an id
listed before, are the most (ties: the smaller id). Where every word has a single hit id (every
rule but ``first`` / ``any`` on byte-level BPE, where the spaced and the bare form differ), this
is exactly the k most frequent target tokens; with two ids per word it does not spend two slots
on one word. The current-word prior counts the spoken words current-word Recall@k scores, the
next-word prior the next words next-word Recall@k scores, each over the same words and the same
denominator as the recall it accompanies (a word without unit position scored as a miss under
``zero_unit_words="miss"`` is a miss of the prior too: its ids are not recorded).

Given a training manifest (``speech-lens lens --prior-manifest TRAIN.jsonl``,
:func:`manifest_prior`) the list is fit once on its words instead (every word for the current-word prior, every word
after another for the next-word prior) and scores every utterance alike: the prior of a model's
own training text, as the organisms' gates define it. ``DatasetMetrics.prior_source`` says which.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from speech_lens.data.utterance import Utterance
from speech_lens.data.word_targets import word_targets
from speech_lens.lens.records import MATCH_RULES, UtteranceRecord, match_ids

WHICH = ("current", "next")
LEAVE_ONE_OUT = "leave-one-utterance-out"  # DatasetMetrics.prior_source without a training manifest


def word_targets_of(
    records: Sequence[UtteranceRecord], match: str, which: str
) -> list[list[tuple[int, ...]]]:
    """Per utterance, the hit ids of every word the ``which`` recall scores (sorted tuples)."""
    if which not in WHICH:
        raise ValueError(f"which={which!r}: one of {WHICH}")
    out = []
    for r in records:
        ids = r.target_ids[match] if which == "current" else r.next_target_ids[match]
        out.append([tuple(sorted(set(t))) for t in ids if t])
    return out


def has_prior_targets(records: Sequence[UtteranceRecord], match: str, which: str) -> bool:
    """True if every record stores the hit ids the ``which`` prior scores (newer records)."""
    field = "target_ids" if which == "current" else "next_target_ids"
    return all(match in getattr(r, field) for r in records)


def greedy_list(
    weights: np.ndarray, pair_key: np.ndarray, pair_id: np.ndarray, n_ids: int, k: int
) -> list[int]:
    """Indices of up to ``k`` ids, greedily: each covers the most weight of keys (word hit-id
    sets) not covered before; ``(pair_key, pair_id)`` lists which id each key holds."""
    covered = np.zeros(len(weights), dtype=bool)
    chosen: list[int] = []
    for _ in range(k):
        score = np.bincount(
            pair_id, weights=np.where(covered, 0.0, weights)[pair_key], minlength=n_ids
        )
        best = int(np.argmax(score))  # the first maximum: the smallest id among ties
        if score[best] <= 0:
            break  # nothing of the other utterances left to hit
        chosen.append(best)
        covered[pair_key[pair_id == best]] = True
    return chosen


HitIds = tuple[int, ...]  # one word's hit ids under a match rule, sorted


@dataclass(frozen=True)
class FittedPrior:
    """Word counts of a training manifest, by match rule and word (``"current"``: every word,
    ``"next"``: every word after another), the prior's list is fit on; ``source`` names it."""

    source: str
    counts: dict[str, dict[str, Counter[HitIds]]]


def manifest_prior(model: Any, utterances: Iterable[Utterance], source: str) -> FittedPrior:
    """The word counts of ``utterances`` (a training manifest) in ``model``'s hit ids."""
    current: Counter[str] = Counter()
    following: Counter[str] = Counter()
    for u in utterances:
        current.update(w.text for w in u.words)
        following.update(w.text for w in u.words[1:])
    if not current:
        raise ValueError(f"{source}: no words to count for the frequency prior")
    words = sorted(current)
    targets = dict(zip(words, word_targets(model, words), strict=True))
    counts: dict[str, dict[str, Counter[HitIds]]] = {}
    for rule in MATCH_RULES:
        ids = {w: tuple(sorted(set(match_ids(targets[w], rule)))) for w in words}
        counts[rule] = {"current": Counter(), "next": Counter()}
        for which, by_word in (("current", current), ("next", following)):
            for w, n in by_word.items():
                counts[rule][which][ids[w]] += n
    return FittedPrior(source, counts)


def key_pairs(keys: Sequence[HitIds]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The ids held by ``keys`` (sorted) and, per (key, id) pair, the key's and the id's index."""
    key_of = {t: i for i, t in enumerate(keys)}
    ids = sorted({i for t in keys for i in t})
    id_of = {i: n for n, i in enumerate(ids)}
    pair_key = np.array([key_of[t] for t in keys for _ in t], dtype=np.int64)
    pair_id = np.array([id_of[i] for t in keys for i in t], dtype=np.int64)
    return ids, pair_key, pair_id


def prior_lists(
    records: Sequence[UtteranceRecord],
    match: str,
    which: str,
    k: int,
    fitted: FittedPrior | None = None,
) -> list[list[int]]:
    """Per utterance, the prior's top-k token ids fit on the other utterances, or on the
    ``fitted`` training counts, one list for all (module doc)."""
    if fitted is not None:
        counts = fitted.counts[match][which]
        keys = sorted(counts)
        ids, pair_key, pair_id = key_pairs(keys)
        weights = np.array([counts[t] for t in keys], dtype=np.float64)
        listed = [ids[n] for n in greedy_list(weights, pair_key, pair_id, len(ids), k)]
        return [listed for _ in records]
    per_utt = word_targets_of(records, match, which)
    keys = sorted({t for ts in per_utt for t in ts})
    key_of = {t: i for i, t in enumerate(keys)}
    ids, pair_key, pair_id = key_pairs(keys)
    total = np.zeros(len(keys))
    own = [Counter(key_of[t] for t in ts) for ts in per_utt]
    for c in own:
        for key, n in c.items():
            total[key] += n
    lists = []
    for c in own:
        w = total.copy()
        for key, n in c.items():
            w[key] -= n  # leave this utterance out
        lists.append([ids[n] for n in greedy_list(w, pair_key, pair_id, len(ids), k)])
    return lists


def prior_hits(
    records: Sequence[UtteranceRecord],
    match: str,
    which: str,
    ks: Sequence[int],
    fitted: FittedPrior | None = None,
) -> dict[int, np.ndarray]:
    """Per k, ``[utterance, row]`` counts of the words whose hit ids meet the utterance's prior
    list (the same at every row: the prior reads no layer)."""
    ks = [int(k) for k in ks]
    per_utt = word_targets_of(records, match, which)
    lists = prior_lists(records, match, which, max(ks, default=0), fitted)
    rows = len(records[0].unit_top1)  # the lens rows the records hold
    hits = {k: np.zeros((len(records), rows)) for k in ks}
    for i, (targets, listed) in enumerate(zip(per_utt, lists, strict=True)):
        slot = {t: n for n, t in enumerate(listed)}  # id -> its list position
        # a word none of whose ids is listed is a miss at every k (the list may be short)
        first = [min((slot[t] for t in ts if t in slot), default=math.inf) for ts in targets]
        for k, h in hits.items():
            h[i] = sum(1 for s in first if s < k)
    return hits
