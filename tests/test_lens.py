"""The streaming logit lens against an independent implementation on every family's checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speech_lens import logit_lens
from speech_lens.data.encoded import BOS, MARKER, SPEECH, EncodedPrompt, WordSpan, WordTarget


def _tokens(model, n_units: int = 23, n_text: int = 9) -> torch.Tensor:
    """BOS?, a marker, units, the other markers, text ids: every partition appears."""
    lay = model.layout
    g = torch.Generator().manual_seed(7)
    units = [
        lay.unit_id(int(u)) for u in torch.randint(0, lay.units.count, (n_units,), generator=g)
    ]
    text_ids = lay.text_ids
    text = text_ids[torch.randint(0, len(text_ids), (n_text,), generator=g)].tolist()
    head = [lay.control_ids["bos"]] if "bos" in lay.control_ids else []
    mk = list(lay.marker_ids.values())
    return torch.tensor([*head, mk[0], *units, *mk[1:], *text], dtype=torch.long)


def _reference(model, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probs [rows, pos, vocab] from HF hidden states, a hand-written RMSNorm and lm_head.

    Independent of the hooks: HF ``output_hidden_states`` gives resid_pre of every block (its
    last entry is already normed, TL pitfall P7, so the last row is the model's own logits).
    """
    hf = model.hf_model
    norm, head = model.bridge.ln_final.original_component, model.bridge.unembed.original_component
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    with torch.no_grad():
        out = hf(tokens.unsqueeze(0), output_hidden_states=True)
        rows = []
        for h in out.hidden_states[: model.n_layers]:
            h = h[0].double()
            x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.double()
            b = None if head.bias is None else head.bias.double()
            rows.append(F.linear(x, head.weight.double(), b))
        rows.append(out.logits[0].double())
    return torch.stack(rows).log_softmax(-1)


def _rank_bounds(ref: torch.Tensor, t: torch.Tensor, tol: float = 5e-6):
    """Rank of target t in ref log-probs, allowing ids within tol (fp32 vs fp64 near-ties)."""
    v = ref.gather(-1, t.unsqueeze(-1))
    return (ref > v + tol).sum(-1), (ref > v - tol).sum(-1) - 1  # -1: the target itself


@pytest.mark.float_order
def test_logit_lens_matches_hf_hidden_states(family, tiny_model):
    model = tiny_model(family)
    toks = _tokens(model)
    targets = torch.roll(toks, -1)
    res = logit_lens(model, toks, k=5, targets=targets, chunk_size=7)  # chunks cross spans
    ref = _reference(model, toks)
    L = model.n_layers
    assert res.topk_ids.shape == (L + 1, len(toks), 5)
    lay = model.layout
    # top-k over all ids, and over text ids only
    v_all, i_all = ref.topk(5, dim=-1)
    torch.testing.assert_close(res.topk_ids_all, i_all)
    torch.testing.assert_close(res.topk_logprobs_all.double(), v_all, atol=2e-5, rtol=0)
    text = ref.masked_fill(~lay.text_mask, float("-inf"))
    v_txt, i_txt = text.topk(5, dim=-1)
    torch.testing.assert_close(res.topk_ids, i_txt)
    torch.testing.assert_close(res.topk_logprobs.double(), v_txt, atol=2e-5, rtol=0)
    assert bool(lay.text_mask[res.topk_ids].all())
    # masses under the full softmax
    p = ref.exp()
    tol = dict(atol=2e-5, rtol=0)  # fp32 sums over 32k-152k probabilities
    torch.testing.assert_close(res.unit_mass.double(), p[..., lay.unit_mask].sum(-1), **tol)
    torch.testing.assert_close(res.text_mass.double(), p[..., lay.text_mask].sum(-1), **tol)
    torch.testing.assert_close(res.speech_mass.double(), p[..., lay.speech_mask].sum(-1), **tol)
    markers = torch.tensor(list(lay.marker_ids.values()))
    torch.testing.assert_close(res.marker_mass.double(), p[..., markers].sum(-1), **tol)
    other = ~lay.text_mask & ~lay.speech_mask
    other[markers] = False
    torch.testing.assert_close(res.other_mass.double(), p[..., other].sum(-1), **tol)
    # target ranks and log-probs
    assert res.target_ranks is not None and res.target_logprobs is not None
    lo, hi = _rank_bounds(ref, targets.expand(L + 1, -1))
    ours = res.target_ranks[..., 0]
    assert bool(((ours >= lo) & (ours <= hi)).all())
    clear = lo == hi  # no other id within fp32 error of the target: the rank must be exact
    assert clear.float().mean() > 0.2 and int((hi - lo).max()) <= 10
    torch.testing.assert_close(ours[clear], lo[clear])
    torch.testing.assert_close(
        res.target_logprobs[..., 0].double(),
        ref.gather(-1, targets.expand(L + 1, -1).unsqueeze(-1))[..., 0],
        atol=2e-5,
        rtol=0,
    )


def test_last_row_is_the_models_logits(family, tiny_model):
    model = tiny_model(family)
    toks = _tokens(model)
    with torch.no_grad():
        logits = model.bridge(toks.unsqueeze(0))[0]
    res = logit_lens(model, toks, k=4, targets="next")
    lp = logits.log_softmax(-1)
    v, i = lp.topk(4, dim=-1)
    torch.testing.assert_close(res.topk_logprobs_all[-1], v, atol=0, rtol=0)
    torch.testing.assert_close(res.topk_ids_all[-1], i)
    nxt = toks[1:]
    assert res.target_ranks is not None
    # ties count against the target: every other id with a log-prob >= the target's is above it
    torch.testing.assert_close(
        res.target_ranks[-1, :-1, 0], (lp[:-1] >= lp[:-1].gather(-1, nxt[:, None])).sum(-1) - 1
    )
    assert int(res.target_ranks[-1, -1, 0]) == -1  # no next token after the last one


@pytest.mark.float_order
def test_positions_and_chunks_do_not_change_results(tiny_model):
    model = tiny_model("spiritlm")
    toks = _tokens(model)
    full = logit_lens(model, toks, k=3, chunk_size=1000)
    part = logit_lens(model, toks, k=3, positions=[-1, 3, 5], chunk_size=1)
    assert part.positions.tolist() == [3, 5, len(toks) - 1]
    torch.testing.assert_close(part.topk_ids, full.topk_ids[:, part.positions])
    torch.testing.assert_close(part.mass, full.mass[:, part.positions], atol=1e-6, rtol=0)


def test_composes_with_user_hooks(tiny_model):
    """A user's hook in the same run sees its activation, and our rows reflect its edit."""
    model = tiny_model("spiritlm")
    toks = _tokens(model)
    seen = []

    def user_hook(act, *, hook):
        seen.append(act.shape)

    plain = logit_lens(model, toks, k=3)
    res = logit_lens(model, toks, k=3, fwd_hooks=[("blocks.1.hook_resid_pre", user_hook)])
    assert seen == [torch.Size([1, len(toks), model.d_model])]
    torch.testing.assert_close(res.topk_ids, plain.topk_ids)
    torch.testing.assert_close(res.mass, plain.mass)

    # an editing hook: doubling resid_pre of block 1 changes row 1 exactly as a hand edit would
    def double(act, *, hook):
        return act * 2

    edited = logit_lens(model, toks, k=3, fwd_hooks=[("blocks.1.hook_resid_pre", double)])
    with torch.no_grad():
        h = model.hf_model(toks.unsqueeze(0), output_hidden_states=True).hidden_states[1][0]
        norm = model.bridge.ln_final.original_component
        head = model.bridge.unembed.original_component
        lp = head(norm(2 * h)).log_softmax(-1)
    torch.testing.assert_close(edited.topk_ids_all[1], lp.topk(3).indices)
    torch.testing.assert_close(edited.topk_ids_all[0], plain.topk_ids_all[0])  # before the edit
    assert not torch.equal(edited.topk_logprobs_all[-1], plain.topk_logprobs_all[-1])

    # the same through a context manager the user opened around our call
    with model.bridge.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", double)]):
        ctx = logit_lens(model, toks, k=3)
    torch.testing.assert_close(ctx.topk_logprobs_all, edited.topk_logprobs_all)
    after = logit_lens(model, toks, k=3)  # the user's context hooks are gone, ours too
    torch.testing.assert_close(after.topk_logprobs_all, plain.topk_logprobs_all)


class _Shift:
    """A stand-in for a tuned lens: adds a fixed vector before the final norm."""

    def __init__(self, d: int):
        self.b = torch.linspace(-1, 1, d)

    def transform_hidden(self, h, layer):
        return h + self.b * (layer + 1)


def test_lens_transform_applies_before_final_norm(tiny_model):
    model = tiny_model("sims-qwen")
    toks = _tokens(model)
    shift = _Shift(model.d_model)
    res = logit_lens(model, toks, k=3, lens=shift)
    plain = logit_lens(model, toks, k=3)
    norm = model.bridge.ln_final.original_component
    head = model.bridge.unembed.original_component
    with torch.no_grad():
        hs = model.hf_model(toks.unsqueeze(0), output_hidden_states=True).hidden_states
        for i in range(model.n_layers):
            lp = head(norm(shift.transform_hidden(hs[i][0], i))).log_softmax(-1)
            torch.testing.assert_close(res.topk_ids_all[i], lp.topk(3).indices)
    torch.testing.assert_close(res.topk_ids_all[-1], plain.topk_ids_all[-1])  # output: identity


def test_refuses_train_mode_and_bad_input(tiny_checkpoint):
    from speech_lens import load_model

    path, kw = tiny_checkpoint("speechgpt")
    model = load_model(path, **kw)
    toks = _tokens(model)
    with pytest.raises(ValueError, match="batch"):
        logit_lens(model, toks.repeat(2, 1))
    with pytest.raises(ValueError, match="k=0"):
        logit_lens(model, toks, k=0)
    with pytest.raises(ValueError, match="positions"):
        logit_lens(model, toks, positions=[len(toks)])
    with pytest.raises(ValueError, match="targets"):
        logit_lens(model, toks, targets=toks[:-1])
    model.bridge.train()
    with pytest.raises(Exception, match="train mode"):
        logit_lens(model, toks)


# ------------------------------------------------------------------------------------------------
# word pooling
# ------------------------------------------------------------------------------------------------


def _hand_prompt(model, words: list[str], runs: list[int]) -> EncodedPrompt:
    """A speech-only prompt built by hand: BOS, [Speech], then each word's units."""
    lay = model.layout
    toks, kind, widx, uidx, spans = [], [], [], [], []
    if "bos" in lay.control_ids:
        toks.append(lay.control_ids["bos"])
        kind.append(BOS)
        widx.append(-1)
        uidx.append(-1)
    toks.append(lay.marker_ids.get("speech", next(iter(lay.marker_ids.values()))))
    kind.append(MARKER)
    widx.append(-1)
    uidx.append(-1)
    u = 0
    for j, (w, n) in enumerate(zip(words, runs, strict=True)):
        start = len(toks)
        for _ in range(n):
            toks.append(lay.unit_id((17 * u + 3) % lay.units.count))
            kind.append(SPEECH)
            widx.append(j)
            uidx.append(u)
            u += 1
        spans.append(WordSpan(j, w, SPEECH, start, len(toks)))
    return EncodedPrompt(
        tokens=torch.tensor(toks),
        kind=tuple(kind),
        word_index=torch.tensor(widx),
        unit_index=torch.tensor(uidx),
        words=tuple(words),
        spans=tuple(spans),
        utterance_id="hand",
        family=model.spec.name,
    )


def _targets_of(model, words: list[str]) -> list[WordTarget]:
    tok = model.tokenizer
    return [
        WordTarget(
            w,
            tuple(tok.encode(" " + w, add_special_tokens=False)),
            tuple(tok.encode(w, add_special_tokens=False)),
        )
        for w in words
    ]


@pytest.mark.parametrize("family", ["spiritlm", "sims-qwen"])
def test_word_pooling_matches_max_over_unit_positions(family, tiny_model):
    """Pooled top-k and candidate ranks equal a direct max over the word's lens logits."""
    from speech_lens.lens import word_lens

    model = tiny_model(family)
    words = ["the", "cat", "sat", "on", "mat"]
    prompt = _hand_prompt(model, words, runs=[3, 1, 6, 2, 4])
    targets = _targets_of(model, words)
    res = word_lens(model, prompt, targets, k=5, chunk_size=4)  # words straddle chunk ends
    assert res.words is not None
    ref = _reference(model, prompt.tokens).float()
    # back from log-probs to logits is not possible; recompute raw logits for pooling
    hf = model.hf_model
    norm = model.bridge.ln_final.original_component
    head = model.bridge.unembed.original_component
    with torch.no_grad():
        hs = hf(prompt.tokens.unsqueeze(0), output_hidden_states=True).hidden_states
        raw = [head(norm(hs[i][0])) for i in range(model.n_layers)]
        raw.append(hf(prompt.tokens.unsqueeze(0)).logits[0])
    assert ref.shape[0] == len(raw)
    text = model.layout.text_mask
    for row, logits in enumerate(raw):
        for j, span in enumerate(prompt.spans):
            pooled = logits[span.start : span.end].amax(0).masked_fill(~text, float("-inf"))
            torch.testing.assert_close(res.words.topk_ids[row, j], pooled.topk(5).indices)
            for tid in {*targets[j].spaced, *targets[j].bare}:
                # other text ids with a pooled logit >= the candidate's (ties against it)
                expect = int((pooled >= pooled[tid]).sum()) - int(text[tid])
                assert int(res.words.rank_of(j, [tid])[row]) == expect
