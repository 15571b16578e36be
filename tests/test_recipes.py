"""CONTRIBUTING.md's three recipes, each followed once: a lens metric, a patching experiment and a
checkpoint family, all defined here and picked up by the library and the CLI with no other edit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from speech_lens.cli.main import build_parser, main
from speech_lens.data.encoded import SPEECH
from speech_lens.data.manifest import write_manifest
from speech_lens.data.prompts import encode_prompt
from speech_lens.lens.logit import word_lens
from speech_lens.lens.metrics import DatasetMetrics, aggregate
from speech_lens.lens.records import utterance_record
from speech_lens.lens.registry import (
    SpeechPositionMetric,
    register_lens_metric,
    unregister_lens_metric,
)
from speech_lens.lens.tables import layer_table
from speech_lens.models.load import load_model
from speech_lens.models.spec import FAMILIES_ENV, SPEC_DIR, available_families
from speech_lens.patching.cross_modal import cross_modal, cross_modal_many
from speech_lens.report.lens import compare_figure
from speech_lens.runs.experiments import (
    EXPERIMENTS,
    Experiment,
    ExperimentRun,
    register_experiment,
    unregister_experiment,
)
from speech_lens.testing.families import random_utterances

# ------------------------------------------------------------------------------------------------
# recipe 1: a lens metric = one registry entry + its computation
# ------------------------------------------------------------------------------------------------


def text_is_top1(result, columns, layout):
    """1 where the overall top-1 token at a speech position is a text token."""
    return layout.is_text(result.topk_ids_all[:, columns, 0])


def test_recipe_lens_metric(tiny_model):
    model = tiny_model("spiritlm")
    utts = random_utterances(3, rate=model.layout.units.frame_rate, seed=4)
    prompts = [encode_prompt(model, u, mode="speech") for u in utts]
    results = [word_lens(model, p, k=5) for p in prompts]
    register_lens_metric(SpeechPositionMetric("text_top1", "top-1 is a text token", text_is_top1))
    try:
        records = [
            utterance_record(r, p, model.layout) for r, p in zip(results, prompts, strict=True)
        ]
        m = aggregate(records, n_boot=20)
        fig = compare_figure({"run": m}, metric="text_top1")
    finally:
        unregister_lens_metric("text_top1")
    # the same statistic counted independently from the raw results: text ids by membership
    text_ids = model.layout.text_ids
    counts, n_speech = [], 0
    for r, p in zip(results, prompts, strict=True):
        speech = p.positions_of(SPEECH)
        cols = torch.tensor([r.positions.tolist().index(q) for q in speech.tolist()])
        counts.append(torch.isin(r.topk_ids_all[:, cols, 0], text_ids).sum(1).double())
        n_speech += len(speech)
    for rec, c in zip(records, counts, strict=True):
        assert rec.position_sums["text_top1"] == c.tolist()
        assert rec.to_json()["position_sums"]["text_top1"] == c.tolist()
    expected = (torch.stack(counts).sum(0) / n_speech).tolist()
    np.testing.assert_allclose(m.curves["text_top1"].mean, expected, rtol=1e-12)
    # a text top-1 is never a unit top-1: the two shares add up to at most 1 at every layer
    assert all(a + b <= 1 + 1e-12 for a, b in zip(expected, m.unit_top1.mean, strict=True))
    assert [row["text_top1"] for row in layer_table(m)] == m.curves["text_top1"].mean
    (line,) = [t for t in fig.data if t.name == "run"]  # the mean curve (the band has no name)
    assert list(line.y) == pytest.approx(m.curves["text_top1"].mean)
    assert DatasetMetrics.from_json(m.to_json()).curves == m.curves
    # unregistered: the record and metrics.json formats are the ones without the metric
    plain = utterance_record(results[0], prompts[0], model.layout)
    assert "position_sums" not in plain.to_json()
    assert "curves" not in aggregate([plain], n_boot=5).to_json()


# ------------------------------------------------------------------------------------------------
# recipe 2: a patching experiment = one class, registered once
# ------------------------------------------------------------------------------------------------


def test_recipe_patching_experiment(tiny_checkpoint, tmp_path):
    path, kw = tiny_checkpoint("spiritlm")

    @register_experiment
    class FirstWordTextToSpeech(Experiment):
        """Text -> speech patching of the first word only."""

        name = "first-word-text-to-speech"
        metric = "log P(next word's first text sub-token) at word 0's end"
        positions = "word 0's span"

        def run(self, run: ExperimentRun, summary: dict) -> list[dict]:
            per_utt = cross_modal_many(
                run.model,
                run.utterances,
                direction="text-to-speech",
                words=[0],
                component=run.component,
                rule=run.rule,
                layers=run.layers,
                read_layer=run.read_layer,
                **run.batching,
            )
            summary["words"] = sum(len(rs) for rs in per_utt)
            return [row for rs in per_utt for r in rs for row in r.to_table()]

    try:
        model = load_model(path, **kw)
        utts = random_utterances(2, rate=model.layout.units.frame_rate, seed=6)
        write_manifest(tmp_path / "data.jsonl", utts)
        out = tmp_path / "out"
        argv = ["patch", str(path), str(tmp_path / "data.jsonl"), "--out", str(out)]
        argv += ["--experiment", FirstWordTextToSpeech.name, "--layers", "0,1"]
        assert main(argv) == 0
    finally:
        unregister_experiment(FirstWordTextToSpeech.name)
    summary = json.loads((out / "first-word-text-to-speech.json").read_text())
    assert summary["words"] == 2
    assert summary["provenance"]["settings"]["metric"] == FirstWordTextToSpeech.metric
    rows = (out / "first-word-text-to-speech.csv").read_text().splitlines()
    # the same numbers from the one-utterance function, computed separately
    direct = [cross_modal(model, u, words=[0], layers=[0, 1])[0] for u in utts]
    values = [float(r.values.flatten()[i]) for r in direct for i in range(r.values.numel())]
    header = rows[0].split(",")
    got = [float(line.split(",")[header.index("value")]) for line in rows[1:]]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(values), rtol=1e-5, atol=1e-5)
    # unregistered: the CLI no longer offers it, the built-ins are untouched
    assert FirstWordTextToSpeech.name not in EXPERIMENTS
    assert list(EXPERIMENTS) == ["text-to-speech", "speech-to-text", "word-swap"]
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv[:5], "--experiment", FirstWordTextToSpeech.name])


# ------------------------------------------------------------------------------------------------
# recipe 3: a checkpoint family = one TOML file
# ------------------------------------------------------------------------------------------------


def test_recipe_checkpoint_family(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    path, kw = tiny_checkpoint("spiritlm")
    families = tmp_path / "families"
    families.mkdir()
    # a new family: SpiritLM's format under a new name (shipped, it would sit in SPEC_DIR)
    text = (SPEC_DIR / "spiritlm.toml").read_text().replace('name = "spiritlm"', 'name = "toy"')
    (families / "toy.toml").write_text(text)
    monkeypatch.setenv(FAMILIES_ENV, str(families))
    assert "toy" in available_families() and "spiritlm" in available_families()
    toy = load_model(path, family="toy", **kw)
    ref = load_model(path, family="spiritlm", **kw)
    assert toy.spec.name == "toy"
    assert torch.equal(toy.layout.unit_ids, ref.layout.unit_ids)
    u = random_utterances(1, rate=toy.layout.units.frame_rate, seed=2)[0]
    for mode in ("speech", "interleaved"):
        assert torch.equal(
            encode_prompt(toy, u, mode=mode, seed=3).tokens,
            encode_prompt(ref, u, mode=mode, seed=3).tokens,
        )
    assert main(["inspect", str(path), "--family", "toy", "--json"]) == 0
    assert '"toy"' in capsys.readouterr().out
    # the same name twice is refused with both files named
    shutil.copy(families / "toy.toml", families / "toy2.toml")
    with pytest.raises(ValueError, match=r"toy.toml and .*toy2.toml"):
        available_families()
    Path(families / "toy2.toml").unlink()
