"""Loading every family: HF parity, vocabulary layout, hooks, and clear errors on bad checkpoints."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from speech_lens import AdapterError, load_model
from speech_lens.models.checkpoint import detect_family, read_state_dict
from speech_lens.models.spec import (
    AdapterSpec,
    MissingTokenizerError,
    WeightFileError,
    available_families,
)
from speech_lens.testing.families import build_spiritlm

EXPECTED_FAMILY = {
    "spiritlm": "spiritlm",
    "spiritlm-expressive": "spiritlm-expressive",
    "speechgpt": "speechgpt",
    "speechgpt-com": "speechgpt",
    "sims-qwen": "sims",
    "sims-llama": "sims",
}


def independent_hf(path: Path, family: str, kw: dict) -> torch.nn.Module:
    """The same checkpoint loaded without speech_lens' loader: plain transformers (+ peft), eager attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if family.startswith("sims"):
        cfg = json.loads((path / "config.json").read_text())
        base = dict(cfg["base_config"])
        from safetensors.torch import load_file

        state = {}
        for f in sorted(path.glob("model-*.safetensors")) or [path / "model.safetensors"]:
            state.update(load_file(str(f)))
        state = {k.removeprefix("lm."): v for k, v in state.items()}
        base["vocab_size"] = state["model.embed_tokens.weight"].shape[0]
        hf_cfg = AutoConfig.for_model(base.pop("model_type"), **base)
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert set(missing) <= {"lm_head.weight"} and not unexpected
        model.tie_weights()
        return model.eval()
    if family == "speechgpt-com":
        from peft import PeftModel

        adapter = json.loads((path / "adapter_config.json").read_text())
        base = AutoModelForCausalLM.from_pretrained(
            adapter["base_model_name_or_path"], attn_implementation="eager"
        )
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload().eval()
    return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()


def mixed_tokens(model, n: int = 40, seed: int = 0) -> torch.Tensor:
    """BOS-free mix of text ids, unit ids and markers, as a speech-text prompt would have."""
    g = torch.Generator().manual_seed(seed)
    lay = model.layout
    text = lay.text_ids[torch.randint(len(lay.text_ids), (n,), generator=g)]
    units = lay.unit_ids[torch.randint(len(lay.unit_ids), (n,), generator=g)]
    pick = torch.rand(n, generator=g) < 0.5
    ids = torch.where(pick, units, text)
    ids[0] = next(iter(lay.marker_ids.values()))
    return ids.unsqueeze(0)


def test_detects_family(family, tiny_checkpoint):
    path, _ = tiny_checkpoint(family)
    base = path
    if family == "speechgpt-com":
        base = Path(
            json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        )
    assert detect_family(base).name == EXPECTED_FAMILY[family]


def test_bridge_logits_equal_hf_eager(family, tiny_checkpoint, tiny_model):
    path, kw = tiny_checkpoint(family)
    model = tiny_model(family)
    assert model.spec.name == EXPECTED_FAMILY[family]
    ref = independent_hf(path, family, kw)
    ids = mixed_tokens(model)
    with torch.no_grad():
        ours = model.bridge(ids)
        theirs = ref(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert ours.shape[-1] == model.layout.vocab_size


def test_units_round_trip_through_tokenizer(family, tiny_model):
    model = tiny_model(family)
    lay, tok = model.layout, model.tokenizer
    units = [0, 7, lay.units.count - 1, 3, 3]
    s = lay.format_units(units)
    ids = tok(s, add_special_tokens=False).input_ids
    assert ids == [lay.unit_id(k) for k in units]
    assert [lay.unit_of(i) for i in ids] == units
    assert lay.parse_units(s) == units
    assert tok.convert_ids_to_tokens(ids) == [lay.units.token(k) for k in units]
    assert bool(lay.is_unit(ids).all()) and not bool(lay.is_text(ids).any())
    for name, i in lay.marker_ids.items():
        assert tok.convert_ids_to_tokens([i]) == [lay.marker_tokens[name]]
    for b in lay.prosody.values():
        assert tok(b.token(5), add_special_tokens=False).input_ids == [b.id_of(5)]


def test_user_hook_sees_every_residual(family, tiny_model):
    model = tiny_model(family)
    seen: dict[str, tuple] = {}

    def record(act, *, hook):
        seen[hook.name] = tuple(act.shape)

    names = [f"blocks.{i}.hook_resid_{w}" for i in range(model.n_layers) for w in ("pre", "post")]
    ids = mixed_tokens(model, n=12)
    model.bridge.run_with_hooks(ids, fwd_hooks=[(n, record) for n in names])
    # canonical names (TL pitfall P6): resid_pre = blocks.i.hook_in, resid_post = blocks.i.hook_out
    for i in range(model.n_layers):
        assert seen[f"blocks.{i}.hook_in"] == (1, 12, model.d_model)
        assert seen[f"blocks.{i}.hook_out"] == (1, 12, model.d_model)


def test_documented_ids_of_real_families():
    fams = available_families()
    sp = fams["spiritlm"]
    assert (sp.units.first_id, sp.units.count, sp.vocab_size) == (32002, 501, 32512)
    assert {k: v.id for k, v in sp.markers.items()} == {"text": 32000, "speech": 32001}
    ex = fams["spiritlm-expressive"]
    assert (ex.prosody["pitch"].first_id, ex.prosody["style"].first_id, ex.vocab_size) == (
        32503,
        32567,
        32768,
    )
    sg = fams["speechgpt"]
    assert (sg.units.first_id, sg.markers["sosp"].id, sg.markers["eosp"].id) == (
        32000,
        33000,
        33001,
    )
    si = fams["sims"]
    assert si.units.first_id is None  # "after_text": len(base tokenizer), on any base
    assert si.units.released_first_ids["Qwen/Qwen2.5-7B"] == 151665
    assert si.units.released_first_ids["meta-llama/Llama-3.2-3B"] == 128256


def test_layouts_of_tiny_checkpoints_have_the_real_ids(tiny_model):
    sims = tiny_model("sims-qwen").layout
    assert (sims.units.first_id, sims.marker_ids["speech"], sims.marker_ids["text"]) == (
        151665,
        152165,
        152166,
    )
    assert tiny_model("sims-qwen").tied
    llama = tiny_model("sims-llama").layout
    assert (llama.units.first_id, llama.marker_ids["speech"]) == (128256, 128756)
    ex = tiny_model("spiritlm-expressive").layout
    assert ex.block("pitch").token(63) == "[Pi63]" and ex.block("style").id_of(99) == 32666
    assert not tiny_model("spiritlm").tied


def test_train_mode_is_refused(tmp_path):
    path = build_spiritlm(tmp_path / "m")
    model = load_model(path)
    assert not model.bridge.training
    model.require_eval()
    model.bridge.train()
    with pytest.raises(AdapterError, match="train mode"):
        model.require_eval()


# ---------------------------------------------------------------------------------------------
# Bad checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def spirit_copy(tiny_checkpoint, tmp_path):
    src, _ = tiny_checkpoint("spiritlm")
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _edit_added_tokens(path: Path, edit) -> None:
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    edit(cfg["added_tokens_decoder"])
    cfg_path.write_text(json.dumps(cfg))


def test_missing_unit_token(spirit_copy):
    def drop_last(dec):
        dec.pop(str(32502))  # [Hu500]

    _edit_added_tokens(spirit_copy, drop_last)
    with pytest.raises(AdapterError, match=r"\[Hu500\]' is missing"):
        load_model(spirit_copy, family="spiritlm")


def test_wrong_marker_ids(spirit_copy):
    def swap(dec):
        dec["32000"]["content"], dec["32001"]["content"] = "[Speech]", "[Text]"

    _edit_added_tokens(spirit_copy, swap)
    with pytest.raises(AdapterError, match=r"marker token '\[Text\]' has id 32001.*says 32000"):
        load_model(spirit_copy, family="spiritlm")


def test_vocabulary_smaller_than_spec(tmp_path):
    path = build_spiritlm(tmp_path / "m")
    sd = read_state_dict(path)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = sd[k][:32503].clone()
    torch.save(sd, path / "pytorch_model.bin")
    cfg = json.loads((path / "config.json").read_text())
    cfg["vocab_size"] = 32503
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        AdapterError, match="32503 rows.*smaller than spiritlm's vocabulary of 32512"
    ):
        load_model(path)


def test_sims_without_base_tokenizer(tiny_checkpoint):
    path, _ = tiny_checkpoint("sims-qwen")
    with pytest.raises(MissingTokenizerError, match="store no tokenizer.*base_tokenizer"):
        load_model(path)


def test_sims_with_wrong_base_tokenizer(tiny_checkpoint):
    path, _ = tiny_checkpoint("sims-qwen")
    _, llama_kw = tiny_checkpoint("sims-llama")
    with pytest.raises(AdapterError, match=r"152167 rows.*128256 tokens \+ 502 added = 128758"):
        load_model(path, base_tokenizer=llama_kw["base_tokenizer"])


def test_corrupt_weight_file(spirit_copy):
    (spirit_copy / "pytorch_model.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightFileError, match="pytorch_model.bin"):
        load_model(spirit_copy)


def test_missing_weight_file(spirit_copy):
    (spirit_copy / "pytorch_model.bin").unlink()
    with pytest.raises(WeightFileError, match="no weights in .*expected one of model.safetensors"):
        load_model(spirit_copy)


def test_missing_shard(tiny_checkpoint, tmp_path):
    src, kw = tiny_checkpoint("sims-qwen")
    dst = tmp_path / "sims"
    shutil.copytree(src, dst)
    next(dst.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(
        WeightFileError, match="lists shard model-00002-of-00002.safetensors, which is missing"
    ):
        load_model(dst, **kw)


def test_missing_config(spirit_copy):
    (spirit_copy / "config.json").unlink()
    with pytest.raises(AdapterError, match="config.json"):
        load_model(spirit_copy)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned_by_pickle",))


def test_malicious_pickle_runs_no_code(spirit_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model.embed_tokens.weight": _Exploit()}, spirit_copy / "pytorch_model.bin")
    with pytest.raises(WeightFileError, match="could not be loaded safely"):
        load_model(spirit_copy)
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_detection_refuses_unknown_checkpoint(tmp_path):
    from speech_lens.testing.families import _llama

    m = _llama(64, 0)
    m.save_pretrained(tmp_path / "plain")
    with pytest.raises(AdapterError, match="cannot detect the family.*spiritlm"):
        load_model(tmp_path / "plain")


def test_user_spec_file(tmp_path, tiny_checkpoint):
    """A user describes a new family in TOML: here SpiritLM's layout under another name."""
    src, _ = tiny_checkpoint("spiritlm")
    text = (Path(__file__).parents[1] / "src/speech_lens/model_adapters/spiritlm.toml").read_text()
    spec_path = tmp_path / "my_model.toml"
    spec_path.write_text(text.replace('name = "spiritlm"', 'name = "my-model"'))
    model = load_model(src, spec=spec_path)
    assert model.spec.name == "my-model" and model.layout.units.first_id == 32002
    # the same spec shipped inside the checkpoint directory is picked up without arguments
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    shutil.copy(spec_path, dst / "speech_lens.toml")
    assert load_model(dst).spec.name == "my-model"


def test_bad_spec_is_named(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text(
        'name = "x"\n[units]\npattern = "[Hu]"\ncount = 3\nfirst_id = 0\nframe_rate = 25\n'
    )
    with pytest.raises(AdapterError, match=r"bad.toml: units.pattern '\[Hu\]' must contain \{k\}"):
        AdapterSpec.from_toml(p)


def test_inspect_cli(tiny_checkpoint, capsys):
    from speech_lens.cli.main import main

    path, _ = tiny_checkpoint("spiritlm-expressive")
    assert main(["inspect", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "spiritlm-expressive" and out["d_vocab"] == 32768
    parts = {row[0]: row for row in out["partitions"]}
    assert parts["pitch [Pi*]"][1:] == [64, "32503-32566"]
    assert main(["inspect", str(path.parent / "nope")]) == 2


def test_planner_refuses_a_model_too_large_before_loading(spirit_copy):
    from speech_lens.models.memory import estimate_memory

    llama2_7b = {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "intermediate_size": 11008,
        "vocab_size": 32512,
    }
    est = estimate_memory(llama2_7b, torch.bfloat16, seq_len=1024)
    assert 6.7e9 < est.weights / 2 < 6.8e9  # SpiritLM 7B: about 6.74B parameters
    # the tiny checkpoint claims 7B geometry; its weight file is removed, so only the planner can answer
    cfg = json.loads((spirit_copy / "config.json").read_text())
    cfg.update(llama2_7b)
    (spirit_copy / "config.json").write_text(json.dumps(cfg))
    (spirit_copy / "pytorch_model.bin").unlink()
    with pytest.raises(AdapterError, match=r"needs about 13\.\d GiB .* budget is 8.0 GiB"):
        load_model(spirit_copy, memory_budget_gb=8, dtype=torch.float16)
