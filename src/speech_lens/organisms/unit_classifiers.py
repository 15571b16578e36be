"""Unit -> word classifiers: can a word be recognised from its unit string at all (gate G1)?

A property of a unit set, not of a model: if these classifiers are weak, no LM trained on the
units can transcribe. Both are trained on (unit string, word) tokens and predict a word for a
held-out unit string:

* ``NearestString``: edit-distance 1-nearest neighbour over the distinct training strings,
  exact (every string within the minimal distance is found); the strings at the minimal distance
  vote with their training token counts per word, so at distance 0 a string takes its majority
  word (homophones go to the more frequent word), and ties between strings are not broken by
  their order.
* ``BigramBayes``: a bag of unit bigrams (with word-boundary symbols, so a one-unit word has two
  features), multinomial naive Bayes with add-one smoothing and the training word frequencies as
  the prior. No parameter was tuned on held-out data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

Example = tuple[tuple[int, ...], str]  # (unit string, word)


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (unit insertions, deletions, substitutions cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def edit_distances(query: Sequence[int], candidates: np.ndarray) -> np.ndarray:
    """Levenshtein distance from ``query`` to every row of ``candidates`` [N, L] (all of length
    L), one dynamic-programming row per query unit, vectorised over candidates. Insertions along
    a row are a running minimum: cur[j] = j + min_{k <= j} (t[k] - k)."""
    n, length = candidates.shape
    ar = np.arange(length + 1)
    prev = np.broadcast_to(ar, (n, length + 1))
    for i, q in enumerate(query, 1):
        t = np.empty((n, length + 1), dtype=np.int64)
        t[:, 0] = i
        t[:, 1:] = np.minimum(prev[:, 1:] + 1, prev[:, :-1] + (candidates != q))
        prev = np.minimum.accumulate(t - ar, axis=1) + ar
    return np.asarray(prev[:, length])


@dataclass(frozen=True)
class NearestString:
    """Edit-distance 1-NN (see the module docstring). Build with ``NearestString.fit``."""

    by_length: dict[int, tuple[np.ndarray, list[Counter[str]]]]  # strings [N, L], their votes

    @classmethod
    def fit(cls, examples: Iterable[Example]) -> NearestString:
        votes: dict[tuple[int, ...], Counter[str]] = {}
        for s, w in examples:
            if not s:
                raise ValueError(f"training word {w!r} has an empty unit string")
            votes.setdefault(tuple(s), Counter())[w] += 1
        groups: dict[int, list[tuple[int, ...]]] = {}
        for s in votes:
            groups.setdefault(len(s), []).append(s)
        return cls(
            {
                n: (np.array(ss, dtype=np.int64), [votes[s] for s in ss])
                for n, ss in sorted(groups.items())
            }
        )

    def nearest(self, query: Sequence[int]) -> tuple[int, Counter[str]]:
        """(minimal edit distance, summed word votes of the training strings at it)."""
        m = len(query)
        best, votes = None, Counter[str]()
        radius = 2  # lengths differing by more than the distance cannot reach it
        done: set[int] = set()
        while True:
            for n in sorted(self.by_length, key=lambda n: abs(n - m)):
                if abs(n - m) > radius or n in done:
                    continue
                done.add(n)
                strings, counters = self.by_length[n]
                d = edit_distances(query, strings)
                low = int(d.min())
                if best is None or low < best:
                    best, votes = low, Counter()
                if low == best:
                    for i in np.flatnonzero(d == low):
                        votes.update(counters[i])
            if best is None:
                raise ValueError("NearestString has no training strings")
            if best <= radius or len(done) == len(self.by_length):
                return best, votes
            radius = best

    def predict(self, query: Sequence[int]) -> str:
        _, votes = self.nearest(query)
        return max(sorted(votes), key=lambda w: votes[w])  # ties: alphabetical, not by order


@dataclass(frozen=True)
class BigramBayes:
    """Multinomial naive Bayes over unit bigrams (see the module docstring)."""

    words: tuple[str, ...]
    log_prior: np.ndarray  # [words]
    log_prob: np.ndarray  # [words, features]
    n_units: int

    @staticmethod
    def features(s: Sequence[int], n_units: int) -> np.ndarray:
        """Bigram feature indices of ``<s> s </s>`` (<s> = n_units, </s> = n_units + 1)."""
        if any(not 0 <= u < n_units for u in s):
            raise ValueError(f"unit string {list(s)} has ids outside 0..{n_units - 1}")
        seq = np.array([n_units, *s, n_units + 1])
        return seq[:-1] * (n_units + 2) + seq[1:]

    @classmethod
    def fit(cls, examples: Iterable[Example], n_units: int, alpha: float = 1.0) -> BigramBayes:
        rows: dict[str, np.ndarray] = {}
        tokens: Counter[str] = Counter()
        n_feat = (n_units + 2) ** 2
        for s, w in examples:
            row = rows.setdefault(w, np.zeros(n_feat))
            np.add.at(row, cls.features(s, n_units), 1.0)
            tokens[w] += 1
        words = tuple(sorted(rows))
        counts = np.stack([rows[w] for w in words]) + alpha
        prior = np.array([tokens[w] for w in words], dtype=float)
        return cls(
            words,
            np.log(prior / prior.sum()),
            np.log(counts / counts.sum(1, keepdims=True)),
            n_units,
        )

    def predict(self, query: Sequence[int]) -> str:
        score = self.log_prior + self.log_prob[:, self.features(query, self.n_units)].sum(1)
        return self.words[int(np.argmax(score))]


def accuracy(predict: Callable[[tuple[int, ...]], str], test: Sequence[Example]) -> float:
    """Share of test tokens whose predicted word is the true one (each distinct string once)."""
    cache: dict[tuple[int, ...], str] = {}
    hits = 0
    for s, w in test:
        key = tuple(s)
        if key not in cache:
            cache[key] = predict(key)
        hits += cache[key] == w
    return hits / max(1, len(test))
