"""U0 units: the phonetic class table, unit noise as a dose, the unit->word classifiers (G1)."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from speech_lens.organisms import knowledge, u0
from speech_lens.organisms.unit_classifiers import (
    BigramBayes,
    NearestString,
    accuracy,
    edit_distance,
    edit_distances,
)

ROOT = Path(__file__).resolve().parents[1]
LEXICON = u0.load_lexicon(ROOT / "organisms" / "u0_lexicon.json")
# one unit of each of the 7 classes: consecutive classes differ, so an output parses uniquely
# into the groups each original unit produced (0, 1 or 2 units of its own class)
SEVEN = [u0.U0_INDEX[p] for p in ("ɪ", "t", "s", "n", "l", "tʃ", "aɪ")]


def within(k: int, n: int, q: float, sigmas: float = 4.5) -> bool:
    """k successes of n is within ``sigmas`` binomial standard deviations of n q."""
    return abs(k - n * q) <= sigmas * math.sqrt(n * q * (1 - q))


def test_class_table_partitions_the_u0_inventory() -> None:
    shipped = json.loads((ROOT / "organisms" / "minisims" / "u0_units.json").read_text())
    assert tuple(shipped["phonemes"]) == u0.U0_PHONEMES  # the same unit ids as mini-SIMS
    flat = [p for ps in u0.PHONEME_CLASSES.values() for p in ps]
    assert len(flat) == len(set(flat)) == 59 and set(flat) == set(u0.U0_PHONEMES)
    assert min(len(ps) for ps in u0.PHONEME_CLASSES.values()) >= 2  # a substitute always exists
    for u, others in enumerate(u0.CLASS_OTHERS):
        assert u not in others
        assert {u0.CLASS_OF[u0.U0_PHONEMES[o]] for o in others} == {u0.CLASS_OF[u0.U0_PHONEMES[u]]}


def test_p0_is_the_identity() -> None:
    noise = u0.UnitNoise(0.0, seed=3)
    for i, (w, units) in enumerate(LEXICON.items()):
        raw, e = noise.edit(units, f"utt-{i}", i % 5)
        assert raw == units and e.substituted == e.deleted == e.inserted == e.restored == 0, w
        assert noise(units, f"utt-{i}", i % 5) == u0.dedup(units)


@pytest.mark.parametrize("p", [0.1, 0.35, 0.5])
def test_rates_match_the_dose_measured_from_the_outputs(p: float) -> None:
    """Parse each output into per-unit groups by class (an independent count, not the
    function's own EditCounts) and compare group frequencies with their probabilities."""
    noise = u0.UnitNoise(p, seed=11)
    n = 3000
    groups: Counter[str] = Counter()
    for occ in range(n):
        raw, _ = noise.edit(SEVEN, "utt", occ)
        classes = [u0.CLASS_INDEX[u] for u in raw]
        k = 0
        for orig in SEVEN:  # the units of this original's class, in order
            g = []
            while k < len(raw) and classes[k] == u0.CLASS_INDEX[orig]:
                g.append(raw[k])
                k += 1
            assert len(g) <= 2, (occ, raw)
            if len(g) == 2:
                assert g[1] != orig  # an insertion differs from the unit it follows
            kind = {0: "empty", 2: "two"}.get(len(g), "same" if g and g[0] == orig else "other")
            groups[kind] += 1
        assert k == len(raw), f"occurrence {occ}: units outside the classes of the word {raw}"
    total = 7 * n
    q = p / 4
    assert within(groups["same"], total, (1 - 1.25 * p) * (1 - q))
    assert within(groups["empty"], total, q * (1 - q))  # deleted, nothing inserted
    assert within(groups["two"], total, (1 - q) * q)  # kept or substituted, then an insertion
    assert within(groups["other"], total, p * (1 - q) + q * q)  # substituted (or del + ins)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.35, 0.5])
def test_reported_edit_counts_are_binomial_at_p_and_p_over_4(p: float) -> None:
    noise = u0.UnitNoise(p, seed=5)
    total: Counter[str] = Counter()
    for i, units in enumerate(LEXICON.values()):
        for occ in range(4):
            raw, e = noise.edit(units, i, occ)
            assert len(raw) == e.units - e.deleted + e.inserted + e.restored
            total.update(e.__dict__)
    n = total["units"]
    assert n > 15000
    assert within(total["substituted"], n, p)
    assert within(total["deleted"], n, p / 4)
    assert within(total["inserted"], n, p / 4)


def test_substitutions_stay_within_class() -> None:
    noise = u0.UnitNoise(0.5, seed=2)
    for name, phonemes in u0.PHONEME_CLASSES.items():
        word = [u0.U0_INDEX[p] for p in phonemes] * 2
        members = set(word)
        for occ in range(200):
            raw, _e = noise.edit(word, name, occ)
            assert set(raw) <= members, (name, raw)
    with pytest.raises(ValueError, match="'q'"):
        u0.phoneme_ids(["k", "q"], "kq")


def test_noise_is_deterministic_per_seed_utterance_and_occurrence() -> None:
    units = LEXICON["gentleman"]
    a = u0.UnitNoise(0.5, seed=1)
    draws = {(s, utt, occ): u0.UnitNoise(0.5, seed=s).edit(units, utt, occ)[0]
             for s in (1, 2) for utt in ("train-00001", "train-00002") for occ in range(30)}  # fmt: skip
    assert all(a.edit(units, utt, occ)[0] == draws[(1, utt, occ)]
               for utt in ("train-00001", "train-00002") for occ in range(30))  # fmt: skip
    seqs = list(draws.values())
    assert len({tuple(x) for x in seqs}) > 30  # seeds, utterances and occurrences all matter
    for occ in range(30):  # coupled across doses: substitutions at p are also made at p' > p
        _lo, e_lo = u0.UnitNoise(0.1, seed=1).edit(units, "u", occ)
        _hi, e_hi = u0.UnitNoise(0.5, seed=1).edit(units, "u", occ)
        assert e_lo.substituted + e_lo.deleted <= e_hi.substituted + e_hi.deleted
    with pytest.raises(ValueError, match="unit noise p"):
        u0.UnitNoise(0.9)
    with pytest.raises(ValueError, match="no units"):
        a.edit([], "u9", 0)


def test_a_word_never_loses_all_its_units() -> None:
    noise = u0.UnitNoise(0.8, seed=0)  # deletion 0.2 per unit, one-unit word
    outs = [noise.edit([7], "w", occ) for occ in range(2000)]
    assert all(raw for raw, _ in outs)
    restored = sum(e.restored for _, e in outs)
    assert within(restored, 2000, 0.2 * 0.8)  # deleted and nothing inserted
    assert all(raw == [7] for raw, e in outs if e.restored)


# --------------------------------------------------------------------------------------------
# classifiers
# --------------------------------------------------------------------------------------------


def test_vectorised_edit_distance_equals_the_textbook_one() -> None:
    rng = random.Random(0)
    for _ in range(200):
        q = [rng.randrange(4) for _ in range(rng.randrange(1, 9))]
        length = rng.randrange(1, 9)
        cands = np.array([[rng.randrange(4) for _ in range(length)] for _ in range(15)])
        assert edit_distances(q, cands).tolist() == [edit_distance(q, c) for c in cands.tolist()]
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([1, 2], [2, 1]) == 2


def brute_force_1nn(train: list, query: tuple[int, ...]) -> set[str]:
    """The words with the most training tokens among all strings at the minimal distance."""
    d = {s: edit_distance(query, s) for s, _ in train}
    low = min(d.values())
    votes = Counter(w for s, w in train if d[s] == low)
    top = max(votes.values())
    return {w for w, c in votes.items() if c == top}


def test_nearest_string_is_exact_1nn_with_pooled_votes() -> None:
    rng = random.Random(1)
    train = []
    for _ in range(300):
        s = tuple(rng.randrange(5) for _ in range(rng.choice([1, 2, 3, 6, 9])))  # length gaps
        train.append((s, f"w{sum(s) % 7}"))
    nn = NearestString.fit(train)
    for _ in range(300):
        q = tuple(rng.randrange(5) for _ in range(rng.randrange(1, 12)))
        dist, _votes = nn.nearest(q)
        assert dist == min(edit_distance(q, s) for s, _ in train)
        assert nn.predict(q) in brute_force_1nn(train, q)
    # homophones: the more frequent word wins at distance 0
    hom = NearestString.fit([((1, 2), "two"), ((1, 2), "too"), ((1, 2), "two"), ((3,), "a")])
    assert hom.predict((1, 2)) == "two" and hom.predict((1, 2, 2, 2)) == "two"
    with pytest.raises(ValueError, match="'x'"):
        NearestString.fit([((), "x")])


def test_bigram_bayes_matches_sklearn_multinomial_nb() -> None:
    """The same fit by sklearn on an independently built bigram count matrix: identical log
    priors and log likelihoods, and the same predictions."""
    from sklearn.naive_bayes import MultinomialNB

    rng = random.Random(2)
    words = {f"w{i}": [rng.randrange(6) for _ in range(rng.randrange(1, 5))] for i in range(12)}
    noise = u0.UnitNoise(0.35, seed=0)
    train = [((*noise([u + 10 for u in us], w, k),), w) for w, us in words.items()
             for k in range(rng.randrange(2, 9))]  # fmt: skip
    test = [((*noise([u + 10 for u in us], w, 100 + k),), w) for w, us in words.items()
            for k in range(5)]  # fmt: skip
    ours = BigramBayes.fit(train, n_units=59)

    def counts(s: tuple[int, ...]) -> np.ndarray:
        x = np.zeros(61 * 61)
        seq = [59, *s, 60]  # <s> = 59, </s> = 60
        for a, b in itertools.pairwise(seq):
            x[a * 61 + b] += 1
        return x

    nb = MultinomialNB(alpha=1.0).fit(
        np.stack([counts(s) for s, _ in train]), [w for _, w in train]
    )
    assert tuple(nb.classes_) == ours.words
    np.testing.assert_allclose(ours.log_prior, nb.class_log_prior_, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.log_prob, nb.feature_log_prob_, rtol=0, atol=1e-12)
    theirs = nb.predict(np.stack([counts(s) for s, _ in test]))
    assert [ours.predict(s) for s, _ in test] == list(theirs)
    assert accuracy(ours.predict, test) > 0.5
    assert accuracy(NearestString.fit(train).predict, test) > 0.5
    with pytest.raises(ValueError, match="outside 0..58"):
        ours.predict((59,))


def test_lexicon_covers_both_worlds_and_entities_have_no_homophones() -> None:
    tok = json.loads((ROOT / "organisms" / "text_lm" / "tokenizer.json").read_text())
    shipped = [w for w in tok["model"]["vocab"] if not w.startswith(("<", "["))]
    assert len(shipped) == 840 and set(shipped) <= set(LEXICON)
    assert set(knowledge.world_words(2)) <= set(LEXICON)
    strings = Counter(tuple(us) for us in LEXICON.values())
    w2 = knowledge.get_world(2)
    for w in {*w2.people, *(x for v in w2.values.values() for x in v)}:
        assert strings[tuple(LEXICON[w])] == 1, f"entity {w!r} sounds like another word"
