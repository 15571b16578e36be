"""Word pooling and Recall@k on a case small enough to check by hand, then data-set aggregation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from speech_lens.data.encoded import MARKER, SPEECH, EncodedPrompt, WordSpan, WordTarget
from speech_lens.lens.metrics import DatasetMetrics, aggregate, word_recall
from speech_lens.lens.readout import LensBuffer, Readout
from speech_lens.lens.records import MATCH_RULES, match_ids, utterance_record
from speech_lens.lens.results import LensResult, WordLensResult
from speech_lens.lens.tables import layer_table, word_table
from speech_lens.vocab import UnitBlock, VocabLayout

# A vocabulary of 8 ids: 0-4 text, 5-6 speech units [Hu0] [Hu1], 7 the speech marker.
LAYOUT = VocabLayout(
    vocab_size=8,
    n_tokenizer=8,
    units=UnitBlock("units", "[Hu{k}]", 5, 2, 25.0, True),
    marker_ids={"speech": 7},
)
WORDS = ("the", "cat", "sat")
TARGETS = (
    WordTarget("the", (0,), (0,)),
    WordTarget("cat", (1, 2), (3,)),  # " cat" = ids 1 2 (two sub-tokens), "cat" = id 3
    WordTarget("sat", (4,), (2,)),
)
# Prompt: [Speech] | the: pos 1-2 | cat: pos 3 | sat: pos 4-5
SPANS = ((1, 3), (3, 4), (4, 6))
# Hand-written lens logits per row (layer) and position; columns are ids 0..7.
LOGITS = torch.tensor(
    [
        [  # row 0
            [0, 0, 0, 0, 0, 0, 0, 0],  # marker: uniform
            [1, 0, 0, 0, 0, 0, 0, 0],
            [0, 2, 0, 3, 0, 0, 0, 0],  # "the" pooled over text: [1, 2, 0, 3, 0]
            [0, 0, 5, 0, 1, 9, 0, 0],  # "cat" pooled over text: [0, 0, 5, 0, 1]
            [0, 0, 0, 0, 2, 0, 0, 0],
            [0, 0, 0, 0, -1, 0.5, 0, 0],  # "sat" pooled over text: [0, 0, 0, 0, 2]
        ],
        [  # row 1 (the output): "the" now ranks first
            [0, 0, 0, 0, 0, 0, 0, 0],
            [6, 0, 0, 0, 0, 0, 0, 0],
            [0, 2, 0, 3, 0, 0, 0, 0],  # "the" pooled: [6, 2, 0, 3, 0]
            [0, 0, 5, 0, 1, 9, 0, 0],
            [0, 0, 0, 0, 2, 0, 0, 0],
            [0, 0, 0, 0, -1, 0.5, 0, 0],
        ],
    ],
    dtype=torch.float32,
)


def _prompt() -> EncodedPrompt:
    kind = (MARKER, *([SPEECH] * 5))
    widx = torch.tensor([-1, 0, 0, 1, 2, 2])
    return EncodedPrompt(
        tokens=torch.tensor([7, 5, 6, 5, 6, 5]),
        kind=kind,
        word_index=widx,
        unit_index=torch.tensor([-1, 0, 1, 2, 3, 4]),
        words=WORDS,
        spans=tuple(
            WordSpan(j, w, SPEECH, a, b)
            for j, (w, (a, b)) in enumerate(zip(WORDS, SPANS, strict=True))
        ),
        utterance_id="u1",
        family="hand",
    )


def _hand_result(chunk_size: int) -> LensResult:
    """Drive the real streaming reducer (LensBuffer.consume) with the hand-written logits."""
    readout = Readout.for_layout(LAYOUT, torch.nn.Identity(), torch.nn.Identity(), n_layers=1)
    cands = [
        sorted(
            {
                *TARGETS[j].spaced,
                *TARGETS[j].bare,
                *((*TARGETS[j + 1].spaced, *TARGETS[j + 1].bare) if j + 1 < 3 else ()),
            }
        )
        for j in range(3)
    ]
    buf = LensBuffer(
        n_rows=2,
        positions=torch.arange(6),
        k=3,
        word_positions=[torch.arange(a, b) for a, b in SPANS],
        cand_ids=torch.tensor([i for c in cands for i in c]),
        cand_word=torch.tensor([j for j, c in enumerate(cands) for _ in c]),
        chunk_size=chunk_size,
    )
    for row in range(2):
        buf.consume(row, lambda ix, row=row: LOGITS[row][ix], readout)
    words = WordLensResult.from_buffer(buf, (0, 1, 2), WORDS, TARGETS, (*TARGETS[1:], None))
    return LensResult.from_buffer(buf, _prompt().tokens, words=words)


@pytest.mark.parametrize("chunk_size", [1, 2, 6])  # "the" straddles the chunk border at 2
def test_word_pooling_by_hand(chunk_size):
    res = _hand_result(chunk_size)
    w = res.words
    assert w is not None
    # pooled text top-3 of row 0: the -> ids 3 (3), 1 (2), 0 (1); cat -> 2, 4, then a 0-logit id
    assert w.topk_ids[0, 0].tolist() == [3, 1, 0]
    torch.testing.assert_close(w.topk_logits[0, 0], torch.tensor([3.0, 2.0, 1.0]))
    assert w.topk_ids[0, 1, :2].tolist() == [2, 4]
    assert w.topk_ids[1, 0].tolist() == [0, 3, 1]
    assert w.topk_ids[0, 2, 0].item() == 4
    # ranks: the number of other text ids with a pooled logit >= (ties count against the target)
    assert w.rank_of(0, [0]).tolist() == [2, 0]  # "the": third at row 0, first at row 1
    # id 1 pooled at 0 for "cat" [0, 0, 5, 0, 1]: ids 2, 4 above, ids 0, 3 tied with it
    assert w.rank_of(1, [1]).tolist() == [4, 4]
    assert w.rank_of(1, [3]).tolist() == [4, 4]
    assert w.rank_of(1, [2]).tolist() == [0, 0]
    # next word "cat" {1, 3} from "the": id 3 on top at row 0, behind id 0 at row 1
    assert w.rank_of(0, [1, 3]).tolist() == [0, 1]


def test_recall_and_match_rules_by_hand():
    res = _hand_result(2)
    # current word, rule "first" (ids {spaced[0], bare[0]}):
    #   the {0}: ranks 2 / 0; cat {1, 3}: 2 / 2; sat {4, 2}: 0 / 0
    np.testing.assert_allclose(word_recall(res, 1), [1 / 3, 2 / 3])
    # cat {1, 3} ranks 4: pooled at 0, tied with two other text ids, so not in the top 3
    np.testing.assert_allclose(word_recall(res, 3), [2 / 3, 2 / 3])
    # rule "any" lets cat's second sub-token (id 2, pooled top-1) count
    np.testing.assert_allclose(word_recall(res, 1, match="any"), [2 / 3, 1.0])
    # "first-bare" for sat is id 2: rank 4 in "sat" pooled [0, 0, 0, 0, 2] (id 4 above, 3 tied)
    np.testing.assert_allclose(word_recall(res, 1, match="first-bare"), [0, 1 / 3])
    # next word: the -> cat {1, 3}: ranks 0 / 1; cat -> sat {4, 2}: id 2 rank 0 / 0
    np.testing.assert_allclose(word_recall(res, 1, which="next"), [1.0, 0.5])
    # first-spaced: the -> " cat" id 1 (ranks 1 / 2); cat -> " sat" id 4 (ranks 1 / 1)
    np.testing.assert_allclose(word_recall(res, 1, which="next", match="first-spaced"), [0, 0])
    np.testing.assert_allclose(word_recall(res, 2, which="next", match="first-spaced"), [1, 0.5])


def test_match_ids():
    t = WordTarget("cat", (1, 2), (3,))
    assert match_ids(t, "first") == (1, 3)
    assert match_ids(t, "first-spaced") == (1,)
    assert match_ids(t, "first-bare") == (3,)
    assert match_ids(t, "any") == (1, 2, 3)
    assert match_ids(WordTarget("a", (9,), (9,)), "first") == (9,)
    with pytest.raises(ValueError, match="unknown match rule"):
        match_ids(t, "last")


def test_record_masses_and_aggregate_by_hand():
    res = _hand_result(2)
    rec = utterance_record(res, _prompt(), LAYOUT)
    assert rec.n_speech_positions == 5
    assert rec.ranks["first"]["current"] == [[2, 0], [4, 4], [0, 0]]
    assert rec.ranks["first"]["next"] == [[0, 1], [0, 0], [-1, -1]]

    # unit mass at speech positions, row 0, by hand from the softmax of each row
    def unit_mass(v):
        e = [math.exp(x) for x in v]
        return (e[5] + e[6]) / sum(e)

    hand = sum(unit_mass(LOGITS[0, p].tolist()) for p in range(1, 6))
    assert rec.mass_sums["unit"][0] == pytest.approx(hand, rel=1e-6)
    assert rec.unit_top1 == [2, 2]  # positions 3 and 5 have a unit (id 5) on top
    # one utterance: every bootstrap draw is that utterance, the band collapses onto the mean
    m = aggregate([rec], ks=(1, 3), n_boot=50)
    assert m.recall_current[1].mean == pytest.approx([1 / 3, 2 / 3])
    assert m.recall_current[1].lo == pytest.approx(m.recall_current[1].mean)
    assert m.recall_next[1].mean == pytest.approx([1.0, 0.5])
    assert (m.n_words, m.n_next_words) == (3, 2)
    assert m.mass["unit"].mean[0] == pytest.approx(hand / 5, rel=1e-6)
    assert m.unit_top1.mean == pytest.approx([0.4, 0.4])
    # JSON round trip keeps everything, including the recorded matching rule
    back = DatasetMetrics.from_json(json.loads(json.dumps(m.to_json())))
    assert back == m and back.match == "first"
    rows = layer_table(m)
    assert len(rows) == 2 and rows[1]["recall@1_current"] == pytest.approx(2 / 3)
    words = word_table([rec], match="any")
    assert len(words) == 6 and {r["match"] for r in words} == {"any"}
    assert words[0]["top_tokens"] == "3 | 1 | 0"


def test_bootstrap_ci_is_seeded_and_covers_the_mean():
    res = _hand_result(6)
    base = utterance_record(res, _prompt(), LAYOUT)

    def with_ranks(uid, cur):
        r = dict(base.ranks)
        r["first"] = {"current": cur, "next": base.ranks["first"]["next"]}
        return type(base)(**{**base.to_json(), "utterance_id": uid, "ranks": r})

    recs = [
        with_ranks("a", [[0, 0], [0, 0], [0, 0]]),  # all hits
        with_ranks("b", [[5, 0], [5, 0], [5, 0]]),  # row 0 all misses
        with_ranks("c", [[0, 0], [5, 0], [5, 5]]),
    ]
    m1 = aggregate(recs, ks=(1,), n_boot=400, seed=3)
    m2 = aggregate(recs, ks=(1,), n_boot=400, seed=3)
    assert m1 == m2
    c = m1.recall_current[1]
    assert c.mean == pytest.approx([4 / 9, 8 / 9])
    assert 0 <= c.lo[0] < c.mean[0] < c.hi[0] <= 1
    assert c.hi[1] <= 1 and c.lo[1] <= 8 / 9
    with pytest.raises(ValueError, match="match rule"):
        aggregate(recs, match="nope")
    assert set(MATCH_RULES) == set(base.ranks)


def test_word_lens_on_an_encoded_utterance(tiny_model):
    """encode_prompt -> word_lens -> record: the pipeline the runner uses, on a tiny model."""
    from speech_lens import Utterance, Word, encode_prompt, word_lens, word_targets

    model = tiny_model("spiritlm")
    words = (Word("the", 0.0, 0.3), Word("cat", 0.3, 0.5), Word("sat", 0.6, 1.0))
    g = torch.Generator().manual_seed(0)
    units = tuple(int(u) for u in torch.randint(0, 500, (25,), generator=g))
    utt = Utterance(id="x", words=words, units=units, durations=None, frame_rate=25.0)
    prompt = encode_prompt(model, utt, mode="speech")
    res = word_lens(model, prompt, word_targets(model, utt), k=5)
    rec = utterance_record(res, prompt, model.layout)
    assert rec.words == ["the", "cat", "sat"] and rec.next_words == ["cat", "sat", ""]
    assert rec.n_speech_positions == int(prompt.positions_of(SPEECH).numel())
    a = rec.rank_array("first", "current")
    assert a.shape == (model.n_layers + 1, 3) and (a >= 0).all()
