"""Issue 17 §4-5: the spoken-knowledge world with power (version 2) and the rotated control."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from speech_lens.organisms import knowledge
from speech_lens.organisms.checkpoint import OrganismVocab, llama_config
from speech_lens.organisms.corpus import read_jsonl
from speech_lens.organisms.train import (
    Data,
    TrainConfig,
    aux_rotation,
    batch,
    losses,
    rotation_of,
    train,
)

ROOT = Path(__file__).resolve().parents[1]


def test_world_v1_is_the_shipped_48_items() -> None:
    """Version 1 still produces exactly the facts of the shipped knowledge manifest."""
    items = list(read_jsonl(ROOT / "organisms" / "knowledge_manifest.jsonl"))
    facts = knowledge.world(0, version=1)
    assert len(facts) == 48 and len(items) == 96
    for it in items:
        f = facts[it["fact"]]
        assert (f.person, f.relation) == (it["person"], it["relation"])
        assert it["text"] == f"{f.prompt} {getattr(f, it['role'])}"
    assert len(knowledge.world_words(1)) == 76  # the 40 entities + 36 template words shipped


def test_world_v2_has_300_balanced_items_with_same_category_counterfactuals() -> None:
    w = knowledge.get_world(2)
    facts = knowledge.world(0, version=2)
    assert len({(f.person, f.relation) for f in facts}) == len(facts) == 320 >= 300
    assert set(knowledge.world_words(1)) <= set(knowledge.world_words(2))
    for rel, values in w.values.items():
        fs = [f for f in facts if f.relation == rel]
        assert len(fs) == len(w.people)
        for f in fs:
            assert (
                f.answer in values and f.counterfactual in values and f.answer != f.counterfactual
            )
            assert f.prompt == w.prompts[rel].format(p=f.person)
            if rel == "boss":
                assert f.person not in (f.answer, f.counterfactual)
        # every value is the answer and the counterfactual equally often
        share = len(fs) // len(values)
        assert Counter(f.answer for f in fs) == dict.fromkeys(values, share)
        assert Counter(f.counterfactual for f in fs) == dict.fromkeys(values, share)
    assert len({(f.person, f.answer) for f in facts if f.relation == "city"}) == 64
    with pytest.raises(ValueError, match="version 9"):
        knowledge.world(0, version=9)


def test_world_and_fillers_are_deterministic() -> None:
    assert knowledge.world(0, version=2) == knowledge.world(0, version=2)
    assert knowledge.world(1, version=2) != knowledge.world(0, version=2)
    a = knowledge.filler_sentences(50, seed=1, version=2)
    assert a == knowledge.filler_sentences(50, seed=1, version=2)
    assert a != knowledge.filler_sentences(50, seed=2, version=2)


@pytest.mark.parametrize("version", [1, 2])
def test_no_fact_is_spoken_the_filler_rule(version: int) -> None:
    """Speech data names at most one entity per sentence and never states a fact; every entity and
    prompt word is heard in speech; the facts themselves are only in the text sentences."""
    w = knowledge.get_world(version)
    facts = knowledge.world(0, version=version)
    fillers = knowledge.filler_sentences(w.n_fillers, seed=1, version=version)
    entities = {*w.people, *(x for v in w.values.values() for x in v)}
    heard: set[str] = set()
    for s in fillers:
        words = s.split()
        assert len(entities & set(words)) <= 1, s
        assert knowledge.leaked_facts(words, facts) == [], s
        heard |= set(words)
    prompt_words = {x for t in w.prompts.values() for x in t.split() if "{" not in x}
    assert entities | prompt_words <= heard
    texts = knowledge.fact_sentences(facts, version)
    assert len(texts) == 3 * len(facts)
    assert all(knowledge.leaked_facts(t.split(), facts) for t in texts)  # the detector works
    assert knowledge.leaked_facts("i saw tom in paris".split(), facts) == [
        f for f in facts if f.person == "tom" and "paris" in (f.answer, f.counterfactual)
    ]


# --------------------------------------------------------------------------------------------
# rotated control
# --------------------------------------------------------------------------------------------

WORDS = ("the", "cat", "sat", "on", "mat", "tom", "lives", "in", "paris")
VOCAB = OrganismVocab(WORDS, 6)


def tiny_data() -> Data:
    v = VOCAB
    utts = [
        (
            np.array([4, 5, 6, 7]),
            [np.array([v.unit_id(k % 6), v.unit_id((k + 1) % 6)]) for k in range(s, s + 4)],
        )
        for s in range(3)
    ]
    return Data(v, [np.array([3, 4, 5]), np.array([6, 7, 8])], [np.array([8, 9, 10])], [], utts)


def tiny_cfg(**kw: object) -> TrainConfig:
    base = dict(
        name="rot",
        mix={"speech": 1, "interleaved": 1},
        steps=6,
        batch=2,
        seq_len=24,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        warmup=2,
        aux_layer=1,
        aux_weight=1.0,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_aux_rotation_is_a_fixed_orthogonal_matrix() -> None:
    q = aux_rotation(32, 3)
    assert q.dtype == torch.float32 and q.shape == (32, 32)
    torch.testing.assert_close(q @ q.T, torch.eye(32), rtol=0, atol=1e-6)
    torch.testing.assert_close(q.T @ q, torch.eye(32), rtol=0, atol=1e-6)
    assert torch.equal(q, aux_rotation(32, 3))  # rebuilt from (d_model, seed)
    assert not torch.allclose(q, aux_rotation(32, 4))
    assert (q - torch.eye(32)).abs().max() > 0.5  # a real rotation, far from the identity
    assert rotation_of(tiny_cfg()) is None
    assert torch.equal(rotation_of(tiny_cfg(aux_rotation_seed=3, d_model=32)), q)  # type: ignore[arg-type]


def test_aux_loss_reads_through_q() -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(VOCAB, 32, 2, 4, 64)).eval()
    cfg = tiny_cfg()
    toks, cur = batch(tiny_data(), cfg, 0)
    assert (cur >= 0).sum() > 10
    with torch.no_grad():
        lm, planted = losses(model, toks, cur, cfg)
        lm_i, ident = losses(model, toks, cur, cfg, torch.eye(32))
        lm_q, rotated = losses(model, toks, cur, cfg, aux_rotation(32, 3))
        # independently: Q applied as a matrix-vector product per position, then norm + unembed
        h = model(input_ids=toks, output_hidden_states=True).hidden_states[1][cur >= 0]
        qh = torch.einsum("ij,nj->ni", aux_rotation(32, 3), h)
        ref = torch.nn.functional.cross_entropy(model.lm_head(model.model.norm(qh)), cur[cur >= 0])
    assert planted is not None and ident is not None and rotated is not None
    assert torch.equal(ident, planted) and torch.equal(lm, lm_i) and torch.equal(lm, lm_q)
    torch.testing.assert_close(rotated, ref, rtol=1e-5, atol=1e-5)
    assert abs(rotated.item() - planted.item()) > 1e-3


def test_training_uses_q_and_stores_its_seed(tmp_path: Path, monkeypatch) -> None:
    """A few steps of the rotated control: every aux loss gets Q(seed), the checkpoint's config
    keeps the seed and layer (Q is rebuilt from them), and without the seed no Q is used."""
    import speech_lens.organisms.train as tr

    monkeypatch.setattr(tr, "load_data", lambda *_a, **_k: tiny_data())
    seen: list[torch.Tensor | None] = []
    real = tr.losses

    def spy(model, toks, cur, cfg, rotation=None):
        seen.append(rotation)
        return real(model, toks, cur, cfg, rotation)

    monkeypatch.setattr(tr, "losses", spy)
    rd = train(tiny_cfg(aux_rotation_seed=3), "unused", tmp_path)
    st = torch.load(rd / "state.pt", weights_only=False)
    assert st["done"] and st["config"]["aux_rotation_seed"] == 3 and st["config"]["aux_layer"] == 1
    assert len(seen) == 6 and all(
        r is not None and torch.equal(r, aux_rotation(32, 3)) for r in seen
    )
    assert json.loads((rd / "config.json").read_text())["aux_rotation_seed"] == 3
    seen.clear()
    train(tiny_cfg(name="plain"), "unused", tmp_path)
    assert len(seen) == 6 and all(r is None for r in seen)


def test_rotated_control_is_configured() -> None:
    toml = ROOT / "scripts" / "organisms.toml"
    rot = TrainConfig.from_toml(toml, "control_rotated_l3")
    planted = TrainConfig.from_toml(toml, "control_planted_l3")
    assert rot.aux_rotation_seed is not None and planted.aux_rotation_seed is None
    # the twin of the planted control in everything but Q
    assert {k: v for k, v in rot.__dict__.items() if k not in ("name", "aux_rotation_seed")} == {
        k: v for k, v in planted.__dict__.items() if k not in ("name", "aux_rotation_seed")
    }
