"""Batched patching equals one-by-one patching on every family's tiny checkpoint.

Two kinds of batching: the cells of one sweep (the target repeated, each row patched by its own
cell) and utterance pairs of different lengths padded together (source/target runs and patched
rows), on either padding side. fp32 values agree up to summation order, so the comparisons use
assert_close at 1e-5; every compared quantity is checked to move under patching, so an equality
cannot come from a patch that did nothing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import speech_lens.batching as batching
from speech_lens.batching import auto_batch_size
from speech_lens.data.prompts import encode_prompt
from speech_lens.patching.cross_modal import cross_modal
from speech_lens.patching.hooks import (
    cache_source,
    cache_sources,
    hook_name,
    row_patches,
    run_patched,
)
from speech_lens.patching.metrics import (
    kl_to_clean,
    lens_next_word_logprob,
    logit_diff,
    next_token_logprob,
    word_token_ids,
)
from speech_lens.patching.positions import map_words
from speech_lens.patching.sweep import _forward_rows, _Row, patch_sweep
from speech_lens.runs.patch import run_experiment

MANIFEST = Path(__file__).parents[1] / "examples" / "data" / "sample_manifest.jsonl"
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _utts(model):
    from speech_lens.data.manifest import read_manifest

    return list(read_manifest(MANIFEST, layout=model.layout))


def _text_speech(model, utt):
    return encode_prompt(model, utt, mode="text"), encode_prompt(model, utt, mode="speech")


def _batch_sizes(model):
    """A fwd_hook that records the batch size of every patched forward."""
    seen: list[int] = []

    def spy(act, *, hook):
        seen.append(int(act.shape[0]))

    return seen, [(hook_name("resid_pre", 0), spy)]


def _same_sweep(a, b):
    assert a.axes == b.axes and a.positions == b.positions and a.layers == b.layers
    assert_close(b.values, a.values, **TOL)
    assert b.baseline == pytest.approx(a.baseline, abs=1e-5)
    if a.source_value is None:
        assert b.source_value is None
    else:
        assert b.source_value == pytest.approx(a.source_value, abs=1e-5)


def test_sweep_batched_equals_one_by_one(tiny_model, family):
    """resid_pre over all layers x word groups, text -> speech (different lengths), with four
    metrics: batch 3 and 'auto' under a memory budget give the batch-1 values."""
    model = tiny_model(family)
    text, speech = _text_speech(model, _utts(model)[0])
    assert len(text) != len(speech)
    pm = map_words(text, speech, rule="last")
    last = len(speech) - 1
    cat, mat = word_token_ids(model, "cat"), word_token_ids(model, "mat")
    src_logits, _ = cache_source(model, text, [])
    metrics = {
        "next-token": next_token_logprob(last, cat),
        "logit-diff": logit_diff(last, cat, mat),
        "kl": kl_to_clean(src_logits, len(text) - 1, last),
        "lens": lens_next_word_logprob(model, speech, 4, 1),  # reads resid_pre of block 1
    }
    n_rows = model.n_layers * len(pm) + 1  # every cell, and the unpatched target
    for name, metric in metrics.items():
        ref = patch_sweep(model, text, speech, pm, metric, positions="group")
        assert ref.values.shape == (model.n_layers, len(pm))
        assert float((ref.values - ref.baseline).abs().max()) > 1e-4, name  # patches matter
        seen, spy = _batch_sizes(model)
        got = patch_sweep(
            model, text, speech, pm, metric, positions="group", batch_size=3, fwd_hooks=spy
        )
        assert sum(seen) == n_rows and max(seen) == 3, (name, seen)
        _same_sweep(ref, got)
        if name == "next-token":
            fits = auto_batch_size(model, len(speech), memory_budget_gb=0.25, max_batch=10_000)
            seen, spy = _batch_sizes(model)
            auto = patch_sweep(
                model,
                text,
                speech,
                pm,
                metric,
                positions="group",
                batch_size="auto",
                memory_budget_gb=0.25,
                fwd_hooks=spy,
            )
            assert sum(seen) == n_rows and 1 < max(seen) <= min(fits, 32), (seen, fits)
            _same_sweep(ref, auto)


def test_head_sweep_batched(tiny_model):
    model = tiny_model("sims-llama")
    text, speech = _text_speech(model, _utts(model)[2])
    pm = map_words(text, speech, rule="mean")
    metric = next_token_logprob(len(speech) - 1, word_token_ids(model, "cat"))
    ref = patch_sweep(model, text, speech, pm, metric, component="z", heads="each")
    got = patch_sweep(model, text, speech, pm, metric, component="z", heads="each", batch_size=5)
    assert ref.axes == ("layer", "position", "head")
    assert float((ref.values - ref.baseline).abs().max()) > 1e-4
    _same_sweep(ref, got)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("fam", ["spiritlm", "sims-qwen"])
def test_rows_do_not_leak(tiny_model, fam, side):
    """One padded forward of rows patched at different layers / words / targets of different
    lengths, plus an unpatched row: every row's full log-probs equal its own single run."""
    model = tiny_model(fam)
    u1, u2 = _utts(model)[:2]
    t1, s1 = _text_speech(model, u1)
    t2, s2 = _text_speech(model, u2)
    names = [hook_name("resid_pre", i) for i in range(model.n_layers)]
    _, c1 = cache_source(model, t1, names)
    _, c2 = cache_source(model, s2, names)
    m1a = map_words(t1, s1, [1], rule="last")
    m1b = map_words(t1, s1, [3], rule="last")
    m2 = map_words(s2, t2, [2], rule="mean")
    cases = [  # (target, source, map, cache, layer); None: unpatched
        (s1, t1, m1a, c1, 0),
        (s1, None, None, None, None),
        (s1, t1, m1b, c1, 1),
        (t2, s2, m2, c2, 1),
    ]

    def log_probs(logits):
        return logits.float().log_softmax(-1)

    rows = [
        _Row(
            tgt.tokens,
            log_probs,
            () if pm is None else row_patches(cache, pm, "resid_pre", [layer], None),
        )
        for tgt, _, pm, cache, layer in cases
    ]
    got = _forward_rows(model, rows, side, ())
    plain = log_probs(model.bridge(s1.tokens[None]))
    for (tgt, src, pm, _, layer), value in zip(cases, got, strict=True):
        if pm is None:
            ref = plain
        else:
            ref = log_probs(run_patched(model, src, tgt, pm, layers=layer))
            if tgt is s1:  # the patch changes this row: an equality is not trivial
                assert float((ref - plain).abs().max()) > 1e-3
        assert value.shape == ref.shape
        assert_close(value, ref, **TOL)


@pytest.mark.parametrize("side", ["right", "left"])
def test_cache_sources_and_experiment_across_pairs(tiny_model, family, side, tmp_path, monkeypatch):
    """Utterances of different lengths padded together: cached runs come back un-padded equal
    to their own runs, and run_experiment(batch_size=3) gives each word's per-utterance curve."""
    model = tiny_model(family)
    utts = _utts(model)
    prompts = [p for u in utts[:3] for p in _text_speech(model, u)]
    names = [hook_name("resid_pre", 1), hook_name("z", 0)]
    batched = cache_sources(model, prompts, names, batch_size=4, padding_side=side)
    for prompt, (logits, cache) in zip(prompts, batched, strict=True):
        ref_logits, ref_cache = cache_source(model, prompt, names)
        assert logits.shape == ref_logits.shape == (1, len(prompt), model.bridge.cfg.d_vocab)
        assert_close(logits, ref_logits, **TOL)
        for n in names:
            assert_close(cache[n], ref_cache[n], **TOL)

    padded: list[tuple[str, tuple[int, ...]]] = []
    real_pad = batching.pad_batch  # padded_inputs pads through it

    def spy(seqs, *, side="right", pad_id=0):
        batch = real_pad(seqs, side=side, pad_id=pad_id)
        padded.append((batch.side, batch.lengths))
        return batch

    monkeypatch.setattr(batching, "pad_batch", spy)
    summary = run_experiment(
        model,
        utts,
        tmp_path,
        layers=[0, 1],
        batch_size=3,
        padding_side=side,
        progress=False,
    )
    # source runs, target runs and patched rows of different utterances were padded together
    assert any(s == side and len(set(n)) > 1 for s, n in padded)
    assert max(len(n) for _, n in padded) == 3
    monkeypatch.undo()
    rows = list(csv.DictReader((tmp_path / "text-to-speech.csv").open()))
    ref = [r for u in utts for r in cross_modal(model, u, layers=[0, 1])]
    assert len(rows) == 2 * len(ref) == 2 * summary["words"]
    got = torch.tensor([float(r["value"]) for r in rows]).reshape(len(ref), 2)
    assert_close(got, torch.stack([r.values for r in ref]), **TOL)
    for what in ("baseline", "source_value"):
        col = torch.tensor([float(r[what]) for r in rows[::2]])
        assert_close(col, torch.tensor([getattr(r, what) for r in ref]), **TOL)
    assert float((got - col.new_tensor([r.baseline for r in ref])[:, None]).abs().max()) > 1e-4


@pytest.mark.parametrize("fam", ["spiritlm", "sims-qwen"])
def test_word_swap_and_lens_readout_across_pairs(tiny_model, fam, tmp_path):
    model = tiny_model(fam)
    utts = _utts(model)
    for experiment, kw in (("word-swap", {"word": 1}), ("speech-to-text", {"read_layer": 1})):
        tables = []
        for side, bs in (("right", 1), ("left", "auto")):
            out = tmp_path / f"{experiment}-{side}-{bs}"
            run_experiment(
                model,
                utts,
                out,
                experiment=experiment,
                layers=[0, 1],
                batch_size=bs,
                memory_budget_gb=1.0,
                padding_side=side,
                progress=False,
                **kw,
            )
            rows = list(csv.DictReader((out / f"{experiment}.csv").open()))
            tables.append(rows)
        ref = tables[0]
        vals = torch.tensor([float(r["value"]) for r in ref])
        base = torch.tensor([float(r["baseline"]) for r in ref])
        assert float((vals - base).abs().max()) > 1e-4
        for rows in tables[1:]:
            assert [(r["utterance"], r["layer"], r["position"]) for r in rows] == [
                (r["utterance"], r["layer"], r["position"]) for r in ref
            ]
            for col in ("value", "baseline", "source_value"):
                assert_close(
                    torch.tensor([float(r[col]) for r in rows]),
                    torch.tensor([float(r[col]) for r in ref]),
                    **TOL,
                )


def test_batch_size_refusals(tiny_model):
    model = tiny_model("spiritlm")
    text, speech = _text_speech(model, _utts(model)[0])
    pm = map_words(text, speech, rule="last")
    m = next_token_logprob(len(speech) - 1, word_token_ids(model, "cat"))
    with pytest.raises(ValueError, match="raise the budget"):
        patch_sweep(model, text, speech, pm, m, batch_size="auto", memory_budget_gb=0.001)
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        patch_sweep(model, text, speech, pm, m, batch_size=0)
    with pytest.raises(ValueError, match="padding side"):
        cache_sources(model, [text, speech], [], batch_size=2, padding_side="middle")


def test_cli_patch_batched_with_provenance(tiny_checkpoint, tmp_path, capsys):
    from speech_lens.cli.main import main

    path, _ = tiny_checkpoint("speechgpt")
    base = ["patch", str(path), str(MANIFEST), "--max-utterances", "3", "--layers", "0,1"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    flags = ["--batch-size", "auto", "--memory-budget", "1", "--padding-side", "left"]
    assert main([*base, "--out", str(tmp_path / "many"), *flags]) == 0
    summary = json.loads(capsys.readouterr().out)
    one = list(csv.DictReader((tmp_path / "one" / "text-to-speech.csv").open()))
    many = list(csv.DictReader((tmp_path / "many" / "text-to-speech.csv").open()))
    assert len(one) == len(many) > 0
    assert_close(
        torch.tensor([float(r["value"]) for r in many]),
        torch.tensor([float(r["value"]) for r in one]),
        **TOL,
    )
    meta = json.loads((tmp_path / "many" / "text-to-speech.json").read_text())
    assert meta["metadata"] == summary["metadata"]
    prov = meta["provenance"]
    assert len(prov["model"]["sha256"]) == 64 and len(prov["data"]["sha256"]) == 64
    settings = prov["settings"]
    assert settings["batch_size"] == "auto" and settings["padding_side"] == "left"
    assert settings["experiment"] == "text-to-speech" and settings["layers"] == [[0], [1]]
    assert "created_utc" not in prov  # reruns write the same file
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "bad"), "--batch-size", "many"])
