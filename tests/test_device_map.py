"""Loading with a device map (accelerate dispatch, then the bridge): the same numbers as a plain
load, hooks and the logit lens still work, and the planner refuses before reading any weight.

This machine has no GPU, so the maps use "cpu" and "disk". Disk offload is the strongest test
of the dispatch on CPU: every offloaded module's weights exist only in the offload folder and are
loaded by accelerate's hooks around each call, including the final norm and unembedding that
the lens calls from inside other hooks."""

import json
from pathlib import Path

import pytest
import torch

from speech_lens import AdapterError, load_model
from speech_lens.lens.logit import logit_lens
from speech_lens.models.devices import parse_device_map, parse_max_memory
from speech_lens.models.memory import plan_load
from speech_lens.testing.families import build_family

SEQ = 24  # positions; the plan is made for this many
# wide MLPs, so the decoder layers (not only the embeddings) are big enough for a budget to split
FAMILIES = {"spiritlm": {"intermediate_size": 4096}, "sims-qwen": {"intermediate_size": 12288}}
SPEC = {"spiritlm": "spiritlm", "sims-qwen": "sims"}  # given, so each plan skips detection


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """family -> (path, kwargs, plain-loaded model) for the wide checkpoints, built once."""
    root = tmp_path_factory.mktemp("wide")
    out = {}
    for fam, dims in FAMILIES.items():
        path, kw = build_family(fam, root, **dims)
        out[fam] = (path, kw, load_model(path, **kw))
    return out


def _tokens(model, n=SEQ):
    g = torch.Generator().manual_seed(0)
    units = model.layout.unit_ids
    text = torch.randint(3, 200, (n // 2,), generator=g)
    unit = units[torch.randint(0, len(units), (n - n // 2,), generator=g)]
    return torch.cat([text, unit])


def _same_numbers(plain, other):
    tokens = _tokens(plain)
    ids = tokens.unsqueeze(0)
    with torch.no_grad():
        ref, got = plain.bridge(ids), other.bridge(ids.to(other.device))
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)

    # a user hook on resid_pre fires, sees the same activations, and its edit takes effect
    seen: dict[str, list[torch.Tensor]] = {"plain": [], "other": []}

    def grab(key):
        def hook(act, *, hook):
            seen[key].append(act.detach().clone())
            return act * 0.5 if hook.name == "blocks.1.hook_in" else act

        return hook

    hooks = [(f"blocks.{i}.hook_resid_pre", None) for i in range(plain.n_layers)]
    with torch.no_grad():
        a = plain.bridge.run_with_hooks(ids, fwd_hooks=[(n, grab("plain")) for n, _ in hooks])
        b = other.bridge.run_with_hooks(ids, fwd_hooks=[(n, grab("other")) for n, _ in hooks])
    assert len(seen["other"]) == plain.n_layers
    for x, y in zip(seen["plain"], seen["other"], strict=True):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    assert (a - ref).abs().max() > 1e-3  # the edit changed the output: the hooks really ran

    # the streaming logit lens (final norm + unembedding called inside hooks) agrees row by row
    la = logit_lens(plain, tokens, k=5, targets="next")
    lb = logit_lens(other, tokens, k=5, targets="next")
    assert torch.equal(la.topk_ids, lb.topk_ids) and torch.equal(la.topk_ids_all, lb.topk_ids_all)
    torch.testing.assert_close(lb.topk_logprobs, la.topk_logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(lb.mass, la.mass, atol=1e-6, rtol=0)
    assert la.target_ranks is not None and lb.target_ranks is not None
    assert torch.equal(la.target_ranks, lb.target_ranks)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_explicit_map_every_module_on_cpu(wide, family):
    path, kw, plain = wide[family]
    dmap = {
        "model.embed_tokens": "cpu",
        **{f"model.layers.{i}": "cpu" for i in range(plain.n_layers)},
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    m = load_model(path, **kw, device_map=dmap, seq_len=SEQ)
    assert m.device == torch.device("cpu") and m.device_map == dmap
    # accelerate hooks are on the modules the lens calls directly
    norm, head = m.bridge.ln_final.original_component, m.bridge.unembed.original_component
    assert hasattr(norm, "_hf_hook") and hasattr(head, "_hf_hook")
    assert m.tied == plain.tied
    _same_numbers(plain, m)


def _split_budget(path, family, folder):
    """The smallest CPU budget (MiB) under which "auto" keeps some modules on the CPU and
    spills the rest to disk; the planner alone answers (no weight read)."""
    for mib in range(4, 400, 2):
        try:
            plan = plan_load(
                path,
                "auto",
                max_memory={"cpu": f"{mib}MiB"},
                offload_folder=folder,
                seq_len=SEQ,
                family=SPEC[family],
            )
        except AdapterError:
            continue
        if {"cpu", "disk"} <= set(plan.device_map.values()):
            return mib, plan
    raise AssertionError(f"no budget splits {path} between cpu and disk")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_auto_map_spills_layers_to_disk(wide, family, tmp_path):
    path, kw, plain = wide[family]
    folder = tmp_path / "offload"
    mib, plan = _split_budget(path, family, folder)
    on_disk = [k for k, v in plan.device_map.items() if v == "disk"]
    assert any(k.startswith("model.layers.") for k in on_disk), plan.device_map
    m = load_model(
        path,
        **kw,
        device_map="auto",
        max_memory={"cpu": f"{mib}MiB"},
        offload_folder=folder,
        seq_len=SEQ,
    )
    assert m.device_map == plan.device_map
    # offloaded weights exist only in the folder: the module holds a meta placeholder
    layer = next(k for k in on_disk if k.startswith("model.layers."))
    assert all(p.is_meta for p in m.hf_model.get_submodule(layer).parameters())
    index = json.loads((folder / "index.json").read_text())
    assert any(k.startswith(layer + ".") for k in index)
    assert m.device == torch.device("cpu")
    _same_numbers(plain, m)


def test_planner_refuses_before_reading_any_weight(wide, monkeypatch, tmp_path):
    from speech_lens.models import checkpoint, dispatch, load

    path, _, plain = wide["spiritlm"]

    def no_reads(*a, **k):
        raise AssertionError("a weight was read")

    # each reader where its caller looks it up
    readers = (
        (load, "read_state_dict"),
        (dispatch, "iter_state_dict"),
        (checkpoint, "_read_weight_file"),
    )
    for module, name in readers:
        monkeypatch.setattr(module, name, no_reads)
    layers = {f"model.layers.{i}": "cpu" for i in range(plain.n_layers)}
    dmap = {"model.embed_tokens": "cpu", **layers, "model.norm": "cpu", "model.rotary_emb": "cpu"}
    dmap["lm_head"] = "cpu"
    with pytest.raises(AdapterError, match=r"device cpu: .*GiB \(weights .* of budget 0\.001 GiB"):
        load_model(path, device_map=dmap, max_memory={"cpu": "1MiB"}, seq_len=SEQ)
    # "auto" without a folder to spill into: the budgets named, with what the weights need
    with pytest.raises(AdapterError, match=r"needs .* GiB of weights .*\(cpu: budget 0\.001 GiB"):
        load_model(path, device_map="auto", max_memory={"cpu": "1MiB"}, seq_len=SEQ)
    # a disk budget too small for the offloaded layers
    dmap["model.layers.1"] = "disk"
    with pytest.raises(AdapterError, match=r"device disk: .* of budget 0\.000 GiB"):
        load_model(
            path,
            device_map=dmap,
            max_memory={"cpu": "1GiB", "disk": "10KiB"},
            offload_folder=tmp_path / "off",
            seq_len=SEQ,
        )
    assert not (tmp_path / "off").exists()


def test_bad_device_maps_are_named(wide, tmp_path):
    path, _, _ = wide["spiritlm"]
    n_cuda = torch.cuda.device_count()
    with pytest.raises(AdapterError, match=rf"device_map\[''\] = 'cuda:{n_cuda}': no such device"):
        load_model(path, device_map={"": f"cuda:{n_cuda}"})
    with pytest.raises(AdapterError, match=r"device_map\['lm_head'\] = 'gpu7' is not a device"):
        load_model(path, device_map={"model": "cpu", "lm_head": "gpu7"})
    with pytest.raises(AdapterError, match=r"'disk' needs offload_folder"):
        load_model(path, device_map={"model": "cpu", "lm_head": "disk"})
    with pytest.raises(AdapterError, match=r"places no device for lm_head"):
        load_model(path, device_map={"model": "cpu"})
    with pytest.raises(AdapterError, match=r"names no module of this model: \['model.layer.0'\]"):
        load_model(path, device_map={"": "cpu", "model.layer.0": "cpu"})
    with pytest.raises(AdapterError, match=r"splits model.layers.0 .*LlamaDecoderLayer"):
        load_model(path, device_map={"": "cpu", "model.layers.0.mlp": "cpu"})
    with pytest.raises(AdapterError, match=r"device= or device_map=, not both"):
        load_model(path, device="cpu", device_map="auto")
    with pytest.raises(AdapterError, match=r"max_memory\['cpu'\] = 'lots' is not a size"):
        load_model(path, device_map="auto", max_memory={"cpu": "lots"})


def test_tied_weights_stay_together(wide, tmp_path):
    path, kw, plain = wide["sims-qwen"]
    assert plain.tied  # SIMS on Qwen2.5: lm_head is the embedding matrix
    with pytest.raises(AdapterError, match=r"tied weights .*lm_head.weight.* different devices"):
        load_model(
            path,
            **kw,
            device_map={"model": "cpu", "lm_head": "disk"},
            offload_folder=tmp_path / "off",
        )


def test_cli_values_parse():
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"model": 0, "lm_head": "cpu"}') == {"model": 0, "lm_head": "cpu"}
    assert parse_max_memory('{"0": "70GiB", "cpu": "100GiB"}') == {"0": "70GiB", "cpu": "100GiB"}
    with pytest.raises(AdapterError, match="--device-map 'everywhere' is neither"):
        parse_device_map("everywhere")
    with pytest.raises(AdapterError, match="--max-memory .* is not JSON"):
        parse_max_memory("70GiB")


def test_cli_lens_with_device_map(tiny_checkpoint, tmp_path, capsys):
    """``speech-lens inspect CKPT --device-map ...`` goes through load_from_args."""
    from speech_lens.cli.main import main

    path, _ = tiny_checkpoint("spiritlm")
    folder = tmp_path / "off"
    dm = json.dumps({"model.embed_tokens": "cpu", "model.layers.0": "cpu", "": "disk"})
    rc = main(["inspect", str(path), "--json", "--device-map", dm, "--offload-folder", str(folder)])
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    assert info["devices"] == {"cpu": 2, "disk": 4}
    assert (folder / "index.json").exists()
    assert main(["inspect", str(path), "--device-map", "{bad"]) == 2
    assert "--device-map '{bad' is neither" in capsys.readouterr().err


def test_offload_folder_index_is_rewritten(wide, tmp_path):
    """A stale index.json from another model in the folder is replaced, not merged into."""
    path, _, plain = wide["spiritlm"]
    folder = tmp_path / "off"
    folder.mkdir()
    (folder / "index.json").write_text(json.dumps({"stale.weight": {"dtype": "x", "shape": [1]}}))
    m = load_model(path, device_map={"": "disk"}, offload_folder=folder, seq_len=SEQ)
    index = json.loads((folder / "index.json").read_text())
    assert "stale.weight" not in index and "model.norm.weight" in index
    ids = _tokens(plain).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(m.bridge(ids), plain.bridge(ids), atol=1e-6, rtol=0)


def test_lora_bf16_and_tuned_translators_under_a_map(tiny_checkpoint, wide, tmp_path):
    """SpeechGPT-com (LoRA merged before dispatch) and bf16 give the plain load's numbers; a
    tuned lens's translators apply to residuals from disk-offloaded layers."""
    from speech_lens.lens.tuned import TunedLens

    path, kw = tiny_checkpoint("speechgpt-com")
    plain, mapped = load_model(path, **kw), load_model(path, **kw, device_map={"": "cpu"})
    ids = _tokens(plain).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(mapped.bridge(ids), plain.bridge(ids), atol=1e-6, rtol=0)
    with pytest.raises(AdapterError, match=r"LoRA adapter: merging it needs every weight"):
        load_model(path, **kw, device_map={"": "disk"}, offload_folder=tmp_path / "l")

    spirit, _, _ = wide["spiritlm"]
    a = load_model(spirit, dtype=torch.bfloat16)
    b = load_model(spirit, dtype=torch.bfloat16, device_map={"": "cpu"})
    assert b.describe()["dtype"] == "bfloat16" and b.output_device == torch.device("cpu")
    ids = _tokens(a).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(b.bridge(ids), a.bridge(ids), atol=0, rtol=0)

    _, _, plain = wide["spiritlm"]
    lens = TunedLens.from_model(plain)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in range(len(lens)):
            t = lens.translator(i)
            t.weight.copy_(0.05 * torch.randn(t.weight.shape, generator=g))
    offloaded = load_model(spirit, device_map={"": "disk"}, offload_folder=tmp_path / "d")
    assert offloaded.hf_model.lm_head.weight.is_meta  # the unembedding lives in the folder
    # the unembedding fingerprint is read through the offload hook: same as the plain load's
    assert TunedLens.from_model(offloaded).config == TunedLens.from_model(plain).config
    lens.save(tmp_path / "lens")
    loaded = TunedLens.load(tmp_path / "lens", offloaded)  # checks the fingerprint
    tokens = _tokens(plain)
    ra = logit_lens(plain, tokens, k=5, lens=lens)
    rb = logit_lens(offloaded, tokens, k=5, lens=loaded)
    assert torch.equal(ra.topk_ids_all, rb.topk_ids_all)
    torch.testing.assert_close(rb.topk_logprobs_all, ra.topk_logprobs_all, atol=1e-6, rtol=0)


def test_lens_command_on_an_offloaded_organism(tmp_path):
    """`speech-lens lens ... --device-map` on a shipped organism writes the same tables as the
    plain run, byte for byte; the model section records the placement."""
    from speech_lens.cli.main import main

    org = Path(__file__).parents[1] / "organisms" / "textinit_interleaved"
    data = org.parent / "test_manifest.jsonl"
    common = [str(org), str(data), "--limit", "3", "--n-boot", "20", "--no-progress"]
    assert main(["lens", *common, "--out", str(tmp_path / "plain")]) == 0
    dm = ["--device-map", '{"": "disk"}', "--offload-folder", str(tmp_path / "off")]
    assert main(["lens", *common, "--out", str(tmp_path / "dm"), *dm]) == 0
    for f in ("layers.csv", "words.csv"):
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "dm" / f).read_bytes()
    a = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    b = json.loads((tmp_path / "dm" / "metrics.json").read_text())
    assert a["metrics"] == b["metrics"] and b["model"]["devices"] == {
        "disk": a["model"]["n_layers"] + 4
    }


def test_planner_splits_a_7b_model_over_gpus(monkeypatch):
    """The planner alone (a meta model, nothing allocated) for a SpiritLM-7B-shaped model in
    bf16 on a node that reports 8 CUDA devices: "auto" balances the decoder layers over the
    GPUs within max_memory, keeps room for activations and lens buffers, and refuses budgets
    that cannot hold the weights, naming each device."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from speech_lens.models.placement import resolve_device_map

    cfg = {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "intermediate_size": 11008,
        "vocab_size": 32512,
    }
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    plan = resolve_device_map(
        model,
        "auto",
        base_config=cfg,
        dtype=torch.bfloat16,
        seq_len=2048,
        max_memory={str(i): "70GiB" for i in range(8)},
    )
    gpus = {d for d in plan.device_map.values()}
    assert len(gpus) > 4 and all(isinstance(d, int) for d in gpus)  # balanced, nothing offloaded
    assert plan.main_device == plan.device_map["model.embed_tokens"] == 0
    weights = sum(u.weights for u in plan.uses)
    assert 6.7e9 < weights / 2 < 6.8e9  # every parameter placed once (bf16: 2 bytes each)
    head = plan.device_map["lm_head"]
    by_dev = {u.device: u for u in plan.uses}
    assert by_dev[f"cuda:{head}"].lens > 0 and by_dev["cuda:0"].activations > 0
    with pytest.raises(
        AdapterError, match=r"needs 12\.5\d+ GiB of weights .*cuda:0: budget 5\.000 GiB"
    ):
        resolve_device_map(
            model,
            "auto",
            base_config=cfg,
            dtype=torch.bfloat16,
            seq_len=2048,
            max_memory={"0": "5GiB", "1": "5GiB"},
        )
    # GPU + CPU offload in one map: TL 4.3's boot refuses it, so the planner does, up front
    mixed = {"model": 0, "lm_head": "cpu"}
    with pytest.raises(AdapterError, match=r"'cuda:0': 35, 'cpu': 1.*TransformerLens 4.3 refuses"):
        resolve_device_map(
            model,
            mixed,
            base_config=cfg,
            dtype=torch.bfloat16,
            seq_len=2048,
            max_memory={"0": "70GiB", "cpu": "64GiB"},
        )
