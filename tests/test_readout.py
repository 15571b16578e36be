"""The lens readout runs in float32 whatever the model's dtype, and ties count against the target.

A bf16 model's lens (streaming, batched, word-pooled, tuned) must equal a float32 readout of the
same residuals written here by hand (RMSNorm and lm_head on upcast weights), not the bf16
readout rounded to bf16's grid; and a constructed tie must rank the target below the id it ties.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speech_lens import Utterance, Word, load_model
from speech_lens.data.encoded import SPEECH
from speech_lens.data.prompts import encode_prompt
from speech_lens.data.word_targets import word_targets
from speech_lens.lens.logit import logit_lens, logit_lens_batch, word_lens_batch
from speech_lens.lens.numerics import READOUT_DTYPE, TIE_RULE, rank_against
from speech_lens.lens.readout import LensBuffer, Readout
from speech_lens.lens.tuned import TunedLens
from speech_lens.vocab import UnitBlock, VocabLayout

CLOSE = dict(rtol=1e-5, atol=2e-5)  # fp32 vs fp32 in another summation order
TOL = 2e-5  # ids within this of each other may swap places


@pytest.fixture(scope="module")
def bf16(tiny_checkpoint):
    path, kw = tiny_checkpoint("spiritlm")
    model = load_model(path, dtype=torch.bfloat16, **kw)
    assert model.describe()["dtype"] == "bfloat16"
    return model


def _tokens(model, n: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.layout.vocab_size, (n,), generator=g)


def _residuals(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """resid_pre of every block and the final norm's input (HF, no TL hooks): [rows][pos, d]."""
    hf = model.hf_model
    caught: list[torch.Tensor] = []
    handle = hf.model.norm.register_forward_pre_hook(lambda m, a: caught.append(a[0][0].clone()))
    try:
        with torch.no_grad():
            hs = hf(tokens.unsqueeze(0), output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    return [hs[i][0] for i in range(model.n_layers)] + caught


@torch.no_grad()
def _fp32_logits(model, h: torch.Tensor) -> torch.Tensor:
    """RMSNorm and lm_head by hand, in float32 on the upcast weights."""
    norm, head = model.hf_model.model.norm, model.hf_model.lm_head
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return F.linear(x * norm.weight.float(), head.weight.float())


def _bf16_logits(model, h: torch.Tensor) -> torch.Tensor:
    """The model-dtype readout the lens used before: bf16 norm and lm_head, upcast after."""
    with torch.no_grad():
        return model.hf_model.lm_head(model.hf_model.model.norm(h)).float()


def _check_ranks(ref_lp: torch.Tensor, targets: torch.Tensor, got: torch.Tensor) -> None:
    """Pessimistic ranks: exact where no other id is within TOL of the target, else in the window."""
    v = ref_lp.gather(-1, targets.unsqueeze(-1))
    lo = (ref_lp > v + TOL).sum(-1)
    hi = (ref_lp >= v - TOL).sum(-1) - 1
    assert bool(((got >= lo) & (got <= hi)).all())
    clear = lo == hi
    assert clear.float().mean() > 0.5
    assert torch.equal(got[clear], lo[clear])


def test_bf16_lens_equals_a_float32_readout_of_its_residuals(bf16):
    model = bf16
    toks = _tokens(model)
    resid = _residuals(model, toks)
    ref = torch.stack([_fp32_logits(model, h) for h in resid]).log_softmax(-1)  # [rows, pos, V]
    old = torch.stack([_bf16_logits(model, h) for h in resid]).log_softmax(-1)
    # the bf16 readout is far off the float32 one: this test tells them apart
    assert float((old - ref).abs().max()) > 100 * CLOSE["atol"]
    nxt = torch.roll(toks, -1)
    single = logit_lens(model, toks, k=5, targets=nxt)
    # batched with a shorter sequence, left padding: the same readout
    batched = logit_lens_batch(
        model, [toks[:17], toks], k=5, targets=[None, nxt], padding_side="left"
    )
    for res in (single, batched[1]):
        top = ref.topk(5, dim=-1).values
        torch.testing.assert_close(res.topk_logprobs_all, top, **CLOSE)
        torch.testing.assert_close(ref.gather(-1, res.topk_ids_all), top, **CLOSE)
        assert res.target_logprobs is not None and res.target_ranks is not None
        want = ref.gather(-1, nxt.expand(len(ref), -1).unsqueeze(-1))
        torch.testing.assert_close(res.target_logprobs, want, **CLOSE)
        _check_ranks(ref, nxt.expand(len(ref), -1), res.target_ranks[..., 0])
        unit = ref.exp()[..., model.layout.unit_mask].sum(-1)
        torch.testing.assert_close(res.unit_mass, unit, **CLOSE)


def test_bf16_tuned_lens_and_word_pooling_read_out_in_float32(bf16):
    model = bf16
    lens = TunedLens.from_model(model)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    toks = _tokens(model, 30, seed=1)
    resid = _residuals(model, toks)
    with torch.no_grad():
        tuned = [
            _fp32_logits(model, lens.translator(i)(h.float()) + h.float() if i < len(lens) else h)
            for i, h in enumerate(resid)
        ]
    # TunedLens.forward: float32 readout of the float32 translated residual
    for i in (0, model.n_layers - 1):
        with torch.no_grad():
            torch.testing.assert_close(lens(resid[i], i), tuned[i], **CLOSE)
    ref = torch.stack(tuned).log_softmax(-1)
    res = logit_lens(model, toks, k=5, lens=lens)
    torch.testing.assert_close(res.topk_logprobs_all, ref.topk(5, dim=-1).values, **CLOSE)
    # word pooling (batched): pooled logits are maxima of the float32 readout
    words = (Word("the", 0.0, 0.2), Word("cat", 0.2, 0.4), Word("sat", 0.4, 0.6))
    utt = Utterance("w", words, tuple(range(3, 18)), None, 25.0)
    other = Utterance("o", words[:2], tuple(range(30, 40)), None, 25.0)
    prompts = [encode_prompt(model, u, mode="speech") for u in (other, utt)]
    out = word_lens_batch(model, prompts, [word_targets(model, u) for u in (other, utt)], k=5)
    w = out[1].words
    assert w is not None
    logits = torch.stack([_fp32_logits(model, h) for h in _residuals(model, prompts[1].tokens)])
    for j, span in enumerate(prompts[1].speech_spans()):
        units = [p for p in span.positions if prompts[1].kind[p] == SPEECH]
        pooled = logits[:, units].amax(1)  # [rows, V]
        sel = w.cand_word == j
        want = pooled[:, w.cand_ids[sel]]
        torch.testing.assert_close(w.cand_logits[:, sel], want, **CLOSE)


# A vocabulary of 8 ids: 0-4 text, 5-6 units, 7 a marker.
LAYOUT = VocabLayout(
    vocab_size=8,
    n_tokenizer=8,
    units=UnitBlock("units", "[Hu{k}]", 5, 2, 25.0, True),
    marker_ids={"speech": 7},
)


def test_ties_count_against_the_target():
    assert (READOUT_DTYPE, TIE_RULE) == ("float32", "pessimistic")
    # ids 1 and 2 tie on top; ids 3, 4, 6, 7 tie at 0
    logits = torch.tensor([[2.0, 3.0, 3.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    readout = Readout.for_layout(LAYOUT, torch.nn.Identity(), torch.nn.Identity(), n_layers=0)
    targets = torch.tensor([[1, 2, 0, 3]])
    buf = LensBuffer(
        n_rows=1,
        positions=torch.arange(1),
        k=2,
        targets=targets,
        word_positions=[torch.arange(1)],
        cand_ids=torch.tensor([1, 2, 5]),  # 5: a unit id, ranked among the text ids
        cand_word=torch.tensor([0, 0, 0]),
    )
    buf.consume(0, lambda ix: logits[ix], readout)
    assert buf.target_ranks is not None
    # a tie on top: neither id of the pair is top-1; id 3 ties with four others at the bottom
    assert buf.target_ranks[0, 0].tolist() == [1, 1, 2, 7]
    # pooled among text ids 0-4 [2, 3, 3, 0, 0]: id 1 ties with id 2; the unit id 5 (logit 1)
    # has three text ids above it and is not one of them
    assert buf.cand_ranks[0].tolist() == [1, 1, 3]
    # the rule itself, with and without the target among the values
    vals = torch.tensor([[1.0, 1.0, 0.5], [1.0, 1.0, 0.5]])
    got = rank_against(vals, torch.tensor([1.0, 1.0]), torch.tensor([True, False]))
    assert got.tolist() == [1, 2]


def test_bf16_readout_of_a_disk_offloaded_model_equals_the_plain_load(
    bf16, tiny_checkpoint, tmp_path
):
    """The float32 readout reads offloaded weights (meta placeholders) through their hooks."""
    path, kw = tiny_checkpoint("spiritlm")
    off = load_model(
        path, dtype=torch.bfloat16, device_map={"": "disk"}, offload_folder=tmp_path / "o", **kw
    )
    head = off.hf_model.lm_head.weight
    assert head.is_meta and head.dtype == torch.bfloat16
    toks = _tokens(bf16, 30, seed=2)
    a = logit_lens(bf16, toks, k=5, targets="next")
    b = logit_lens(off, toks, k=5, targets="next")
    assert torch.equal(a.topk_ids_all, b.topk_ids_all) and torch.equal(
        a.target_ranks, b.target_ranks
    )
    torch.testing.assert_close(b.topk_logprobs_all, a.topk_logprobs_all, atol=1e-6, rtol=0)
