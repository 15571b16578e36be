"""Provenance: hashes recomputed independently, the digest cache, and provenance in every output."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import datetime
from importlib import metadata
from pathlib import Path

import pytest

from speech_lens import provenance as pv
from speech_lens import write_manifest
from speech_lens.lens.tuned import TunedLens
from speech_lens.models.spec import SPEC_DIR
from speech_lens.runs.lens import run_dataset
from speech_lens.runs.lens_settings import LensRunConfig
from speech_lens.testing.families import random_utterances


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_whole_session_caches_in_a_tmp_dir(tmp_path_factory):
    """conftest points SPEECH_LENS_CACHE at a session tmp dir for every test, also those that
    ask for no fixture, so no test writes the real ~/.cache (nor does a subprocess it starts)."""
    cache = Path(os.environ["SPEECH_LENS_CACHE"])
    assert cache.is_relative_to(tmp_path_factory.getbasetemp()) and cache.is_dir()
    assert pv.cache_dir() == cache


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPEECH_LENS_CACHE", str(cache))
    return cache


@pytest.fixture
def counted(monkeypatch):
    """Count the files actually read by the hasher."""
    calls: list[str] = []
    real = pv._sha256_file

    def spy(path, bar=None):
        calls.append(Path(path).name)
        return real(path, bar)

    monkeypatch.setattr(pv, "_sha256_file", spy)
    return calls


def test_collect_provenance_matches_independent_hashes(tiny_model, tmp_path, fresh_cache):
    model = tiny_model("spiritlm")
    data = tmp_path / "data.jsonl"
    write_manifest(data, random_utterances(2))
    settings = {"k": 5, "ks": (1, 5), "match": "first", "out": tmp_path}
    prov = pv.collect_provenance(model, data=data, settings=settings)
    json.dumps(prov)  # plain JSON

    weights = Path(model.path) / "pytorch_model.bin"
    file_sha = _sha(weights)
    m = prov["model"]
    assert m["files"] == {"pytorch_model.bin": file_sha}
    assert m["sha256"] == hashlib.sha256(f"pytorch_model.bin\0{file_sha}\n".encode()).hexdigest()
    assert m["bytes"] == weights.stat().st_size
    assert m["config_sha256"] == _sha(Path(model.path) / "config.json")
    assert m["family"] == "spiritlm" and m["n_layers"] == model.n_layers
    spec = SPEC_DIR / "spiritlm.toml"
    assert m["spec"] == {"name": "spiritlm", "path": str(spec.resolve()), "sha256": _sha(spec)}
    assert prov["versions"] == {
        "speech_lens": metadata.version("speech-lens"),
        "transformer-lens": metadata.version("transformer-lens"),
        "transformers": metadata.version("transformers"),
        "torch": metadata.version("torch"),
        "python": prov["versions"]["python"],
    }
    assert prov["versions"]["python"].startswith("3.")
    assert prov["data"] == {"path": str(data.resolve()), "sha256": _sha(data)}
    assert prov["lens"] == {"kind": "logit"}
    assert prov["settings"] == {"k": 5, "ks": [1, 5], "match": "first", "out": str(tmp_path)}
    assert datetime.fromisoformat(prov["created_utc"]).tzinfo is not None
    assert "created_utc" not in pv.stable(prov) and pv.stable(prov)["model"] == m
    # no file -> no hash, but the name is kept; unknown settings are refused by name
    assert pv.collect_provenance(model, data="in-memory")["data"] == {
        "path": "in-memory",
        "sha256": None,
    }
    with pytest.raises(TypeError, match=r"settings\.bad"):
        pv.collect_provenance(model, settings={"bad": object()})


def test_sharded_checkpoint_hashes_every_shard_and_the_index(tiny_model, fresh_cache):
    model = tiny_model("sims-qwen")
    prov = pv.model_provenance(model)
    files = sorted(p.name for p in Path(model.path).iterdir() if "safetensors" in p.name)
    assert sorted(prov["files"]) == files and len(files) == 3  # two shards + index
    for name, digest in prov["files"].items():
        assert digest == _sha(Path(model.path) / name)


def test_digest_cache_and_changed_weights(tiny_checkpoint, tmp_path, fresh_cache, counted):
    src, _ = tiny_checkpoint("spiritlm")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    files = pv.checkpoint_files(ckpt)
    first = pv.combined_digest(pv.file_digests(files))
    assert counted == ["pytorch_model.bin"]
    assert (fresh_cache / pv.HASH_CACHE).is_file()
    again = pv.combined_digest(pv.file_digests(files))
    assert again == first and counted == ["pytorch_model.bin"]  # cache hit: not read again
    # one byte of the weights changes: size and name are the same, the digest is not
    w = ckpt / "pytorch_model.bin"
    raw = bytearray(w.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    w.write_bytes(bytes(raw))
    changed = pv.combined_digest(pv.file_digests(files))
    assert changed != first and counted == ["pytorch_model.bin"] * 2
    assert pv.file_digests(files)["pytorch_model.bin"] == _sha(w)
    # a damaged cache file only costs a rehash
    (fresh_cache / pv.HASH_CACHE).write_text("{not json")
    assert pv.combined_digest(pv.file_digests(files)) == changed and len(counted) == 3


def test_lora_adapter_includes_its_base(tiny_checkpoint, fresh_cache):
    path, _ = tiny_checkpoint("speechgpt-com")
    names = set(pv.checkpoint_files(path))
    assert "adapter_config.json" in names and "base/pytorch_model.bin" in names
    assert any(n.startswith("adapter_model.") for n in names)


def test_tuned_lens_provenance(tiny_model, tmp_path, fresh_cache):
    model = tiny_model("spiritlm")
    d = TunedLens.from_model(model).save(tmp_path / "lens")
    lp = pv.lens_provenance(f"tuned:{d}")
    digests = {n: _sha(d / n) for n in pv.LENS_FILES}
    assert lp == {
        "kind": "tuned",
        "path": str(d.resolve()),
        "sha256": pv.combined_digest(digests),
        "files": digests,
    }
    with pytest.raises(ValueError, match="tuned:PATH"):
        pv.lens_provenance("tuned")
    with pytest.raises(FileNotFoundError, match="params.pt"):
        pv.lens_provenance(f"tuned:{tmp_path}")


def test_lens_run_outputs_carry_provenance(tiny_model, tmp_path, fresh_cache):
    model = tiny_model("spiritlm")
    data = tmp_path / "data.jsonl"
    write_manifest(data, random_utterances(3))
    cfg = LensRunConfig(
        checkpoint=str(model.path), data=str(data), family="spiritlm", k=5, ks=(1, 5), n_boot=20
    )
    out = tmp_path / "run"
    run_dataset(model, random_utterances(3), out, cfg, progress=False)
    text = (out / "metrics.json").read_text()
    prov = json.loads(text)["provenance"]
    assert prov["model"]["sha256"] == pv.model_provenance(model)["sha256"]
    assert prov["data"]["sha256"] == _sha(data)
    assert prov["settings"]["k"] == 5 and prov["settings"]["ks"] == [1, 5]
    assert prov["settings"]["match"] == "first" and prov["settings"]["pooling"] == pv.POOLING
    assert prov["settings"]["n_boot"] == 20 and prov["settings"]["seed"] == 0
    assert "created_utc" not in prov
    html = (out / "report.html").read_text()
    assert "Provenance" in html and prov["model"]["sha256"] in html and "created_utc" in html
    # a rerun (nothing recomputed) writes the same bytes: no timestamp in metrics.json
    run_dataset(model, random_utterances(3), out, cfg, progress=False)
    assert (out / "metrics.json").read_text() == text


def test_tuned_lens_training_writes_provenance(tiny_checkpoint, tmp_path, fresh_cache):
    from speech_lens.cli.main import main

    path, _ = tiny_checkpoint("spiritlm")
    data = tmp_path / "utts.jsonl"
    write_manifest(data, random_utterances(8))
    out = tmp_path / "lens"
    argv = ["tuned-lens", "train", str(path), str(data), "--out", str(out), "--steps", "2"]
    argv += ["--tokens-per-step", "64", "--heldout", "0.25", "--no-progress"]
    assert main(argv) == 0
    prov = json.loads((out / "provenance.json").read_text())
    # the lens digest is of the files as finally saved (after the held-out KL was added)
    assert prov["lens"]["files"] == {n: _sha(out / n) for n in pv.LENS_FILES}
    assert prov["data"]["sha256"] == _sha(data)
    assert prov["model"]["files"] == {"pytorch_model.bin": _sha(path / "pytorch_model.bin")}
    assert prov["settings"]["steps"] == 2 and "final_train_kl" not in prov["settings"]
    # the tuned-lens files keep their own format: no provenance inside config.json
    assert "provenance" not in json.loads((out / "config.json").read_text())
