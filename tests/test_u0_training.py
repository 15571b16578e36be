"""The organisms' U0 training path: speech drawn from the lexicon with a fresh noisy rendition per
draw, U0 manifests that the library reads back word by word, and bf16 autocast training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from speech_lens.data.manifest import utterance_from_record
from speech_lens.organisms import train, u0
from speech_lens.organisms.checkpoint import OrganismVocab
from speech_lens.organisms.corpus import word_units

ROOT = Path(__file__).resolve().parents[1]
LEXICON = u0.load_lexicon(ROOT / "organisms" / "u0_lexicon.json")
CLAUSES = ["she was not to be", "and i am very sorry", "it was a very good thing", "her father"]


def data_folder(tmp: Path, n_units: int = len(u0.U0_PHONEMES)) -> Path:
    words = sorted({w for c in CLAUSES for w in c.split()})
    (tmp / "vocab.json").write_text(json.dumps({"words": words, "n_units": n_units}))
    text = {"clauses": [c.split() for c in CLAUSES], "held_out": [False] * len(CLAUSES)}
    text.update(facts=["her father"], fillers=[], speech_train=CLAUSES)
    (tmp / "text.json").write_text(json.dumps(text))
    (tmp / "u0_lexicon.json").write_text((ROOT / "organisms" / "u0_lexicon.json").read_text())
    return tmp


def config(p: float, mix: dict[str, float]) -> train.TrainConfig:
    return train.TrainConfig(name="t", units="u0", unit_noise=p, mix=mix, batch=4, seq_len=64)


def spoken_words(toks: torch.Tensor, cur: torch.Tensor, vocab: OrganismVocab) -> list:
    """(word id, unit indices) of every complete run of unit positions labelled with one word."""
    out, run, label = [], [], None
    for t, c in zip(toks.tolist(), cur.tolist(), strict=True):
        if c >= 0 and c == label and t >= vocab.first_unit:
            run.append(t - vocab.first_unit)
            continue
        if run:
            out.append((label, run))
        run, label = ([t - vocab.first_unit], c) if c >= 0 else ([], None)
    return out[1:]  # the row's first run may be cut by the window (the last is never appended)


def test_u0_batches_speak_each_word_in_its_lexicon_units_at_p0(tmp_path: Path) -> None:
    d = data_folder(tmp_path)
    cfg = config(0.0, {"speech": 0.5, "interleaved": 0.5})
    data = train.load_data(d, need_speech=True, units="u0", noise=0.0)
    toks, cur = train.batch(data, cfg, step=3)
    words = {data.vocab.word_id(w): w for c in CLAUSES for w in c.split()}
    runs = [r for row in range(len(toks)) for r in spoken_words(toks[row], cur[row], data.vocab)]
    assert len(runs) > 20
    for wid, units in runs:
        assert units == u0.dedup(LEXICON[words[wid]])


def test_u0_noise_gives_fresh_renditions_and_batches_stay_a_function_of_the_step(
    tmp_path: Path,
) -> None:
    d = data_folder(tmp_path)
    cfg = config(0.35, {"speech": 1.0})
    data = train.load_data(d, need_speech=True, units="u0", noise=0.35)
    a, b = train.batch(data, cfg, 5), train.batch(data, cfg, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    seen: dict[int, set] = {}
    for step in range(6):
        toks, cur = train.batch(data, cfg, step)
        for row in range(len(toks)):
            for wid, units in spoken_words(toks[row], cur[row], data.vocab):
                seen.setdefault(wid, set()).add(tuple(units))
    # "very" (4 phonemes) recurs across draws: noise at 0.35 gives it several unit strings
    very = data.vocab.word_id("very")
    assert len(seen[very]) >= 3
    clean = tuple(u0.dedup(LEXICON["very"]))
    assert any(s != clean for s in seen[very])


def test_u0_data_refuses_a_vocab_without_59_units_and_an_unknown_word(tmp_path: Path) -> None:
    d = data_folder(tmp_path, n_units=100)
    with pytest.raises(ValueError, match=r"vocab\.json.*n_units is 100"):
        train.load_data(d, need_speech=True, units="u0")
    d = data_folder(tmp_path)
    text = json.loads((d / "text.json").read_text())
    text["speech_train"].append("her zyzzyva")
    (d / "text.json").write_text(json.dumps(text))
    with pytest.raises(ValueError, match=r"u0_lexicon\.json.*zyzzyva"):
        train.load_data(d, need_speech=True, units="u0")
    with pytest.raises(ValueError, match="units must be"):
        train.load_data(d, need_speech=True, units="mfcc")


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5])
def test_u0_record_reads_back_word_by_word_in_the_organisms_and_the_library(p: float) -> None:
    noise = u0.UnitNoise(p, seed=1000)
    words = "it was a very good thing".split()
    rec = u0.u0_record("test-0007", "test", words, LEXICON, noise)
    expected = [noise(LEXICON[w], "test-0007", j) for j, w in enumerate(words)]
    assert word_units(rec) == (words, expected)
    utt = utterance_from_record(rec)
    assert [w.text for w in utt.words] == words
    ends = np.cumsum([len(e) for e in expected]) / u0.U0_FRAME_RATE
    np.testing.assert_allclose([w.end for w in utt.words], ends, atol=1e-4)
    with pytest.raises(ValueError, match="zyzzyva"):
        u0.u0_record("x", "test", ["zyzzyva"], LEXICON, noise)


def test_bf16_autocast_loss_tracks_fp32_and_trains(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    from speech_lens.organisms.checkpoint import llama_config

    d = data_folder(tmp_path)
    data = train.load_data(d, need_speech=True, units="u0")
    cfg32 = config(0.0, {"interleaved": 1.0})
    cfg16 = train.TrainConfig(**{**cfg32.__dict__, "autocast_bf16": True})
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(data.vocab, 64, 2, 4, 128))
    toks, cur = train.batch(data, cfg32, 0)
    lm32, _ = train.losses(model, toks, cur, cfg32)
    lm16, _ = train.losses(model, toks, cur, cfg16)
    assert lm16.dtype == torch.float32
    torch.testing.assert_close(lm16, lm32, atol=0.05, rtol=0.01)  # bf16 has 8 mantissa bits
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss, _ = train.losses(model, toks, cur, cfg16)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0
