"""Tuned-lens training on a selection of rows (``train_tuned_lens(layers=)``, ``tuned-lens train
--layer-stride/--layers``): only the selected translators train and are unembedded, the others stay
zero (= the logit lens), the tuned-lens layout is kept, and a resume under another selection is
refused."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from torch import nn

from speech_lens import layer_stride, load_model
from speech_lens._tl import final_norm_and_unembed
from speech_lens.data.manifest import write_manifest
from speech_lens.lens.kl import lens_kl
from speech_lens.lens.rows import translator_rows
from speech_lens.lens.train import TrainConfig, train_tuned_lens
from speech_lens.lens.train_data import TrainError
from speech_lens.lens.tuned import CONFIG_FILE, PARAMS_FILE, TunedLens
from speech_lens.testing.families import build_family, random_utterances

N_LAYERS = 5  # 6 lens rows: stride 2 trains translators 0, 2, 4 (rows 0, 2, 4 + output 5)
STRIDE2 = (0, 2, 4, 5)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    path, kw = build_family("spiritlm", root, num_hidden_layers=N_LAYERS)
    return path, kw, load_model(path, **kw)


def _sequences(model, n: int, length: int, seed: int) -> list[torch.Tensor]:
    """BOS, text ids, speech marker, unit ids."""
    lay = model.layout
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        text = lay.text_ids[torch.randint(0, 300, (length // 2,), generator=g)]
        units = lay.unit_ids[torch.randint(0, 200, (length // 2,), generator=g)]
        head = torch.tensor([lay.control_ids.get("bos", 1), lay.marker_ids["speech"]])
        out.append(torch.cat([head[:1], text, head[1:], units]))
    return out


def _state(lens: TunedLens) -> dict[str, torch.Tensor]:
    return lens.layer_translators.state_dict()


def test_translator_rows():
    assert translator_rows(None, 4) == (0, 1, 2, 3)
    assert translator_rows(layer_stride(31, 3), 30) == tuple(range(0, 30, 3))
    assert translator_rows((0, 3, 27), 30) == (0, 3, 27)  # the output row may be left out
    with pytest.raises(ValueError, match="out of range"):
        translator_rows((0, 31), 30)
    with pytest.raises(ValueError, match="strictly increasing"):
        translator_rows((3, 0), 30)
    with pytest.raises(ValueError, match="only the output row"):
        translator_rows((30,), 30)


def test_every_row_selected_is_the_full_training(deep):
    _, _, model = deep
    data = _sequences(model, 12, 16, seed=1)
    cfg = TrainConfig(steps=3, tokens_per_step=64, batch_size=4, seed=2)
    full = train_tuned_lens(model, data, cfg, progress=False)
    every = train_tuned_lens(model, data, cfg, progress=False, layers=range(N_LAYERS + 1))
    assert every.layers == full.layers == tuple(range(N_LAYERS))
    for k, v in _state(full.lens).items():
        assert torch.equal(_state(every.lens)[k], v), k
    assert all(v.abs().sum() > 0 for v in _state(full.lens).values())
    torch.testing.assert_close(every.train_kl, full.train_kl, rtol=0, atol=0)


def test_selected_translators_are_the_full_runs(deep):
    """Each translator's loss depends on it alone: with the global gradient clip out of the way,
    the selected translators are the full run's; the others stay exactly zero."""
    _, _, model = deep
    data = _sequences(model, 12, 16, seed=3)
    cfg = TrainConfig(steps=3, tokens_per_step=64, batch_size=4, seed=4, grad_clip=1e9)
    full = train_tuned_lens(model, data, cfg, progress=False)
    sub = train_tuned_lens(model, data, cfg, progress=False, layers=STRIDE2)
    assert sub.layers == (0, 2, 4) and sub.lens.config.trained_layers == (0, 2, 4)
    got, want = _state(sub.lens), _state(full.lens)
    for i in range(N_LAYERS):
        for p in ("weight", "bias"):
            k = f"{i}.{p}"
            if i in sub.layers:
                torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
            else:
                assert torch.equal(got[k], torch.zeros_like(got[k])), k
    torch.testing.assert_close(sub.train_kl, full.train_kl[:, [0, 2, 4]], rtol=1e-6, atol=1e-7)
    # the recipe's clip is one norm over the translators trained: binding, it couples them
    clipped = TrainConfig(steps=3, tokens_per_step=64, batch_size=4, seed=4, grad_clip=1e-3)
    a = train_tuned_lens(model, data, clipped, progress=False)
    b = train_tuned_lens(model, data, clipped, progress=False, layers=STRIDE2)
    assert not torch.allclose(_state(a.lens)["0.weight"], _state(b.lens)["0.weight"])


def _kl_grad(model, lens_weight_bias, h, p_final):
    """Σ_positions KL(p_final ‖ softmax(lm_head(norm(h + A h + b)))) and its gradient wrt
    (A, b), from the HF modules (independent of the streamed training)."""
    hf = model.hf_model
    a, b = (t.clone().requires_grad_(True) for t in lens_weight_bias)
    logq = hf.lm_head(hf.model.norm(h + h @ a.T + b)).log_softmax(-1)
    kl = (p_final * (p_final.clamp_min(1e-30).log() - logq)).sum()
    ga, gb = torch.autograd.grad(kl, (a, b))
    return ga, gb


def test_first_step_against_an_independent_gradient(deep):
    """One SGD step from zero: translator i moves by -lr (1 + momentum) c g_i, with g_i the
    gradient of the mean KL from HF hidden states and c the clip factor over the selected
    translators only (Nesterov, weight decay acting on zero)."""
    _, _, model = deep
    data = _sequences(model, 4, 12, seed=5)
    cfg = TrainConfig(steps=2, tokens_per_step=48, batch_size=4, seed=0, grad_clip=0.1)
    res = train_tuned_lens(model, data, cfg, progress=False, layers=(1, 3), stop_after=1)
    used = data  # 4 sequences of 13 tokens >= 48 tokens: the first step's batch is all of them
    n_tok = sum(len(s) for s in used)
    zero = (torch.zeros(model.d_model, model.d_model), torch.zeros(model.d_model))
    grads = {1: [torch.zeros_like(t) for t in zero], 3: [torch.zeros_like(t) for t in zero]}
    with torch.no_grad():
        outs = [model.hf_model(s[None], output_hidden_states=True) for s in used]
    for out in outs:
        p_final = out.logits[0].float().softmax(-1)
        for i in grads:
            gi = _kl_grad(model, zero, out.hidden_states[i][0], p_final)
            for acc, g in zip(grads[i], gi, strict=True):
                acc += g / n_tok
    norm = torch.sqrt(sum((g**2).sum() for gs in grads.values() for g in gs))
    clip = min(1.0, cfg.grad_clip / (float(norm) + 1e-6))
    assert clip < 1.0, float(norm)  # the clip binds here: its norm must be the selection's
    got = _state(res.lens)
    for i, (ga, gb) in grads.items():
        step = -cfg.lr * (1 + cfg.momentum) * clip
        torch.testing.assert_close(got[f"{i}.weight"], step * ga, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(got[f"{i}.bias"], step * gb, rtol=1e-4, atol=1e-8)
    for i in (0, 2, 4):
        assert not got[f"{i}.weight"].any() and not got[f"{i}.bias"].any()


def test_only_selected_rows_are_unembedded(deep):
    """Per micro-batch: one unembedding of the final residual, then one per selected row; only
    the selected translators run."""
    _, _, model = deep
    data = _sequences(model, 4, 12, seed=6)
    n_tok = sum(len(s) for s in data)
    cfg = TrainConfig(steps=1, tokens_per_step=n_tok, batch_size=4, chunk_tokens=512)
    _, unembed = final_norm_and_unembed(model.bridge)
    calls: list[int] = []
    handle = unembed.register_forward_hook(lambda m, i, o: calls.append(int(i[0].shape[0])))
    try:
        counts = {}
        for name, rows in (("full", None), ("stride2", STRIDE2)):
            calls.clear()
            train_tuned_lens(model, data, cfg, progress=False, layers=rows)
            counts[name] = list(calls)
    finally:
        handle.remove()
    assert counts["full"] == [n_tok] * (1 + N_LAYERS)
    assert counts["stride2"] == [n_tok] * (1 + 3)


def test_resume_under_another_selection_is_refused(deep, tmp_path):
    _, _, model = deep
    data = _sequences(model, 8, 12, seed=7)
    cfg = TrainConfig(steps=3, tokens_per_step=40, batch_size=4, checkpoint_every=1)
    out = tmp_path / "lens"
    train_tuned_lens(model, data, cfg, out=out, progress=False, layers=STRIDE2, stop_after=1)
    with pytest.raises(
        TrainError,
        match=r"checkpoint\.pt trains the translators of rows 0,2,4.*"
        r"asks for rows all",
    ):
        train_tuned_lens(model, data, cfg, out=out, progress=False)
    with pytest.raises(TrainError, match="rows 0,2,4, this run asks for rows 1,3"):
        train_tuned_lens(model, data, cfg, out=out, progress=False, layers=(1, 3, 5))
    # the same selection resumes and ends as an uninterrupted run
    done = train_tuned_lens(model, data, cfg, out=out, progress=False, layers=STRIDE2)
    ref = train_tuned_lens(model, data, cfg, progress=False, layers=STRIDE2)
    for k, v in _state(ref.lens).items():
        assert torch.equal(_state(done.lens)[k], v), k


def _storage_bytes(lens_dir) -> int:
    with zipfile.ZipFile(lens_dir / PARAMS_FILE) as z:
        return sum(i.file_size for i in z.infolist() if "/data/" in i.filename)


def test_saved_selection_keeps_the_tuned_lens_layout(deep, tmp_path):
    """Every translator's key is in params.pt; float16 halves the bytes, zeros are stored once,
    and both our loader and tuned-lens' (``layer_translators.load_state_dict``) read it."""
    _, _, model = deep
    data = _sequences(model, 8, 12, seed=8)
    cfg = TrainConfig(steps=2, tokens_per_step=40, batch_size=4)
    runs = {}
    for name, rows, dtype in (
        ("full", None, None),
        ("sub", STRIDE2, None),
        ("sub16", STRIDE2, torch.float16),
    ):
        runs[name] = train_tuned_lens(
            model, data, cfg, out=tmp_path / name, progress=False, layers=rows, params_dtype=dtype
        )
    one = (model.d_model**2 + model.d_model) * 4  # bytes of one float32 translator
    # tensor bytes stored in the torch zip (one data/ entry per storage)
    assert _storage_bytes(tmp_path / "full") == N_LAYERS * one
    assert _storage_bytes(tmp_path / "sub") == 4 * one  # 3 trained + one zero weight and bias
    assert _storage_bytes(tmp_path / "sub16") == 2 * one

    state = torch.load(tmp_path / "sub16" / PARAMS_FILE, weights_only=True)
    assert list(state) == [f"{i}.{p}" for i in range(N_LAYERS) for p in ("weight", "bias")]
    assert {v.dtype for v in state.values()} == {torch.float16}
    raw = json.loads((tmp_path / "sub16" / CONFIG_FILE).read_text())
    assert raw["trained_layers"] == [0, 2, 4] and raw["training"]["params_dtype"] == "float16"
    # the returned lens is the rounded one: what the file holds
    back = TunedLens.load(tmp_path / "sub16", model)
    for k, v in _state(runs["sub16"].lens).items():
        assert torch.equal(_state(back)[k], v), k
        assert torch.equal(v, v.half().float()), k
    # tuned-lens' loader: float32 translators (the unembedding's dtype), load_state_dict
    theirs = nn.ModuleList(nn.Linear(model.d_model, model.d_model) for _ in range(N_LAYERS))
    theirs.load_state_dict(state)
    for k, v in theirs.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, _state(back)[k]), k
    # float16 rounding moves the held-out KL by little
    held = _sequences(model, 6, 12, seed=9)
    kl32 = lens_kl(model, runs["sub"].lens, held, layers=STRIDE2)
    kl16 = lens_kl(model, back, held, layers=STRIDE2)
    torch.testing.assert_close(kl16, kl32, rtol=1e-3, atol=1e-5)


def test_cli_trains_and_evaluates_a_stride(deep, tmp_path, capsys):
    from speech_lens.cli.main import main

    path, _, _ = deep
    manifest = tmp_path / "utts.jsonl"
    write_manifest(manifest, random_utterances(24, seed=3))
    out = tmp_path / "lens"
    argv = ["tuned-lens", "train", str(path), str(manifest), "--out", str(out), "--no-progress"]
    argv += ["--data-mode", "speech", "--steps", "2", "--tokens-per-step", "64"]
    argv += ["--heldout", "0.25", "--layer-stride", "2", "--save-dtype", "float16"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "translators of 4 of 6 rows: 0, 2, 4, 5" in printed
    table = [line.split()[0] for line in printed.splitlines()[-4:]]
    assert table == ["0", "2", "4", "5"]
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["trained_layers"] == [0, 2, 4]
    assert cfg["training"]["heldout_layers"] == list(STRIDE2)
    assert (
        len(cfg["training"]["heldout_kl_tuned"]) == 4
        and cfg["training"]["heldout_kl_tuned"][-1] == 0
    )
    # eval reads the trained rows by default, --layers on request
    ev = ["tuned-lens", "eval", str(path), str(manifest), "--lens", str(out)]
    assert main(ev) == 0
    assert [ln.split()[0] for ln in capsys.readouterr().out.splitlines()[-4:]] == [
        "0",
        "2",
        "4",
        "5",
    ]
    assert main([*ev, "--layers", "2,5"]) == 0
    assert [ln.split()[0] for ln in capsys.readouterr().out.splitlines()[-2:]] == ["2", "5"]
    # a row the model does not have: a clear error naming the option, exit 2
    assert main([*argv[:-4], "--layers", "0,6"]) == 2
    assert "--layers 0,6: rows [6] are out of range" in capsys.readouterr().err
