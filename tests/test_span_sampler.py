"""Interleaved prompts sample their spoken words with each family's own span sampler (from its
spec), ``--span-sampler`` overrides it, and the sampler is part of a run's settings and resume key."""

from __future__ import annotations

import json

import numpy as np
import pytest

from speech_lens import write_manifest
from speech_lens.cli.main import main
from speech_lens.data.encoded import SPEECH
from speech_lens.data.prompts import encode_prompt
from speech_lens.data.utterance import Utterance, Word
from speech_lens.data.word_targets import sample_speech_words
from speech_lens.models.spec import AdapterError, AdapterSpec, available_families
from speech_lens.runs.lens_settings import LensRunConfig
from speech_lens.testing.families import random_utterances


def _long_utterance(n_words: int = 16, rate: float = 25.0) -> Utterance:
    words = ["the", "cat", "sat", "on", "a", "mat"]
    ws = tuple(Word(words[j % 6], 0.3 * j, 0.3 * j + 0.25) for j in range(n_words))
    units = tuple((7 * i) % 500 for i in range(int(ws[-1].end * rate) + 2))
    return Utterance(id="long", words=ws, units=units, durations=None, frame_rate=rate)


def test_family_specs_name_their_sampler():
    fams = available_families()
    assert fams["spiritlm"].prompt.span_sampler == "spiritlm"
    assert fams["spiritlm-expressive"].prompt.span_sampler == "spiritlm"
    assert fams["sims"].prompt.span_sampler == "poisson"
    assert fams["speechgpt"].prompt.span_sampler == "poisson"
    raw = {
        "name": "x",
        "units": {"pattern": "<{k}>", "count": 2, "first_id": 10, "frame_rate": 25.0},
        "prompt": {"span_sampler": "uniform"},
    }
    with pytest.raises(AdapterError, match=r"my\.toml: prompt\.span_sampler 'uniform'"):
        AdapterSpec.from_dict(raw, source="my.toml")


def test_interleaved_prompts_default_to_the_family_sampler(tiny_model):
    model = tiny_model("spiritlm")
    u = _long_utterance()
    differs = 0
    for seed in range(8):
        got = encode_prompt(model, u, mode="interleaved", seed=seed)
        spoken = {s.index for s in got.spans if s.modality == SPEECH}
        own = sample_speech_words(len(u.words), "spiritlm", np.random.default_rng(seed))
        poisson = sample_speech_words(len(u.words), "poisson", np.random.default_rng(seed))
        assert spoken == own, seed
        differs += own != poisson
        forced = encode_prompt(model, u, mode="interleaved", seed=seed, span_sampler="poisson")
        assert {s.index for s in forced.spans if s.modality == SPEECH} == poisson
    assert differs >= 4  # the two samplers really give other prompts


def test_config_fills_and_checks_the_sampler_settings():
    base = {"checkpoint": "c", "data": "d", "family": "spiritlm"}
    cfg = LensRunConfig(**base, mode="interleaved", span_sampler="spiritlm")
    assert cfg.span_settings() == {
        "span_sampler": "spiritlm",
        "span_mean": 5.0,
        "speech_fraction": None,
        "span_seed": "crc32(utterance id) xor seed",
    }
    poisson = LensRunConfig(**base, mode="interleaved", span_sampler="poisson", span_mean=4)
    assert (poisson.span_mean, poisson.speech_fraction) == (4.0, 0.3)
    assert poisson.resume_key()["span_sampler"] == "poisson" != cfg.resume_key()["span_sampler"]
    assert LensRunConfig(**base).span_settings() == dict.fromkeys(cfg.span_settings())
    with pytest.raises(ValueError, match="needs span_sampler"):
        LensRunConfig(**base, mode="interleaved")
    with pytest.raises(ValueError, match="takes no speech_fraction"):
        LensRunConfig(**base, mode="interleaved", span_sampler="spiritlm", speech_fraction=0.5)
    with pytest.raises(ValueError, match="span_sampler must be one of"):
        LensRunConfig(**base, mode="interleaved", span_sampler="uniform")
    with pytest.raises(ValueError, match="for interleaved runs"):
        LensRunConfig(**base, span_sampler="poisson")


def test_cli_records_the_sampler_and_refuses_to_resume_with_another(
    tiny_checkpoint, tmp_path, capsys
):
    path, _ = tiny_checkpoint("spiritlm")
    data = tmp_path / "data.jsonl"
    write_manifest(data, random_utterances(3))
    out = tmp_path / "run"
    argv = ["lens", str(path), str(data), "--out", str(out), "--k", "5", "--n-boot", "5"]
    argv += ["--no-progress", "--mode", "interleaved", "--seed", "3"]
    assert main(argv) == 0
    info = json.loads((out / "metrics.json").read_text())
    settings = info["provenance"]["settings"]
    assert settings["span_sampler"] == "spiritlm"  # the family's own, from its spec
    assert (settings["span_mean"], settings["speech_fraction"]) == (5.0, None)
    assert settings["seed"] == 3 and settings["span_seed"] == "crc32(utterance id) xor seed"
    assert info["config"]["span_sampler"] == "spiritlm"
    header = json.loads((out / "partial.jsonl").read_text().split("\n")[0])["header"]
    assert header["span_sampler"] == "spiritlm" and header["seed"] == 3
    capsys.readouterr()
    # a resumed run with another sampler must not mix its prompts with the finished ones
    assert main([*argv, "--span-sampler", "poisson"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "'span_sampler': 'poisson'" in err
    assert main([*argv, "--span-sampler", "spiritlm"]) == 0  # the same sampler resumes
    assert main([*argv, "--span-sampler", "poisson", "--restart"]) == 0
    info = json.loads((out / "metrics.json").read_text())
    assert info["provenance"]["settings"]["span_sampler"] == "poisson"
    assert info["provenance"]["settings"]["speech_fraction"] == 0.3
    speech = ["lens", str(path), str(data), "--out", str(tmp_path / "s"), "--no-progress"]
    assert main([*speech, "--span-sampler", "poisson"]) == 2
    assert "only with --mode interleaved" in capsys.readouterr().err
