"""Fast tests of the organism pipeline (no TTS, training of a few tiny steps only)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from speech_lens.organisms import corpus, gates, knowledge, units
from speech_lens.organisms.checkpoint import OrganismVocab, export, llama_config
from speech_lens.organisms.train import Data, TrainConfig, batch, interleaved_example, lr_at, train

WORDS = ("the", "cat", "sat", "on", "mat", "tom", "lives", "in", "paris")


@pytest.fixture(scope="module")
def vocab() -> OrganismVocab:
    return OrganismVocab(WORDS, 6)


def tiny_model(vocab: OrganismVocab, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(vocab, 32, 2, 4, 64)).eval()


def test_vocab_layout(vocab: OrganismVocab) -> None:
    toks = vocab.tokens
    assert len(toks) == vocab.size == 3 + len(WORDS) + 2 + 6
    assert toks[vocab.text_id] == "[Text]" and toks[vocab.speech_id] == "[Speech]"
    assert toks[vocab.first_unit] == "[Hu0]" and toks[vocab.unit_id(5)] == "[Hu5]"
    assert vocab.word_id("cat") == 4 and vocab.word_id("zebra") == 0
    with pytest.raises(ValueError, match="unit 6 out of range"):
        vocab.unit_id(6)


def test_export_loads_with_speech_lens(vocab: OrganismVocab, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    import speech_lens

    model = tiny_model(vocab)
    d = export(model, vocab, tmp_path / "org", frame_rate=12.5, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(d))
    ids = tok("[Speech][Hu0][Hu5] the cat")["input_ids"]
    assert ids == [1, vocab.speech_id, vocab.unit_id(0), vocab.unit_id(5), 3, 4]
    m = speech_lens.load_model(d)
    desc = m.describe()
    assert (
        desc["family"] == "spiritlm-organism" and desc["n_layers"] == 2 and desc["tied_embeddings"]
    )
    assert int(m.layout.units.first_id) == vocab.first_unit and m.layout.units.count == 6
    x = torch.tensor([[1, vocab.speech_id, vocab.unit_id(2), 4, 5]])
    torch.testing.assert_close(
        m.hf_model(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5
    )


def test_word_windows_and_unit_tokenizer_roundtrip(tmp_path: Path) -> None:
    cfg = units.FeatureConfig()
    spans = [("a", 0.02, 0.2), ("b", 0.25, 0.31), ("c", 0.33, 0.9)]
    b, q = units.word_windows(spans, cfg)
    assert b[0] == 0.0 and b[-1] == 0.9 and len(q) == 4
    assert all(x < y for x, y in itertools.pairwise(q))  # every word gets >= 1 frame
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    audio = 0.3 * np.sin(2 * np.pi * (200 + 600 * t) * t) + 0.01 * rng.standard_normal(16000)
    feats = units.mfcc(audio.astype(np.float32), cfg)
    assert feats.shape[1] == 2 * cfg.n_mfcc and abs(len(feats) - 101) <= 1
    pooled, q2 = units.pooled_features(feats, spans, cfg)
    assert q2 == q and len(pooled) == q[-1]
    tok = units.fit(
        np.concatenate([pooled] * 20) + rng.normal(0, 0.01, (20 * len(pooled), 40)), 4, cfg
    )
    tok.save(tmp_path / "u.json")
    tok2 = units.UnitTokenizer.load(tmp_path / "u.json")
    u, d, words = tok2.encode(audio.astype(np.float32), spans)
    assert sum(d) == q[-1] and len(u) == len(d)
    assert [w for w, _, _ in words] == ["a", "b", "c"]
    assert words[0][1] == 0.0 and words[-1][2] == q[-1] / cfg.rate
    rec = corpus.manifest_record("x", "test", words, cfg.rate, u, d)
    got_words, per_word = corpus.word_units(rec)
    assert got_words == ["a", "b", "c"] and sum(map(len, per_word)) == len(u)
    # units of each word are exactly its frames' runs: re-expand and compare with assign()
    labels = tok2.assign(pooled)
    expanded = [x for x, n in zip(u, d, strict=True) for _ in range(n)]
    assert expanded == labels.tolist()


def test_word_units_rejects_empty_word() -> None:
    rec = {
        "id": "u1",
        "words": [["a", 0.0, 0.08], ["b", 0.08, 0.08]],
        "frame_rate": 12.5,
        "units": [3],
        "durations": [1],
    }
    with pytest.raises(ValueError, match="u1: word 'b' has no units"):
        corpus.word_units(rec)
    with pytest.raises(ValueError, match="split must be"):
        corpus.manifest_record("u2", "dev", [("a", 0.0, 0.1)], 12.5, [1], [1])


def _data(vocab: OrganismVocab) -> Data:
    utt = (
        np.array([4, 5, 6]),
        [
            np.array([vocab.unit_id(0), vocab.unit_id(1)]),
            np.array([vocab.unit_id(2)]),
            np.array([vocab.unit_id(3)] * 2),
        ],
    )
    return Data(
        vocab,
        [np.array([3, 4, 5]), np.array([6, 7])],
        [np.array([8, 9, 10])],
        [np.array([3, 4])],
        [utt],
    )


def test_interleaved_example_markers_and_labels(vocab: OrganismVocab) -> None:
    data = _data(vocab)
    cfg = TrainConfig(name="t", span_probs=(1.0,))
    for seed in range(5):
        toks, cur = interleaved_example(data, cfg, np.random.default_rng(seed))
        assert toks[0] == 1 and len(toks) == len(cur)
        markers = [t for t in toks if t in (vocab.text_id, vocab.speech_id)]
        assert len(markers) == 3 and all(a != b for a, b in itertools.pairwise(markers))
        for t, c in zip(toks, cur, strict=True):  # current-word labels exactly on unit positions
            assert (c >= 0) == (t >= vocab.first_unit)


def test_batches_are_a_function_of_seed_and_step(vocab: OrganismVocab) -> None:
    data = _data(vocab)
    cfg = TrainConfig(name="t", mix={"text": 1, "speech": 1, "interleaved": 1}, batch=3, seq_len=16)
    a, b = batch(data, cfg, 5), batch(data, cfg, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(batch(data, cfg, 6)[0], a[0])
    assert lr_at(cfg, 0) < lr_at(cfg, cfg.warmup) and lr_at(cfg, cfg.steps) == pytest.approx(
        0.1 * cfg.lr
    )


def _assert_same_tensors(a: object, b: object, where: str) -> None:
    """``a`` and ``b`` are the same nested dicts/lists of tensors and values, bit for bit."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        bits = [t.reshape(-1).contiguous().view(torch.uint8) for t in (a, b)]
        assert torch.equal(*bits), where
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


def test_training_resumes_identically(vocab: OrganismVocab, tmp_path: Path, monkeypatch) -> None:
    """A run killed mid-way and rerun ends bit-identical to the uninterrupted run: weights,
    optimiser state, counters, loss EMA and the log (wall times aside)."""
    import speech_lens.organisms.train as tr

    monkeypatch.setattr(tr, "load_data", lambda *_a, **_k: _data(vocab))
    cfg = TrainConfig(
        name="r",
        mix={"text": 1, "interleaved": 1},
        steps=45,  # log lines at 20 and 40, the kill at 27 between them
        batch=2,
        seq_len=16,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        warmup=5,
        save_every_s=0.0,  # state.pt after every step
        aux_layer=1,
        aux_weight=1.0,
    )
    full = train(cfg, "unused", tmp_path / "a")
    real_batch = tr.batch

    def killed_at_27(data, c, step):
        if step == 27:
            raise KeyboardInterrupt
        return real_batch(data, c, step)

    monkeypatch.setattr(tr, "batch", killed_at_27)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, "unused", tmp_path / "b")
    killed = torch.load(tmp_path / "b" / "r" / "state.pt", weights_only=False)
    assert killed["step"] == 27 and not killed["done"]
    monkeypatch.setattr(tr, "batch", real_batch)
    resumed = train(cfg, "unused", tmp_path / "b")
    s1 = torch.load(full / "state.pt", weights_only=False)
    s2 = torch.load(resumed / "state.pt", weights_only=False)
    assert s1["step"] == 45 and s2["done"]
    del s1["wall"], s2["wall"]
    _assert_same_tensors(s1, s2, "state")
    logs = [
        [
            {k: v for k, v in json.loads(x).items() if k != "wall"}
            for x in p.read_text().splitlines()
        ]
        for p in (full / "log.jsonl", resumed / "log.jsonl")
    ]
    assert [r["step"] for r in logs[0]] == [20, 40] and logs[1] == logs[0]
    assert all(r["aux"] is not None for r in logs[0])  # the planted-word loss was trained


def test_layer_logits_last_row_is_model_logits_and_layer0_reads_input(vocab: OrganismVocab) -> None:
    model = tiny_model(vocab)
    ids = torch.tensor([[1, vocab.text_id, 3, 4, 5, 6]])
    lg = gates.layer_logits(model, ids)
    assert lg.shape[0] == 3
    torch.testing.assert_close(lg[-1], model(input_ids=ids).logits)
    h0 = model.model.embed_tokens(ids)
    torch.testing.assert_close(lg[0], model.lm_head(model.model.norm(h0)))
    utts = [
        gates.Utt(
            [3, 4, 5, 6],
            [[vocab.unit_id(0)], [vocab.unit_id(1)], [vocab.unit_id(2)] * 2, [vocab.unit_id(3)]],
        )
    ]
    t = gates.lens_tables(model, utts, vocab, "text")
    # tied embeddings: at the embedding layer every token ranks itself first
    assert t["cur@1"][0] == 1.0 and t["n_words"] == [4.0]
    s = gates.lens_tables(model, utts, vocab, "speech")
    assert len(s["unit_mass"]) == 3 and all(0 <= x <= 1 for x in s["unit_mass"])
    top0 = gates.layer_logits(model, torch.tensor([gates.speech_sequence(utts[0], vocab)[0]]))[0, 0]
    assert top0.argmax(-1)[2:].tolist() == gates.speech_sequence(utts[0], vocab)[0][2:]


def test_world_is_balanced() -> None:
    facts = knowledge.world()
    assert len(facts) == 2 * len(knowledge.PEOPLE)
    assert all(f.answer != f.counterfactual for f in facts)
    for rel, values in (("city", knowledge.CITIES), ("job", knowledge.JOBS)):
        fs = [f for f in facts if f.relation == rel]
        assert {f.answer for f in fs} == set(values)
    sents = " ".join(knowledge.filler_sentences(200))
    for f in facts:  # facts are never stated in the (spoken) filler sentences
        assert f"{f.person} lives in {f.answer}" not in sents


ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "organisms"


def test_shipped_manifest_and_unit_tokenizer_are_consistent() -> None:
    tok = units.UnitTokenizer.load(SHIPPED / "unit_tokenizer.json")
    assert tok.k == 100 and tok.centroids.shape[1] == 2 * tok.config.n_mfcc
    recs = list(corpus.read_jsonl(SHIPPED / "test_manifest.jsonl"))
    assert len(recs) >= 100
    for r in recs:
        assert set(r) == {
            "id",
            "speaker",
            "split",
            "text",
            "words",
            "frame_rate",
            "units",
            "durations",
        }
        assert r["split"] == "test" and r["frame_rate"] == tok.config.rate
        assert all(0 <= u < tok.k for u in r["units"]) and len(r["units"]) == len(r["durations"])
        assert r["text"] == " ".join(w for w, _, _ in r["words"])
        # word spans tile the unit grid exactly
        assert r["words"][0][1] == 0.0
        assert r["words"][-1][2] == pytest.approx(sum(r["durations"]) / r["frame_rate"])
        assert all(a[2] == b[1] for a, b in itertools.pairwise(r["words"]))
        corpus.word_units(r)


def test_shipped_organism_loads_and_matches_its_results() -> None:
    import speech_lens

    res = json.loads((SHIPPED / "results.json").read_text())
    name = "text_lm"
    m = speech_lens.load_model(SHIPPED / name)
    assert m.n_layers == res["organisms"][name]["config"]["n_layers"]
    vocab = OrganismVocab.from_json(
        {
            "words": [
                m.tokenizer.convert_ids_to_tokens(i)
                for i in range(3, int(m.layout.marker_ids["text"]))
            ],
            "n_units": m.layout.units.count,
        }
    )
    test = gates.utterances(list(corpus.read_jsonl(SHIPPED / "test_manifest.jsonl")), vocab)
    t = gates.lens_tables(m.hf_model, test, vocab, "text")
    # recomputing the text-prompt lens from the shipped weights reproduces results.json
    assert t["nxt@1"] == pytest.approx(res["organisms"][name]["lens"]["text"]["nxt@1"], abs=2e-3)


def test_own_lens_agrees_with_speech_lens_logit_lens() -> None:
    """The organisms' evaluation lens (HF hidden states) and the library's streaming logit lens
    (TransformerBridge hooks) pick the same top text token at every layer and position."""
    import speech_lens

    m = speech_lens.load_model(SHIPPED / "control_planted_l3")
    rec = next(corpus.read_jsonl(SHIPPED / "test_manifest.jsonl"))
    first, speech = int(m.layout.units.first_id), int(m.layout.marker_ids["speech"])
    seq = [1, speech, *[first + u for u in rec["units"]]]
    res = speech_lens.logit_lens(m, torch.tensor(seq), k=1)
    ours = gates.layer_logits(m.hf_model, torch.tensor([seq]))[:, 0]
    w0, w1 = 3, int(m.layout.marker_ids["text"])
    assert torch.equal(res.topk_ids[:, :, 0], ours[:, :, w0:w1].argmax(-1) + w0)
