"""The mismatched-word baseline of current-word Recall@k: recomputed from the records by hand, on
a tiny model and on a constructed case where the lens always holds the true word."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from speech_lens.lens.metrics import DatasetMetrics, aggregate
from speech_lens.lens.mismatch import mismatched_partners
from speech_lens.lens.readout import MASS_GROUPS
from speech_lens.lens.records import MATCH_RULES, UtteranceRecord, utterance_record
from speech_lens.lens.tables import layer_table
from speech_lens.report.lens import recall_figure

SENTENCES = (
    ("the", "cat", "sat"),
    ("a", "dog", "ran", "home"),
    ("the", "dog", "sat"),
    ("cat", "ran"),
)


def _tiny_records(tiny_model, sentences=SENTENCES) -> list[UtteranceRecord]:
    from speech_lens import Utterance, Word, encode_prompt, word_lens, word_targets

    model = tiny_model("spiritlm")
    g = torch.Generator().manual_seed(0)
    records = []
    for n, sentence in enumerate(sentences):
        words = tuple(Word(w, 0.4 * i, 0.4 * i + 0.3) for i, w in enumerate(sentence))
        units = tuple(int(u) for u in torch.randint(0, 500, (10 * len(words),), generator=g))
        utt = Utterance(id=f"u{n}", words=words, units=units, durations=None, frame_rate=25.0)
        prompt = encode_prompt(model, utt, mode="speech")
        res = word_lens(model, prompt, word_targets(model, utt), k=10)
        records.append(utterance_record(res, prompt, model.layout))
    return records


def _hand_baseline(records: list[UtteranceRecord], match: str, k: int, seed: int) -> np.ndarray:
    """Hits per row, counted word by word with numpy set membership (not lens.mismatch)."""
    words = [w for r in records for w in r.words]
    targets = [ids for r in records for ids in r.target_ids[match]]
    tops = [np.asarray(top) for r in records for top in r.top_ids]  # [row, stored k] per word
    partner = mismatched_partners(words, seed)
    hits = np.zeros(records[0].n_layers + 1, dtype=np.int64)
    for g, top in enumerate(tops):
        assert words[partner[g]] != words[g]  # never the same word type
        hits += np.isin(top[:, :k], targets[partner[g]]).any(axis=1)
    return hits


def _lens_words(tiny_model) -> tuple[tuple[str, ...], ...]:
    """SENTENCES re-worded with words the random tiny lens ranks in some pooled top-k (the
    prompts are units only, so they do not change): the baseline then has hits to count."""
    tokenizer = tiny_model("spiritlm").tokenizer
    counts = Counter(
        i for r in _tiny_records(tiny_model) for top in r.top_ids for row in top for i in row
    )
    vocab = []
    for i, _ in counts.most_common():
        word = tokenizer.convert_ids_to_tokens(i).lstrip("\u2581")
        # a word whose spaced first sub-token is this id (most top ids are filler tokens)
        if word.isalpha() and tokenizer.encode(" " + word, add_special_tokens=False)[:1] == [i]:
            vocab.append(word)
    assert len(vocab) >= 2, vocab
    vocab = vocab[:5]
    return tuple(
        tuple(vocab[(i + n) % len(vocab)] for i in range(len(s))) for n, s in enumerate(SENTENCES)
    )


def test_baseline_equals_a_recomputation_from_the_records(tiny_model):
    records = _tiny_records(tiny_model, _lens_words(tiny_model))
    n_words = sum(len(s) for s in SENTENCES)
    # the records carry each word's hit ids; JSON round trip keeps them
    again = [UtteranceRecord.from_json(json.loads(json.dumps(r.to_json()))) for r in records]
    assert again == records and set(records[0].target_ids) == set(MATCH_RULES)
    m = aggregate(records, ks=(1, 5, 10), n_boot=200, seed=4)
    assert m.n_words == n_words and sorted(m.recall_mismatched) == [1, 5, 10]
    for k in (1, 5, 10):
        hand = _hand_baseline(records, "first", k, seed=4)
        counts = np.asarray(m.recall_mismatched[k].mean) * n_words
        np.testing.assert_array_equal(np.rint(counts).astype(np.int64), hand)
        np.testing.assert_allclose(counts, hand, rtol=0, atol=1e-9)
        if k == 10:
            assert hand.sum() > 0  # the lens does rank other words of the data: not all zeros
        c = m.recall_mismatched[k]
        assert all(lo <= mu <= hi for lo, mu, hi in zip(c.lo, c.mean, c.hi, strict=True))
    # seeded: the same seed draws the same partners, another seed other partners
    assert (
        aggregate(records, ks=(10,), n_boot=20, seed=4).recall_mismatched[10]
        == (aggregate(records, ks=(10,), n_boot=20, seed=4).recall_mismatched[10])
    )
    words = [w for r in records for w in r.words]
    assert not np.array_equal(mismatched_partners(words, 4), mismatched_partners(words, 5))
    # beyond the stored top-k (10) the records cannot score the baseline: left out
    assert 20 not in aggregate(records, ks=(20,), n_boot=20).recall_mismatched


def test_partners_cover_every_other_type_and_never_the_own():
    words = ["a", "b", "a", "c", "c", "c"]
    seen: dict[int, set[int]] = {g: set() for g in range(len(words))}
    for seed in range(200):
        for g, p in enumerate(mismatched_partners(words, seed)):
            seen[g].add(int(p))
    for g, w in enumerate(words):
        assert seen[g] == {p for p, v in enumerate(words) if v != w}
    with pytest.raises(ValueError, match="two word types"):
        mismatched_partners(["a", "a"], 0)


def _constructed(n_rows: int = 2) -> list[UtteranceRecord]:
    """Every word's top-3 holds its own target first (Recall@1 = 1 at every row); at row 0 the
    rest is filler (ids 90+), at row 1 every word type's target is in the top 3."""
    ids = {"the": 0, "cat": 1, "sat": 2}
    sentences = (("the", "cat"), ("sat", "the"), ("cat", "sat", "the"))
    records = []
    for n, sentence in enumerate(sentences):
        tops = []
        for w in sentence:
            others = [i for v, i in ids.items() if v != w]
            tops.append([[ids[w], 90, 91], [ids[w], *others]])
        nxt = [[0] * n_rows] * (len(sentence) - 1) + [[-1] * n_rows]
        records.append(
            UtteranceRecord(
                utterance_id=f"s{n}",
                n_layers=n_rows - 1,
                words=list(sentence),
                word_index=list(range(len(sentence))),
                next_words=[*sentence[1:], ""],
                ranks={"first": {"current": [[0] * n_rows] * len(sentence), "next": nxt}},
                top_ids=tops,
                mass_sums={g: [0.0] * n_rows for g in MASS_GROUPS},
                unit_top1=[0] * n_rows,
                n_speech_positions=len(sentence),
                n_utterance_words=len(sentence),
                target_ids={"first": [[ids[w]] for w in sentence]},
            )
        )
    return records


def test_constructed_case_recall_one_baseline_below():
    records = _constructed()
    m = aggregate(records, ks=(1, 3), n_boot=100, seed=0)
    assert m.recall_current[1].mean == [1.0, 1.0]
    assert m.recall_mismatched[1].mean == [0.0, 0.0]  # the own target fills top-1
    assert m.recall_mismatched[3].mean == [0.0, 1.0]  # filler at row 0, every type at row 1
    back = DatasetMetrics.from_json(json.loads(json.dumps(m.to_json())))
    assert back == m
    row = layer_table(m)[0]
    assert (row["recall@1_current"], row["recall@1_mismatched"]) == (1.0, 0.0)
    assert {"recall@3_mismatched_lo", "recall@3_mismatched_hi"} <= set(row)
    fig = recall_figure(m, ks=(3,), which=("current",))
    base = [t for t in fig.data if t.name and "mismatched-word baseline" in t.name]
    assert len(base) == 1 and list(base[0].y) == [0.0, 1.0] and base[0].line.dash == "dashdot"


def test_records_without_targets_keep_the_old_formats():
    old = [r.to_json() for r in _constructed()]
    for d in old:
        del d["target_ids"]  # a record written before the baseline
    m = aggregate([UtteranceRecord.from_json(d) for d in old], ks=(1,), n_boot=10)
    assert m.recall_mismatched == {} and "recall_mismatched" not in m.to_json()
    assert not any("mismatched" in key for key in layer_table(m)[0])
    fig = recall_figure(m, ks=(1,))
    assert not any(t.name and "mismatched" in t.name for t in fig.data)
