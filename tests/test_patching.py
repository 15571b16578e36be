"""Activation patching: agreement with transformer_lens.patching, identities, refusals.

Prompts are built by hand from each model's layout (unit ids, markers, tokenizer) so these tests
do not depend on the prompt encoders.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformer_lens import patching as tlp

from speech_lens.data.encoded import BOS, MARKER, SPEECH, TEXT, EncodedPrompt, WordSpan
from speech_lens.patching.cross_modal import cross_modal
from speech_lens.patching.hooks import cache_source, hook_name, patching_hooks, run_patched
from speech_lens.patching.metrics import (
    kl_to_clean,
    logit_diff,
    next_token_logprob,
    next_word_logprob,
    word_logit_diff,
    word_token_ids,
)
from speech_lens.patching.positions import PatchingError, map_all, map_positions, map_words
from speech_lens.patching.result import PatchResult
from speech_lens.patching.sweep import patch_sweep
from speech_lens.patching.word_swap import splice_word, word_swap

PARITY_FAMILIES = ("spiritlm", "sims-qwen")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # hundreds of tiny forwards: on a shared 2-core machine a second thread only adds contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _units(word: str, n: int, salt: int = 0) -> list[int]:
    """Deterministic deduplicated pseudo-units for a word (no two equal neighbours)."""
    g = torch.Generator().manual_seed(sum(map(ord, word)) * 7 + salt)
    out: list[int] = []
    while len(out) < n:
        k = int(torch.randint(0, 400, (1,), generator=g))
        if not out or out[-1] != k:
            out.append(k)
    return out


def make_prompt(
    model,
    words: list[str],
    modalities: str | list[str],
    uid: str,
    *,
    n_units: dict[str, int] | None = None,
    family: str | None = None,
) -> EncodedPrompt:
    """BOS (when the family has one), a marker on each modality change, then the words."""
    mods = [modalities] * len(words) if isinstance(modalities, str) else list(modalities)
    lay, tok = model.layout, model.tokenizer
    ids: list[int] = []
    kind: list[str] = []
    widx: list[int] = []
    uidx: list[int] = []
    spans = []
    if model.spec.prompt.bos is True:
        ids.append(int(tok.bos_token_id))
        kind.append(BOS)
        widx.append(-1)
        uidx.append(-1)
    prev = None
    for i, (w, m) in enumerate(zip(words, mods, strict=True)):
        if m != prev:
            ids.append(lay.marker_ids["speech" if m == SPEECH else "text"])
            kind.append(MARKER)
            widx.append(-1)
            uidx.append(-1)
            prev = m
        start = len(ids)
        if m == SPEECH:
            n = (n_units or {}).get(w, 2 + len(w) % 3)
            for k in _units(w, n):
                ids.append(lay.unit_id(k))
                kind.append(SPEECH)
                widx.append(i)
                uidx.append(k)
        else:
            for t in tok.encode(" " + w, add_special_tokens=False):
                ids.append(int(t))
                kind.append(TEXT)
                widx.append(i)
                uidx.append(-1)
        spans.append(WordSpan(i, w, m, start, len(ids)))
    return EncodedPrompt(
        tokens=torch.tensor(ids),
        kind=tuple(kind),
        word_index=torch.tensor(widx),
        unit_index=torch.tensor(uidx),
        words=tuple(words),
        spans=tuple(spans),
        utterance_id=uid,
        family=family or model.spec.name,
    )


def _tl_metric(pos: int, good: int, bad: int):
    # written independently of speech_lens.patching.logit_diff
    def m(logits):
        return logits[0, pos, good] - logits[0, pos, bad]

    return m


def _same_length_pair(model, modality: str):
    """Clean/corrupted prompts of equal length that differ in one word (same modality)."""
    clean = make_prompt(model, ["the", "cat", "sat"], modality, "clean")
    n = {"cat": 3, "dog": 3}
    if modality == SPEECH:
        clean = make_prompt(model, ["the", "cat", "sat"], SPEECH, "clean", n_units=n)
        corrupt = make_prompt(model, ["the", "dog", "sat"], SPEECH, "corrupt", n_units=n)
    else:  # pick a swap word with the same number of sub-tokens
        for w in ("dog", "man", "sun", "tree", "fish"):
            corrupt = make_prompt(model, ["the", w, "sat"], TEXT, "corrupt")
            if len(corrupt) == len(clean):
                break
    assert len(clean) == len(corrupt)
    assert not torch.equal(clean.tokens, corrupt.tokens)
    return clean, corrupt


# ---------------------------------------------------------------------------------------------
# agreement with transformer_lens.patching
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fam", PARITY_FAMILIES)
@pytest.mark.parametrize("modality", [SPEECH, TEXT])
def test_block_sweeps_match_transformer_lens(tiny_model, fam, modality):
    model = tiny_model(fam)
    clean, corrupt = _same_length_pair(model, modality)
    pos = len(corrupt) - 1
    good, bad = int(model.layout.text_ids[5]), int(model.layout.text_ids[9])
    tl_metric = _tl_metric(pos, good, bad)
    _, tl_cache = model.bridge.run_with_cache(clean.tokens[None])
    tl_every = tlp.get_act_patch_block_every(
        model.bridge, corrupt.tokens[None], tl_cache, tl_metric
    )
    tl_post = tlp.generic_activation_patch(
        model.bridge,
        corrupt.tokens[None],
        tl_cache,
        tl_metric,
        patch_setter=tlp.layer_pos_patch_setter,
        activation_name="resid_post",
        index_axis_names=("layer", "pos"),
    )
    tl_mid = tlp.get_act_patch_resid_mid(model.bridge, corrupt.tokens[None], tl_cache, tl_metric)
    pmap = map_all(clean, corrupt)
    ours = {
        c: patch_sweep(
            model, clean, corrupt, pmap, logit_diff(pos, good, bad), component=c, positions="pair"
        )
        for c in ("resid_pre", "attn_out", "mlp_out", "resid_post", "resid_mid")
    }
    assert ours["resid_pre"].values.shape == (model.n_layers, len(corrupt))
    # the sweep moves the metric (a parity check over constants would prove nothing)
    assert ours["resid_pre"].values.std() > 1e-3
    for i, c in enumerate(("resid_pre", "attn_out", "mlp_out")):
        assert_close(ours[c].values, tl_every[i].float(), rtol=1e-6, atol=1e-6)
    assert_close(ours["resid_post"].values, tl_post.float(), rtol=1e-6, atol=1e-6)
    assert_close(ours["resid_mid"].values, tl_mid.float(), rtol=1e-6, atol=1e-6)
    assert ours["resid_pre"].rule == "each" and ours["resid_pre"].component == "resid_pre"


@pytest.mark.parametrize("fam", PARITY_FAMILIES)
def test_head_sweeps_match_transformer_lens(tiny_model, fam):
    model = tiny_model(fam)
    clean, corrupt = _same_length_pair(model, SPEECH)
    pos = len(corrupt) - 1
    good, bad = int(model.layout.text_ids[3]), int(model.layout.unit_ids[4])
    tl_metric = _tl_metric(pos, good, bad)
    _, tl_cache = model.bridge.run_with_cache(clean.tokens[None])
    tl_by_pos = tlp.get_act_patch_attn_head_out_by_pos(
        model.bridge, corrupt.tokens[None], tl_cache, tl_metric
    )
    tl_all_pos = tlp.get_act_patch_attn_head_out_all_pos(
        model.bridge, corrupt.tokens[None], tl_cache, tl_metric
    )
    pmap = map_all(clean, corrupt)
    m = logit_diff(pos, good, bad)
    by_pos = patch_sweep(
        model, clean, corrupt, pmap, m, component="z", positions="pair", heads="each"
    )
    all_pos = patch_sweep(
        model, clean, corrupt, pmap, m, component="z", positions="all", heads="each"
    )
    assert by_pos.axes == ("layer", "position", "head")
    assert all_pos.axes == ("layer", "head")
    assert all_pos.values.std() > 1e-4
    assert_close(by_pos.values, tl_by_pos.float(), rtol=1e-6, atol=1e-6)
    assert_close(all_pos.values, tl_all_pos.float(), rtol=1e-6, atol=1e-6)


def test_word_map_each_matches_transformer_lens_on_span(tiny_model):
    """A word map with rule 'each' on equal-length spans = TL patching of those positions."""
    model = tiny_model("spiritlm")
    clean, corrupt = _same_length_pair(model, SPEECH)
    span = list(clean.spans[1].positions)
    pos = len(corrupt) - 1
    good, bad = 30, 40
    import pandas as pd

    index_df = pd.DataFrame({"layer": [0, 1], "pos": [span[0], span[0]]})
    _, tl_cache = model.bridge.run_with_cache(clean.tokens[None])

    def setter(act, index, clean_act):  # all positions of the span at once
        act[:, span] = clean_act[:, span]
        return act

    tl = tlp.generic_activation_patch(
        model.bridge,
        corrupt.tokens[None],
        tl_cache,
        _tl_metric(pos, good, bad),
        patch_setter=setter,
        activation_name="resid_pre",
        index_df=index_df,
    )
    ours = patch_sweep(
        model,
        clean,
        corrupt,
        map_words(clean, corrupt, [1], rule="each"),
        logit_diff(pos, good, bad),
        positions="all",
    )
    assert_close(ours.values, tl.float(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fam", PARITY_FAMILIES)
def test_self_patch_is_identity(tiny_model, fam):
    model = tiny_model(fam)
    p = make_prompt(model, ["the", "cat", "sat"], [TEXT, SPEECH, SPEECH], "p")
    ref = model.bridge(p.tokens[None])
    for comp in ("resid_pre", "attn_out", "mlp_out", "resid_post", "z"):
        for rule in ("each", "last"):
            pm = map_words(p, p, rule=rule)
            out = run_patched(model, p, p, pm, component=comp, layers=range(model.n_layers))
            assert torch.equal(out, ref), (comp, rule)


@pytest.mark.parametrize("fam", PARITY_FAMILIES)
def test_last_layer_resid_post_everywhere_gives_source_logits(tiny_model, fam):
    model = tiny_model(fam)
    src = make_prompt(model, ["the", "cat", "sat"], SPEECH, "src", n_units={"cat": 3, "dog": 3})
    tgt = make_prompt(model, ["the", "dog", "sat"], SPEECH, "tgt", n_units={"cat": 3, "dog": 3})
    src_logits = model.bridge(src.tokens[None])
    tgt_logits = model.bridge(tgt.tokens[None])
    assert not torch.allclose(src_logits, tgt_logits)
    out = run_patched(
        model, src, tgt, map_all(src, tgt), component="resid_post", layers=model.n_layers - 1
    )
    assert_close(out, src_logits, rtol=0, atol=1e-6)
    # and resid_pre of layer 0 everywhere is the whole source run too
    out0 = run_patched(model, src, tgt, map_all(src, tgt), component="resid_pre", layers=0)
    assert_close(out0, src_logits, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# cross-modal maps and rules
# ---------------------------------------------------------------------------------------------


def test_map_rules_speech_to_text(tiny_model):
    model = tiny_model("sims-qwen")  # multi-sub-token words: " cat" -> [Ġc, at]
    sp = make_prompt(model, ["the", "cat", "sat"], SPEECH, "u1", n_units={"cat": 4})
    tx = make_prompt(model, ["the", "cat", "sat"], TEXT, "u1")
    s_span, t_span = sp.spans[1], tx.spans[1]
    assert s_span.end - s_span.start == 4 and t_span.end - t_span.start == 2
    last = map_words(sp, tx, [1], rule="last")
    assert last.pairs == ((t_span.end - 1, (s_span.end - 1,)),)
    mean = map_words(sp, tx, [1], rule="mean")
    assert mean.pairs == tuple((t, tuple(s_span.positions)) for t in t_span.positions)
    with pytest.raises(PatchingError, match="equal span lengths"):
        map_words(sp, tx, [1], rule="each")
    subs = mean.subsets("pair")
    assert [lab for lab, _ in subs] == ["cat[0]", "cat[1]"]
    assert [m.pairs for _, m in subs] == [(p,) for p in mean.pairs]
    assert mean.subsets("group")[0][1] == mean and mean.rule == "mean"
    # mean rule writes the span mean: check the patched activation directly
    _, cache = cache_source(model, sp, [hook_name("resid_pre", 1)])
    seen = {}

    def grab(act, *, hook):
        seen["act"] = act.detach().clone()

    hooks = patching_hooks(cache, mean, component="resid_pre", layers=[1])
    model.bridge.run_with_hooks(
        tx.tokens[None], fwd_hooks=[*hooks, (hook_name("resid_pre", 1), grab)]
    )
    src_act = cache[hook_name("resid_pre", 1)][0]
    expect = src_act[list(s_span.positions)].mean(0)
    for t in t_span.positions:
        assert_close(seen["act"][0, t], expect, rtol=0, atol=0)
    # positions outside the map are untouched
    clean_tx = model.bridge.run_with_cache(
        tx.tokens[None], names_filter=[hook_name("resid_pre", 1)]
    )[1]
    assert torch.equal(
        seen["act"][0, : t_span.start], clean_tx[hook_name("resid_pre", 1)][0, : t_span.start]
    )


def test_text_to_speech_sweep_and_table(tiny_model, tmp_path):
    model = tiny_model("spiritlm")
    tx = make_prompt(model, ["the", "cat", "sat", "on"], TEXT, "t")
    sp = make_prompt(model, ["the", "dog", "sat", "on"], SPEECH, "s")
    pm = map_words(tx, sp, [1], rule="mean")
    metric = word_logit_diff(model, sp, 1, "sat", "ran")
    res = patch_sweep(model, tx, sp, pm, metric, layers=[0, 1, (0, 1)], positions="all")
    assert isinstance(res, PatchResult)
    assert res.values.shape == (3,) and res.axes == ("layer",)
    assert res.layer_labels == ("0", "1", "0-1")
    assert res.rule == "mean" and res.source_value is None
    assert "cat@1->dog@1" in pm.groups[0].label
    # patching at layer 0 must move the metric away from the unpatched baseline
    assert abs(float(res.values[0]) - res.baseline) > 1e-5
    rows = res.to_table()
    assert len(rows) == 3 and rows[2]["layer"] == "0-1" and rows[0]["rule"] == "mean"
    path = res.to_csv(tmp_path / "t.csv")
    assert path.read_text().splitlines()[0].startswith("layer,position,value")
    # a layer set equals run_patched with both layers
    joint = run_patched(model, tx, sp, pm, layers=[0, 1])
    assert_close(metric(joint), res.values[2], rtol=1e-6, atol=1e-6)


def test_metrics(tiny_model):
    model = tiny_model("spiritlm")
    p = make_prompt(model, ["the", "cat", "sat"], TEXT, "m")
    logits = model.bridge(p.tokens[None]).detach()
    m = next_word_logprob(model, p, 1)  # log p("sat") after "cat"
    sat = model.tokenizer.encode(" sat", add_special_tokens=False)[-1]
    pos = p.spans[1].end - 1
    assert_close(m(logits), logits[0, pos].log_softmax(-1)[sat], rtol=1e-6, atol=1e-6)
    assert m.token_ids == (sat,)
    kl = kl_to_clean(logits, pos, pos)
    assert abs(float(kl(logits))) < 1e-6
    other = model.bridge(
        make_prompt(model, ["the", "dog", "sat"], TEXT, "m2").tokens[None]
    ).detach()
    assert float(kl(other)) > 1e-6
    lp = next_token_logprob(pos, [sat, sat + 1])
    expect = logits[0, pos].log_softmax(-1)[[sat, sat + 1]].exp().sum().log()
    assert_close(lp(logits), expect, rtol=1e-5, atol=1e-6)


def test_hooks_compose_with_a_reader_of_later_layers(tiny_model):
    """Patch at layer 0, read resid_post of the last layer in the same forward: the reading
    equals the patched run's own final residual (ln_final + unembed gives its logits)."""
    model = tiny_model("spiritlm")
    tx = make_prompt(model, ["the", "cat", "sat"], TEXT, "t")
    sp = make_prompt(model, ["the", "cat", "sat"], SPEECH, "s")
    pm = map_words(tx, sp, rule="last")
    _, cache = cache_source(model, tx, [hook_name("resid_pre", 0)])
    read = {}

    def reader(act, *, hook):
        read["x"] = act.detach().clone()

    last = hook_name("resid_post", model.n_layers - 1)
    hooks = patching_hooks(cache, pm, component="resid_pre", layers=[0])
    with model.bridge.hooks(fwd_hooks=hooks):
        logits = model.bridge.run_with_hooks(sp.tokens[None], fwd_hooks=[(last, reader)])
    b = model.bridge
    lens = b.unembed(b.ln_final(read["x"]))
    assert_close(lens, logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, b(sp.tokens[None]))  # the patch was live during the read


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------


def test_refusals(tiny_model):
    model = tiny_model("spiritlm")
    a = make_prompt(model, ["the", "cat", "sat"], SPEECH, "a")
    b = make_prompt(model, ["the", "cat"], TEXT, "b")
    with pytest.raises(PatchingError, match=r"word 2 is missing from prompt 'b'"):
        map_words(a, b, [2])
    with pytest.raises(PatchingError, match="outside prompt 'b'"):
        map_positions(a, b, [((1,), (len(b),))])
    with pytest.raises(PatchingError, match="map_all needs prompts of equal length"):
        map_all(a, b)
    with pytest.raises(PatchingError, match="unknown rule"):
        map_words(a, b, [1], rule="first")
    # a map is refused on prompts other than its own
    pm = map_words(a, b, [1])
    c = make_prompt(model, ["the", "dog"], TEXT, "c")
    with pytest.raises(PatchingError, match="built for target prompt 'b'"):
        run_patched(model, a, c, pm)
    with pytest.raises(PatchingError, match="layer 7 out of range"):
        patch_sweep(model, a, b, pm, logit_diff(0, 1, 2), layers=[7])
    with pytest.raises(PatchingError, match="heads= applies to component 'z'"):
        patch_sweep(model, a, b, pm, logit_diff(0, 1, 2), heads="each")


def test_prompts_from_different_models_refused(tiny_model):
    sp = tiny_model("spiritlm")
    qw = tiny_model("sims-qwen")
    ll = tiny_model("sims-llama")
    a = make_prompt(sp, ["the", "cat"], SPEECH, "a")
    q = make_prompt(qw, ["the", "cat"], SPEECH, "q")
    with pytest.raises(PatchingError, match="different models"):
        map_words(a, q)
    # same family name, different tokenizer/layout: caught against the model's layout
    lq = make_prompt(ll, ["the", "cat"], SPEECH, "l")
    assert lq.family == q.family
    pm = map_words(q, lq, rule="last")
    with pytest.raises(
        PatchingError, match=r"target 'l'.*not a (speech|marker) id.*different model"
    ):
        run_patched(qw, q, lq, pm)
    with pytest.raises(PatchingError, match=r"outside the vocabulary"):
        run_patched(sp, q, q, map_words(q, q))


# ---------------------------------------------------------------------------------------------
# worked experiments, plots, CLI (real encoder + sample manifest)
# ---------------------------------------------------------------------------------------------

MANIFEST = Path(__file__).parents[1] / "examples" / "data" / "sample_manifest.jsonl"


def _utts(model):
    from speech_lens.data.manifest import read_manifest

    return {u.id: u for u in read_manifest(MANIFEST, layout=model.layout)}


@pytest.mark.parametrize("fam", PARITY_FAMILIES)
def test_cross_modal_last_layer_reproduces_source_prediction(tiny_model, fam):
    """Text -> speech at the last layer's resid_post, rule 'last': the speech run's prediction
    at w's last unit becomes the text run's at w's last sub-token, exactly."""
    from speech_lens.data.prompts import encode_prompt

    model = tiny_model(fam)
    u = _utts(model)["s1"]
    last = model.n_layers - 1
    (res,) = cross_modal(model, u, words=[1], component="resid_post", layers=[0, last])
    assert res.extra["word"] == "cat" and res.extra["next_word"] == "sat"
    assert_close(res.values[1], torch.tensor(res.source_value), rtol=0, atol=1e-5)
    assert abs(float(res.values[1]) - res.baseline) > 1e-4
    # baseline and source value, recomputed independently of patch_sweep
    sp, tx = encode_prompt(model, u, mode="speech"), encode_prompt(model, u, mode="text")
    sat = list(word_token_ids(model, "sat"))
    for prompt, value in ((sp, res.baseline), (tx, res.source_value)):
        pos = prompt.spans[1].end - 1
        lp = model.bridge(prompt.tokens[None])[0, pos].log_softmax(-1)[sat].logsumexp(-1)
        assert_close(torch.tensor(value), lp, rtol=1e-5, atol=1e-5)
    back = cross_modal(
        model, u, direction="speech-to-text", words=[1], layers=[last], component="resid_post"
    )[0]
    assert_close(back.values[0], torch.tensor(back.source_value), rtol=0, atol=1e-5)
    assert back.baseline == pytest.approx(res.source_value, abs=1e-5)


def test_splice_and_word_swap(tiny_model):
    model = tiny_model("spiritlm")
    utts = _utts(model)
    clean = utts["s1"]
    corrupt = splice_word(clean, 1, utts["s4"], 3)
    assert [w.text for w in corrupt.words] == ["the", "bird", "sat", "on", "the", "mat"]
    fr = clean.frame_rate
    d = utts["s4"].words[3]
    shift = (round(d.end * fr) - round(d.start * fr)) - (
        round(clean.words[1].end * fr) - round(clean.words[1].start * fr)
    )
    assert corrupt.n_frames == clean.n_frames + shift
    assert corrupt.words[2].start == pytest.approx(clean.words[2].start + shift / fr)
    assert (
        corrupt.frames()[: round(clean.words[1].start * fr)]
        == clean.frames()[: round(clean.words[1].start * fr)]
    )
    den = word_swap(model, clean, corrupt, 1, mode="denoise", rule="last")
    noi = word_swap(model, clean, corrupt, 1, mode="noise", rule="last")
    assert den.axes == ("layer", "position") and den.values.shape[0] == model.n_layers
    assert den.positions[1] == "cat@1->bird@1" and noi.positions[1] == "bird@1->cat@1"
    # denoising's unpatched run is noising's source run and vice versa
    assert den.baseline == pytest.approx(noi.source_value, abs=1e-5)
    assert noi.baseline == pytest.approx(den.source_value, abs=1e-5)
    # patching a word after the swapped one cannot reach the metric's position (causal mask)
    assert_close(den.values[:, 3], torch.full((model.n_layers,), den.baseline), rtol=0, atol=1e-5)
    with pytest.raises(PatchingError, match="equal span lengths"):
        word_swap(model, clean, corrupt, 1, rule="each")


def test_plots_shapes(tiny_model):
    from speech_lens.report.patching import plot_layer_head, plot_layer_position, plot_result_curve

    model = tiny_model("spiritlm")
    clean, corrupt = _same_length_pair(model, SPEECH)
    pm = map_all(clean, corrupt)
    m = logit_diff(len(corrupt) - 1, 30, 40)
    lp = patch_sweep(model, clean, corrupt, pm, m, positions="pair")
    fig = plot_layer_position(lp)
    assert len(fig.data[0].z) == model.n_layers and len(fig.data[0].z[0]) == len(corrupt)
    assert_close(torch.tensor(fig.data[0].z), lp.values - lp.baseline)
    heads = patch_sweep(model, clean, corrupt, pm, m, component="z", positions="all", heads="each")
    hf = plot_layer_head(heads)
    assert len(hf.data[0].z[0]) == model.bridge.cfg.n_heads
    curve = plot_result_curve(patch_sweep(model, clean, corrupt, pm, m, positions="all"))
    assert list(curve.data[0].x) == ["0", "1"]
    with pytest.raises(ValueError, match="layer x position"):
        plot_layer_position(heads)


def test_cli_patch(tiny_checkpoint, tmp_path, capsys):
    from speech_lens.cli.main import main

    path, _ = tiny_checkpoint("spiritlm")
    out = tmp_path / "out"
    args = ["patch", str(path), str(MANIFEST), "--out", str(out), "--max-utterances", "2"]
    rc = main([*args, "--experiment", "text-to-speech", "--rule", "mean", "--layers", "0,0-1"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == ["0", "0-1"] and summary["rule"] == "mean"
    rows = list(csv.DictReader((out / "text-to-speech.csv").open()))
    assert len(rows) == 2 * summary["words"] and {r["rule"] for r in rows} == {"mean"}
    assert (out / "text-to-speech_curve.html").stat().st_size > 1_000_000  # plotly.js inlined
    rc = main([*args, "--experiment", "word-swap", "--layers", "1"])
    assert (
        rc == 0
        and (out / "word-swap.csv").exists()
        and (out / "word-swap_denoise_s1.html").exists()
    )


def test_patch_then_logit_lens_reads_patched_layers(tiny_model):
    """Patching hooks passed to speech_lens.logit_lens: the lens row of the patched layer at the
    patched position equals the source run's lens there; the output row equals run_patched."""
    from speech_lens import logit_lens

    model = tiny_model("spiritlm")
    u = _utts(model)["s1"]
    from speech_lens.data.prompts import encode_prompt

    tx, sp = encode_prompt(model, u, mode="text"), encode_prompt(model, u, mode="speech")
    pm = map_words(tx, sp, [1], rule="last")
    ((t_pos, (s_pos,)),) = pm.pairs
    _, cache = cache_source(model, tx, [hook_name("resid_pre", 1)])
    hooks = patching_hooks(cache, pm, component="resid_pre", layers=[1])
    patched = logit_lens(model, sp.tokens, k=5, fwd_hooks=hooks)
    plain = logit_lens(model, sp.tokens, k=5)
    src = logit_lens(model, tx.tokens, k=5)
    assert torch.equal(patched.topk_ids[1, t_pos], src.topk_ids[1, s_pos])
    assert_close(patched.topk_logprobs[1, t_pos], src.topk_logprobs[1, s_pos], rtol=0, atol=1e-6)
    assert torch.equal(patched.topk_ids[0], plain.topk_ids[0])  # layers before the patch: as is
    out = run_patched(model, tx, sp, pm, component="resid_pre", layers=1)[0]
    ref = out.log_softmax(-1).topk(5, dim=-1)
    assert_close(patched.topk_logprobs_all[-1], ref.values, rtol=1e-5, atol=1e-5)
    # the same through bridge.hooks(): hooks attached outside compose with the lens too
    with model.bridge.hooks(fwd_hooks=hooks):
        ctx = logit_lens(model, sp.tokens, k=5)
    assert torch.equal(ctx.topk_ids, patched.topk_ids)


def test_lens_readout_metric(tiny_model):
    """read_layer: the next-word log-prob read by the logit lens in the patched run. Row
    n_layers equals the output metric; at the patched row itself the reading equals the source
    run's reading at the source position; the unpatched value equals speech_lens.logit_lens."""
    from speech_lens import logit_lens
    from speech_lens.data.prompts import encode_prompt

    model = tiny_model("spiritlm")
    u = _utts(model)["s1"]
    n = model.n_layers
    out = cross_modal(model, u, words=[1], layers=[0, 1])[0]
    top = cross_modal(model, u, words=[1], layers=[0, 1], read_layer=n)[0]
    assert_close(top.values, out.values, rtol=1e-5, atol=1e-5)
    assert top.baseline == pytest.approx(out.baseline, abs=1e-5)
    assert top.metric.startswith(f"lens{n}:")
    at1 = cross_modal(model, u, words=[1], layers=[1], read_layer=1)[0]
    assert_close(at1.values[0], torch.tensor(at1.source_value), rtol=0, atol=1e-5)
    sp = encode_prompt(model, u, mode="speech")
    (sat,) = word_token_ids(model, "sat")
    tg = torch.full((len(sp),), -1)
    pos = sp.spans[1].end - 1
    tg[pos] = sat
    lens = logit_lens(model, sp.tokens, k=3, targets=tg)
    assert at1.baseline == pytest.approx(float(lens.target_logprobs[1, pos, 0]), abs=1e-5)
    assert abs(float(at1.values[0]) - at1.baseline) > 1e-4
