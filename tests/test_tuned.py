"""Tuned lens: logit-lens equivalence at zero init, tuned-lens file format, training, resume, memory."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from speech_lens import load_model
from speech_lens.data.utterance import Utterance, Word
from speech_lens.lens.kl import lens_kl
from speech_lens.lens.train import TrainConfig, _accumulate, train_tuned_lens
from speech_lens.lens.train_data import TrainError, encode_training_data, split_heldout
from speech_lens.lens.tuned import (
    CONFIG_FILE,
    PARAMS_FILE,
    LensError,
    TunedLens,
    lens_from_spec,
)
from speech_lens.report.tuned import kl_figure
from speech_lens.testing.families import build_family
from speech_lens.testing.words import WORDS

TUNED_LENS_KEYS = {
    "base_model_name_or_path",
    "d_model",
    "num_hidden_layers",
    "bias",
    "base_model_revision",
    "unembed_hash",
    "lens_type",
}


def _sequences(model, n: int, length: int, seed: int) -> list[torch.Tensor]:
    """BOS, text marker, text ids, speech marker, unit ids: the token kinds the model sees."""
    lay = model.layout
    g = torch.Generator().manual_seed(seed)
    out = []
    bos = lay.control_ids.get("bos", 1)
    for _ in range(n):
        text = lay.text_ids[torch.randint(0, 300, (length // 2,), generator=g)]
        units = lay.unit_ids[torch.randint(0, 200, (length // 2,), generator=g)]
        head = [bos, *([lay.marker_ids["text"]] if "text" in lay.marker_ids else [])]
        mid = [lay.marker_ids["speech"]] if "speech" in lay.marker_ids else []
        out.append(
            torch.cat([torch.tensor(head), text, torch.tensor(mid, dtype=torch.long), units])
        )
    return out


def _randomised(lens: TunedLens, seed: int = 0, scale: float = 0.05) -> TunedLens:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return lens


def _hidden_states(model, tokens: torch.Tensor):
    with torch.no_grad():
        return model.hf_model(tokens[None], output_hidden_states=True).hidden_states


# --- zero init == logit lens ------------------------------------------------------------------


def test_zero_lens_is_the_logit_lens_independent_hf(tiny_checkpoint, tiny_model):
    """Against an independently loaded HF model: hidden_states[i] -> model.norm -> lm_head."""
    from transformers import AutoModelForCausalLM

    path, _ = tiny_checkpoint("spiritlm")
    model = tiny_model("spiritlm")
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    lens = TunedLens.from_model(model)
    tokens = _sequences(model, 1, 30, seed=1)[0]
    with torch.no_grad():
        out = hf(tokens[None], output_hidden_states=True)
        for i in range(model.n_layers):
            want = hf.lm_head(hf.model.norm(out.hidden_states[i]))
            got = lens(out.hidden_states[i], i)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            # the residual the bridge streams is HF's hidden_states[i]
        final = lens(_resid_post_last(model, tokens), model.n_layers)
        torch.testing.assert_close(final, out.logits, rtol=0, atol=0)


def _resid_post_last(model, tokens):
    _, cache = model.bridge.run_with_cache(
        tokens[None], names_filter=[f"blocks.{model.n_layers - 1}.hook_resid_post"]
    )
    return cache[f"blocks.{model.n_layers - 1}.hook_resid_post"]


@pytest.mark.parametrize("fam", ["sims-qwen", "speechgpt"])
def test_zero_lens_is_the_logit_lens_tied_and_qwen(fam, tiny_model):
    model = tiny_model(fam)
    lens = TunedLens.from_model(model)
    tokens = _sequences(model, 1, 20, seed=2)[0]
    hs = _hidden_states(model, tokens)
    hf = model.hf_model
    with torch.no_grad():
        for i in range(model.n_layers):
            want = hf.get_output_embeddings()(hf.model.norm(hs[i]))
            torch.testing.assert_close(lens(hs[i], i), want, rtol=0, atol=0)
            torch.testing.assert_close(lens.transform_hidden(hs[i], i), hs[i], rtol=0, atol=0)


def test_logit_lens_with_tuned_lens(tiny_model):
    """``logit_lens(..., lens=tuned)``: zero lens == no lens; a trained-looking lens == our forward."""
    from speech_lens.lens.logit import logit_lens

    model = tiny_model("spiritlm")
    tokens = _sequences(model, 1, 24, seed=3)[0]
    plain = logit_lens(model, tokens, k=5)
    zero = logit_lens(model, tokens, k=5, lens=TunedLens.from_model(model))
    torch.testing.assert_close(zero.topk_ids_all, plain.topk_ids_all, rtol=0, atol=0)
    torch.testing.assert_close(zero.topk_logprobs_all, plain.topk_logprobs_all, rtol=0, atol=0)
    torch.testing.assert_close(zero.topk_ids, plain.topk_ids, rtol=0, atol=0)

    lens = _randomised(TunedLens.from_model(model), scale=0.3)
    tuned = logit_lens(model, tokens, k=5, lens=lens)
    hs = _hidden_states(model, tokens)
    changed = False
    with torch.no_grad():
        for i in range(model.n_layers):
            logp = lens(hs[i][0], i).log_softmax(-1)
            top = logp.topk(5, dim=-1)
            assert torch.equal(tuned.topk_ids_all[i], top.indices)
            torch.testing.assert_close(tuned.topk_logprobs_all[i], top.values, rtol=1e-5, atol=1e-5)
            changed |= not torch.equal(top.indices, plain.topk_ids_all[i])
    assert changed, "the random translators did not change any top-k: the test would prove nothing"
    # the output row has no translator
    torch.testing.assert_close(tuned.topk_ids_all[-1], plain.topk_ids_all[-1], rtol=0, atol=0)


# --- files ------------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tiny_model, tmp_path):
    model = tiny_model("spiritlm")
    lens = _randomised(TunedLens.from_model(model, data_mode="speech"), seed=4)
    lens.save(tmp_path / "lens")
    raw = json.loads((tmp_path / "lens" / CONFIG_FILE).read_text())
    assert set(raw) >= TUNED_LENS_KEYS and raw["lens_type"] == "linear_tuned_lens"
    assert raw["data_mode"] == "speech" and raw["num_hidden_layers"] == model.n_layers
    state = torch.load(tmp_path / "lens" / PARAMS_FILE, weights_only=True)
    assert list(state) == [f"{i}.{p}" for i in range(model.n_layers) for p in ("weight", "bias")]

    back = TunedLens.load(tmp_path / "lens", model)
    assert back.config == lens.config
    for k, v in lens.layer_translators.state_dict().items():
        assert torch.equal(back.layer_translators.state_dict()[k], v), k
    h = torch.randn(7, model.d_model)
    for i in range(model.n_layers + 1):
        torch.testing.assert_close(back(h, i), lens(h, i), rtol=0, atol=0)


def _tuned_lens_package_dir(directory, model, state, unembed_hash):
    """A lens directory exactly as tuned-lens 0.2 ``TunedLens.save`` writes it."""
    directory.mkdir(parents=True)
    cfg = {
        "base_model_name_or_path": "some/model",
        "d_model": model.d_model,
        "num_hidden_layers": model.n_layers,
        "bias": True,
        "base_model_revision": None,
        "unembed_hash": unembed_hash,
        "lens_type": "linear_tuned_lens",
    }
    torch.save(state, directory / "params.pt")
    (directory / "config.json").write_text(json.dumps(cfg))


def _coarse_hash(weight: torch.Tensor) -> str:
    """tuned_lens.utils.tensor_hash of Unembed.unembedding.weight, written out independently."""
    return hashlib.sha256(
        str.encode(np.array_str(weight.detach().numpy(), precision=1))
    ).hexdigest()


def test_lens_written_by_tuned_lens_package_loads(tiny_model, tmp_path):
    model = tiny_model("spiritlm")
    translators = nn.ModuleList(
        nn.Linear(model.d_model, model.d_model) for _ in range(model.n_layers)
    )
    state = translators.state_dict()
    w = model.hf_model.get_output_embeddings().weight
    _tuned_lens_package_dir(tmp_path / "tl", model, state, _coarse_hash(w))
    lens = TunedLens.load(tmp_path / "tl", model)
    h = torch.randn(5, model.d_model)
    for i in range(model.n_layers):
        assert torch.equal(lens[i].weight, state[f"{i}.weight"])
        torch.testing.assert_close(
            lens.transform_hidden(h, i), h + translators[i](h), rtol=0, atol=0
        )
    assert lens.config.unembed_sha256 is None and lens.config.data_mode is None
    assert lens_from_spec(f"tuned:{tmp_path / 'tl'}", model) is not None
    assert lens_from_spec("logit", model) is None

    # same format, coarse hash of another unembedding: refused, naming the file and both hashes
    _tuned_lens_package_dir(tmp_path / "other", model, state, "0" * 64)
    with pytest.raises(LensError, match=r"config\.json.*unembed_hash.*0{64} != [0-9a-f]{64}"):
        TunedLens.load(tmp_path / "other", model)


def test_unknown_config_keys_are_tolerated(tiny_model, tmp_path):
    model = tiny_model("spiritlm")
    TunedLens.from_model(model).save(tmp_path / "l")
    raw = json.loads((tmp_path / "l" / CONFIG_FILE).read_text())
    raw["future_key"] = 1
    (tmp_path / "l" / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="future_key"):
        TunedLens.load(tmp_path / "l", model)


def test_wrong_model_lens_is_refused(tiny_model, tmp_path):
    model = tiny_model("spiritlm")
    lens = TunedLens.from_model(model)
    lens.save(tmp_path / "lens")

    # same geometry, other weights (another seed): the exact hash tells them apart
    other_path = build_family("spiritlm", tmp_path / "seed1", seed=1)[0]
    other = load_model(other_path)
    with pytest.raises(LensError) as e:
        TunedLens.load(tmp_path / "lens", other)
    msg = str(e.value)
    assert str(tmp_path / "lens" / CONFIG_FILE) in msg
    assert lens.config.unembed_sha256 in msg and "unembed_sha256" in msg
    assert TunedLens.from_model(other).config.unembed_sha256 in msg
    with pytest.warns(UserWarning, match="another unembedding"):
        TunedLens.load(tmp_path / "lens", other, strict=False)

    # another layer count
    deeper = load_model(build_family("spiritlm", tmp_path / "deep", num_hidden_layers=3)[0])
    with pytest.raises(LensError, match=r"lens has 2 layers, model .* has 3"):
        TunedLens.load(tmp_path / "lens", deeper)
    # another vocabulary (SpeechGPT, same d_model and depth)
    with pytest.raises(LensError, match="vocab_size"):
        TunedLens.load(tmp_path / "lens", tiny_model("speechgpt"))

    # broken files name themselves
    (tmp_path / "lens" / PARAMS_FILE).write_bytes(b"not a torch file")
    with pytest.raises(LensError, match=r"params\.pt"):
        TunedLens.load(tmp_path / "lens", model)
    with pytest.raises(LensError, match=r"config\.json is missing"):
        TunedLens.load(tmp_path / "nowhere", model)
    with pytest.raises(LensError, match="tuned:PATH"):
        lens_from_spec("tuned", model)


# --- training ---------------------------------------------------------------------------------


def test_training_lowers_heldout_kl_at_every_layer(tiny_model):
    model = tiny_model("spiritlm")
    train = _sequences(model, 40, 20, seed=10)
    held = _sequences(model, 8, 20, seed=11)
    # a few large steps (lr_scale 4) keep this to seconds; the recipe default is lr_scale 1
    cfg = TrainConfig(steps=4, tokens_per_step=160, batch_size=8, lr_scale=4.0, data_mode="mix")
    result = train_tuned_lens(model, train, cfg, progress=False)
    assert result.finished and result.steps_done == 4 and result.tokens_seen >= 4 * 160
    before = lens_kl(model, None, held)
    after = lens_kl(model, result.lens, held)
    zero = lens_kl(model, TunedLens.from_model(model), held)
    torch.testing.assert_close(zero, before, rtol=1e-6, atol=1e-7)  # zero lens == logit lens
    assert before.shape == (model.n_layers + 1,)
    assert (before[:-1] > 1e-3).all(), before
    assert (after[:-1] < 0.85 * before[:-1]).all(), (before, after)
    assert after[-1].abs() < 1e-5 and before[-1].abs() < 1e-5  # output row: KL to itself
    fig = kl_figure(before, after)
    assert [t.name for t in fig.data] == ["logit lens", "tuned lens"]
    assert list(fig.data[1].y) == after.tolist()


def test_resume_gives_the_uninterrupted_lens(tiny_model, tmp_path):
    model = tiny_model("spiritlm")
    data = _sequences(model, 16, 12, seed=12)
    cfg = TrainConfig(steps=4, tokens_per_step=48, batch_size=4, checkpoint_every=2, seed=3)
    full = train_tuned_lens(model, data, cfg, out=tmp_path / "a", progress=False)

    part = train_tuned_lens(model, data, cfg, out=tmp_path / "b", stop_after=3, progress=False)
    assert not part.finished and (tmp_path / "b" / "checkpoint.pt").exists()
    assert not (tmp_path / "b" / PARAMS_FILE).exists()
    resumed = train_tuned_lens(model, data, cfg, out=tmp_path / "b", progress=False)
    assert resumed.finished and not (tmp_path / "b" / "checkpoint.pt").exists()
    # same data order, optimizer state and schedule: bitwise the same translators
    a = TunedLens.load(tmp_path / "a", model).layer_translators.state_dict()
    b = TunedLens.load(tmp_path / "b", model).layer_translators.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(v.abs().sum() > 0 for v in a.values())
    torch.testing.assert_close(resumed.train_kl, full.train_kl, rtol=0, atol=0)

    # a checkpoint from another configuration or data is not silently continued
    train_tuned_lens(model, data, cfg, out=tmp_path / "c", stop_after=1, progress=False)
    with pytest.raises(TrainError, match=r"checkpoint\.pt.*training config.*lr_scale"):
        train_tuned_lens(
            model, data, dataclasses.replace(cfg, lr_scale=2.0), out=tmp_path / "c", progress=False
        )
    with pytest.raises(TrainError, match="training data"):
        train_tuned_lens(model, data[:-1], cfg, out=tmp_path / "c", progress=False)


def _utterances(model, n: int) -> list[Utterance]:
    rate = model.layout.units.frame_rate
    g = torch.Generator().manual_seed(5)
    out = []
    for j in range(n):
        picks = torch.randint(0, 40, (5,), generator=g).tolist()
        words = tuple(Word(WORDS[p], k * 0.2, (k + 1) * 0.2) for k, p in enumerate(picks))
        n_frames = round(1.0 * rate)
        units = torch.randint(0, 100, (n_frames,), generator=g).tolist()
        out.append(Utterance(f"utt{j}", words, tuple(units), None, rate))
    return out


def test_training_data_modes(tiny_model):
    model = tiny_model("spiritlm")
    utts = _utterances(model, 12)
    lay = model.layout
    text, c = encode_training_data(model, utts, "text")
    assert c == {"text": 12} and not any(bool(lay.is_unit(s).any()) for s in text)
    speech, c = encode_training_data(model, utts, "speech")
    assert c == {"speech": 12} and all(int(lay.is_unit(s).sum()) > 5 for s in speech)
    mix, c = encode_training_data(model, utts, "mix", seed=1)
    assert len(mix) == 12
    assert sum(c.values()) == 12 and len(c) >= 2
    assert encode_training_data(model, utts, "mix", seed=1)[1] == c  # seeded
    with pytest.raises(TrainError, match="data mode"):
        encode_training_data(model, utts, "audio")
    train, held = split_heldout(utts, 0.25)
    assert len(train) + len(held) == 12 and held
    assert split_heldout(list(reversed(utts)), 0.25)[1] == list(reversed(held))


def test_cli_train_and_eval(tiny_checkpoint, tmp_path, capsys):
    from speech_lens.cli.main import main
    from speech_lens.data.manifest import write_manifest

    path, _ = tiny_checkpoint("spiritlm")
    model = load_model(path)
    manifest = tmp_path / "utts.jsonl"
    write_manifest(manifest, _utterances(model, 16))
    out = tmp_path / "lens"
    argv = ["tuned-lens", "train", str(path), str(manifest), "--out", str(out)]
    argv += ["--data-mode", "interleaved", "--steps", "2", "--tokens-per-step", "64"]
    argv += ["--heldout", "0.25", "--no-progress"]
    assert main(argv) == 0
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["data_mode"] == "interleaved" and cfg["steps"] == 2 and cfg["tokens"] >= 128
    assert cfg["training"]["modes"] == {"interleaved": cfg["training"]["n_utterances"]}
    printed = capsys.readouterr().out
    assert "logit lens" in printed and "tuned lens" in printed
    assert main(["tuned-lens", "eval", str(path), str(manifest), "--lens", str(out)]) == 0
    assert main(["tuned-lens", "eval", str(path), str(manifest), "--lens", str(tmp_path)]) == 2


# --- memory ---------------------------------------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive, after every op.

    Exact and deterministic (no allocator or page effects): every aten op's outputs are
    recorded with a weak reference to their storage; a storage counts until it is freed.
    Backward ops run through the mode too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                old = self.refs.get(st.data_ptr())
                if old is None or old[0].expired():
                    self.refs[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
        live = 0
        for key, (ref, n) in list(self.refs.items()):
            if ref.expired():
                del self.refs[key]
            else:
                live += n
        self.peak = max(self.peak, live)
        return out


def _peak(fn) -> int:
    with LiveTensorBytes() as m, torch.no_grad():
        keep = fn()
    del keep
    return m.peak


def _memory(layers: int, tmp_path, batch: int = 2, seq: int = 128) -> dict[str, int]:
    path, _ = build_family("spiritlm", tmp_path / f"L{layers}", num_hidden_layers=layers)
    model = load_model(path)
    tokens = torch.randint(3, 32000, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    lens = TunedLens.from_model(model)
    for p in lens.parameters():  # gradients belong to the lens (like its weights), not the step
        p.grad = torch.zeros_like(p)
    kl = torch.zeros(layers, dtype=torch.float64)

    def step():  # one micro-batch: both streamed passes, every layer's loss and backward
        _accumulate(model, lens, tokens, mask, 1.0 / mask.sum().item(), 128, kl)

    return {
        "forward": _peak(lambda: model.bridge(tokens, use_cache=False)),
        "train": _peak(step),
        "full_cache": _peak(lambda: model.bridge.run_with_cache(tokens)[1]),
        "hidden_states": _peak(lambda: model.hf_model(tokens, output_hidden_states=True)),
    }


def test_training_memory_does_not_grow_with_depth(tmp_path):
    """Tensor memory of a training step beyond the model's own forward, at 2 and 4 layers."""
    small, large = _memory(2, tmp_path), _memory(4, tmp_path)
    d, added = 32, 2
    resid = 2 * 128 * d * 4  # bytes of one layer's resid_pre (32 KiB)
    translator = (d * d + d) * 4  # bytes of one translator's gradient (4 KiB)
    extra = {k: large[k] - large["forward"] - (small[k] - small["forward"]) for k in small}
    # caches grow by (at least) one residual per added layer ...
    assert extra["full_cache"] > added * 8 * resid, (small, large)
    assert extra["hidden_states"] >= added * resid, (small, large)
    # ... the streamed step by no activation at all: at most the autograd's fresh gradient
    # buffers of the added translators (lens-sized, d_model², independent of tokens)
    assert extra["train"] <= added * 2 * translator, (extra, small, large)


def test_lens_cli_reads_through_a_tuned_lens(tmp_path):
    """`speech-lens lens --lens tuned:PATH` on a shipped organism: the records differ from the
    logit lens's, the setting is recorded, and a resumed run refuses to mix the two lenses."""
    from pathlib import Path

    from speech_lens.cli.main import main

    org = Path(__file__).parents[1] / "organisms" / "textinit_interleaved"
    data = org.parent / "test_manifest.jsonl"
    common = [str(org), str(data), "--limit", "4", "--n-boot", "20", "--no-progress"]
    assert main(["lens", *common, "--out", str(tmp_path / "logit")]) == 0
    tuned = f"tuned:{org / 'tuned_lens'}"
    assert main(["lens", *common, "--out", str(tmp_path / "tuned"), "--lens", tuned]) == 0
    a = json.loads((tmp_path / "logit" / "metrics.json").read_text())
    b = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    assert b["config"]["lens"] == tuned and a["config"]["lens"] == "logit"
    # the output row reads the model's own logits either way; the inner rows differ
    ra, rb = a["metrics"]["mass"]["unit"]["mean"], b["metrics"]["mass"]["unit"]["mean"]
    assert abs(ra[-1] - rb[-1]) < 1e-6 and any(
        abs(x - y) > 1e-3 for x, y in zip(ra, rb, strict=True)
    )
    assert main(["lens", *common, "--out", str(tmp_path / "logit"), "--lens", tuned]) == 2
