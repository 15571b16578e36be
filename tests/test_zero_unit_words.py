"""Spoken words that get no unit position (a short word between two unit ends at 25 Hz) and the
boundary rule for a word ending exactly on a unit's end: single and batched word lens, records,
Recall@k under each policy, run_dataset, the CLI (resume key, metrics.json, report) and the
sharded runner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from speech_lens import Utterance, Word, write_manifest
from speech_lens.data.encoded import SPEECH
from speech_lens.data.prompts import encode_prompt
from speech_lens.data.word_targets import word_targets
from speech_lens.lens.logit import word_lens, word_lens_batch
from speech_lens.lens.metrics import aggregate, word_recall
from speech_lens.lens.records import utterance_record
from speech_lens.runs.distributed import run_distributed
from speech_lens.runs.lens import PARTIAL, RunError, run_dataset
from speech_lens.runs.lens_settings import LensRunConfig

RATE = 25.0  # one unit every 0.04 s; unit k ends at (k + 1) * 0.04


def _gap_utterance(uid: str = "gap") -> Utterance:
    """ "a" spans (0.12, 0.15]: no unit ends inside it (units end at 0.12 and 0.16), so it gets
    no unit. "the" ends exactly where unit 2 ends (0.12), "sat" starts exactly there (0.24)."""
    words = (
        Word("the", 0.0, 0.12),
        Word("a", 0.12, 0.15),
        Word("cat", 0.15, 0.24),
        Word("sat", 0.24, 0.36),
    )
    units = tuple(10 + k for k in range(9))  # distinct: dedup keeps every frame
    return Utterance(uid, words, units, None, RATE)


def _plain_utterance(uid: str = "plain") -> Utterance:
    words = (Word("on", 0.0, 0.08), Word("mat", 0.08, 0.2))
    return Utterance(uid, words, tuple(40 + k for k in range(5)), None, RATE)


def _word_units(prompt, res, j: int) -> list[int]:
    """The unit indices (0-based, in the utterance) pooled for pooled word ``j``."""
    return [int(prompt.unit_index[p]) for p in res.words.positions[j].tolist()]


def test_boundary_rule_and_zero_unit_words_single_and_batched(tiny_model):
    model = tiny_model("spiritlm")
    utt, plain = _gap_utterance(), _plain_utterance()
    prompt = encode_prompt(model, utt, mode="speech")
    targets = word_targets(model, utt)
    res = word_lens(model, prompt, targets, k=5)  # default policy: skip
    w = res.words
    assert w is not None
    assert w.words == ("the", "cat", "sat") and w.word_index == (0, 2, 3)
    assert w.no_unit_words == (1,) and w.n_utterance_words == 4
    # boundary: unit 2 ends at 0.12 == the end of "the": it is the last unit of "the", not a
    # unit of the next word; unit 5 ends at 0.24 == the end of "cat" and the start of "sat"
    assert _word_units(prompt, res, 0) == [0, 1, 2]
    assert _word_units(prompt, res, 1) == [3, 4, 5]
    assert _word_units(prompt, res, 2) == [6, 7, 8]
    # "the" still predicts its next word "a" (a target needs no units)
    assert w.next[0] is not None and w.next[0].word == "a" and w.next[2] is None
    # policy "miss" pools the same words; "error" names the utterance and the word
    miss = word_lens(model, prompt, targets, k=5, zero_unit_words="miss").words
    assert (
        miss is not None
        and miss.word_index == w.word_index
        and torch.equal(miss.cand_ranks, w.cand_ranks)
    )
    with pytest.raises(ValueError, match=r"utterance gap: spoken word 1 \('a'\) has no unit"):
        word_lens(model, prompt, targets, k=5, zero_unit_words="error")
    with pytest.raises(ValueError, match="zero_unit_words='drop'"):
        word_lens(model, prompt, targets, k=5, zero_unit_words="drop")
    # batched with an utterance that has units for every word: same words and candidates
    p2 = encode_prompt(model, plain, mode="speech")
    both = word_lens_batch(model, [prompt, p2], [targets, word_targets(model, plain)], k=5)
    b = both[0].words
    assert b is not None and b.no_unit_words == (1,) and b.word_index == (0, 2, 3)
    assert both[1].words is not None and both[1].words.no_unit_words == ()
    assert torch.equal(b.cand_ids, w.cand_ids) and torch.equal(b.cand_word, w.cand_word)
    torch.testing.assert_close(b.cand_logits, w.cand_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"utterance gap: spoken word 1 \('a'\)"):
        word_lens_batch(model, [p2, prompt], None, k=5, zero_unit_words="error")


def test_dedup_boundary_unit_ends_at_its_last_frame(tiny_model):
    """A deduplicated unit spans its frames; its end time is that of its last frame."""
    model = tiny_model("spiritlm")
    assert model.layout.units.dedup
    # frames 0-2 are one unit (ends 0.12 == end of "the"), frame 3 the next (ends 0.16)
    utt = Utterance(
        "dd", (Word("the", 0.0, 0.12), Word("cat", 0.12, 0.2)), (7, 7, 7, 8, 9), None, RATE
    )
    prompt = encode_prompt(model, utt, mode="speech")
    res = word_lens(model, prompt, word_targets(model, utt), k=5)
    assert res.words is not None
    assert _word_units(prompt, res, 0) == [0] and _word_units(prompt, res, 1) == [1, 2]


def test_records_and_recall_under_each_policy(tiny_model):
    model = tiny_model("spiritlm")
    utt = _gap_utterance()
    prompt = encode_prompt(model, utt, mode="speech")
    res = word_lens(model, prompt, word_targets(model, utt), k=5)
    rec = utterance_record(res, prompt, model.layout)
    assert rec.words_without_units == [1] and rec.n_utterance_words == 4
    assert rec.words == ["the", "cat", "sat"]
    back = type(rec).from_json(json.loads(json.dumps(rec.to_json())))
    assert back == rec
    cur = rec.rank_array("first", "current")  # [row, 3 pooled words]
    nxt = rec.rank_array("first", "next")
    hits_cur = (cur < 5).sum(1)
    hits_nxt = ((nxt < 5) & (nxt >= 0)).sum(1)
    skip = aggregate([rec], ks=(5,), n_boot=10)
    miss = aggregate([rec], ks=(5,), n_boot=10, zero_unit_words="miss")
    # skip: 3 scored words, 2 with a next word; miss adds "a" to both (it has a next word)
    assert (skip.n_words, skip.n_next_words) == (3, 2)
    assert (miss.n_words, miss.n_next_words) == (4, 3)
    assert skip.n_words_without_units == miss.n_words_without_units == 1
    assert (skip.zero_unit_words, miss.zero_unit_words) == ("skip", "miss")
    np.testing.assert_allclose(skip.recall_current[5].mean, hits_cur / 3)
    np.testing.assert_allclose(miss.recall_current[5].mean, hits_cur / 4)
    np.testing.assert_allclose(skip.recall_next[5].mean, hits_nxt / 2)
    np.testing.assert_allclose(miss.recall_next[5].mean, hits_nxt / 3)
    # the single-result recall follows the same policy
    np.testing.assert_allclose(word_recall(res, 5), hits_cur / 3)
    np.testing.assert_allclose(word_recall(res, 5, zero_unit_words="miss"), hits_cur / 4)
    np.testing.assert_allclose(
        word_recall(res, 5, which="next", zero_unit_words="miss"), hits_nxt / 3
    )
    with pytest.raises(ValueError, match="zero_unit_words"):
        aggregate([rec], zero_unit_words="drop")


def _cfg(tmp_path, data, **kw) -> LensRunConfig:
    return LensRunConfig(
        checkpoint="tiny", data=str(data), family="spiritlm", k=5, ks=(1, 5), n_boot=10, **kw
    )


def test_run_dataset_and_sharded_runner_count_words_without_units(tiny_model, tmp_path):
    model = tiny_model("spiritlm")
    utts = [_gap_utterance(), _plain_utterance()]
    data = tmp_path / "data.jsonl"
    write_manifest(data, utts)
    out = tmp_path / "run"
    m = run_dataset(model, utts, out, _cfg(tmp_path, data), progress=False)
    assert m.n_words_without_units == 1 and m.zero_unit_words == "skip" and m.n_words == 5
    info = json.loads((out / "metrics.json").read_text())
    assert info["metrics"]["n_words_without_units"] == 1
    settings = info["provenance"]["settings"]
    assert settings["zero_unit_words"] == "skip"
    # the readout precision and tie rule are recorded next to it (speech_lens.readout)
    assert (settings["readout_dtype"], settings["tie_rule"]) == ("float32", "pessimistic")
    recs = [json.loads(x) for x in (out / PARTIAL).read_text().splitlines()]
    header = recs[0]["header"]
    assert header["zero_unit_words"] == "skip" and header["tie_rule"] == "pessimistic"
    by_id = {r["utterance_id"]: r for r in recs[1:]}
    assert (
        by_id["gap"]["words_without_units"] == [1] and by_id["plain"]["words_without_units"] == []
    )
    assert "Spoken words with no unit position: 1 (policy skip" in (out / "report.html").read_text()
    # resuming with another policy is refused like any setting that changes the records
    with pytest.raises(RunError, match="other settings"):
        run_dataset(model, utts, out, _cfg(tmp_path, data, zero_unit_words="miss"), progress=False)
    miss_cfg = _cfg(tmp_path, data, zero_unit_words="miss")
    miss = run_dataset(model, utts, tmp_path / "miss", miss_cfg, progress=False, batch_size=2)
    assert miss.n_words == 6 and miss.n_words_without_units == 1
    with pytest.raises(ValueError, match=r"utterance gap: spoken word 1 \('a'\)"):
        run_dataset(
            model, utts, tmp_path / "err", _cfg(tmp_path, data, zero_unit_words="error"),
            progress=False,
        )  # fmt: skip
    # the sharded runner (one utterance per forward, as run_dataset at batch size 1) scores the
    # same words and writes the same metrics.json, byte for byte
    sharded = tmp_path / "sharded"
    md = run_distributed(model, utts, sharded, _cfg(tmp_path, data), progress=False)
    assert md is not None and md.n_words_without_units == 1
    assert (sharded / "metrics.json").read_text() == (out / "metrics.json").read_text()


def test_cli_zero_unit_words(tiny_checkpoint, tmp_path, capsys):
    from speech_lens.cli.main import main

    path, kw = tiny_checkpoint("spiritlm")
    assert kw == {}
    data = tmp_path / "data.jsonl"
    write_manifest(data, [_gap_utterance(), _plain_utterance()])
    head = ["lens", str(path), str(data), "--no-progress", "--n-boot", "10", "--k", "5"]
    assert main([*head, "--out", str(tmp_path / "a")]) == 0
    info = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert info["metrics"]["n_words_without_units"] == 1
    assert info["config"]["zero_unit_words"] == "skip"
    capsys.readouterr()
    assert main([*head, "--out", str(tmp_path / "a"), "--zero-unit-words", "miss"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main([*head, "--out", str(tmp_path / "b"), "--zero-unit-words", "error"]) == 2
    assert "utterance gap: spoken word 1 ('a') has no unit position" in capsys.readouterr().err


def test_prompt_span_of_a_word_without_units_is_empty(tiny_model):
    """What the lens reads: encode_prompt gives "a" an empty span and no SPEECH position."""
    model = tiny_model("spiritlm")
    prompt = encode_prompt(model, _gap_utterance(), mode="speech")
    span = prompt.spans[1]
    assert span.text == "a" and span.start == span.end
    assert int((prompt.word_index == 1).sum()) == 0
    assert len(prompt.positions_of(SPEECH)) == 9
