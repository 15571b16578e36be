"""Batched lens == one-by-one lens on every family: mixed lengths, both padding sides, tuned
lens, layer subsets, user hooks; the data-set runner gives the same records at any batch size.

fp32 rows of a padded batch equal their one-by-one run up to float summation order (~1e-7), so
an id whose value lies within TOL of another id's may legitimately swap places. Every check
computes the window from an independent one-by-one reference (HF-style readout of captured
residuals) and demands exact equality wherever no other id lies within TOL; ties are counted,
printed, and must stay a small minority, so the exact part of the check cannot pass vacuously.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from speech_lens import Utterance, Word
from speech_lens._tl import final_norm_and_unembed, resid_pre_name
from speech_lens.data.encoded import SPEECH
from speech_lens.data.prompts import encode_prompt
from speech_lens.data.word_targets import word_targets
from speech_lens.lens.logit import logit_lens, logit_lens_batch, word_lens, word_lens_batch
from speech_lens.lens.records import utterance_record
from speech_lens.lens.tuned import TunedLens
from speech_lens.runs.lens import PARTIAL, run_dataset
from speech_lens.runs.lens_settings import LensRunConfig

TOL = 2e-6  # fp32 near-tie window: batched rows differ from one-by-one by <= 8e-7 (measured)
CLOSE = dict(rtol=1e-5, atol=1e-5)
LENGTHS = (23, 9, 16, 5)
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]


class Ties:
    """Counts checked entries and near-ties (entries checked only within the window)."""

    def __init__(self) -> None:
        self.n = 0
        self.ties = 0

    def add(self, clear: torch.Tensor) -> None:
        self.n += int(clear.numel())
        self.ties += int((~clear).sum())

    def check(self, what: str) -> None:
        print(f"{what}: {self.ties} near-ties of {self.n} checked entries")
        assert self.n > 0 and self.ties <= 0.2 * self.n, (what, self.ties, self.n)


# ------------------------------------------------------------------------------------------------
# the independent one-by-one reference
# ------------------------------------------------------------------------------------------------


def _reference(model, seq, lens=None, hooks=()) -> torch.Tensor:
    """Raw lens logits [rows, pos, vocab] of one unpadded sequence: resid_pre of every block
    captured after the user's hooks, through the lens, final norm and unembedding; the last row
    is the model's logits."""
    caps: dict[int, torch.Tensor] = {}

    def capture(i):
        def fn(act, *, hook):
            caps[i] = act[0].detach().clone()

        return fn

    names = [(resid_pre_name(i), capture(i)) for i in range(model.n_layers)]
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(seq[None], fwd_hooks=[*hooks, *names])[0]
        norm, unembed = final_norm_and_unembed(model.bridge)
        rows = []
        for i in range(model.n_layers):
            h = caps[i] if lens is None else lens.transform_hidden(caps[i], i)
            rows.append(unembed(norm(h)))
        rows.append(logits)
    return torch.stack(rows).float()


def _rank_window(values: torch.Tensor, v: torch.Tensor, self_in: torch.Tensor | bool = True):
    """Rank bounds of value ``v`` among ``values`` [..., vocab] (ids within TOL may go either way)."""
    lo = (values > v.unsqueeze(-1) + TOL).sum(-1)
    hi = (values > v.unsqueeze(-1) - TOL).sum(-1) - torch.as_tensor(self_in).long()
    return lo, hi


def _check_ranks(ref_vals, ids, got_single, got_batch, ties: Ties, self_in=True) -> None:
    """Ranks (count of strictly higher values) of ``ids`` against the reference values."""
    valid = ids >= 0
    v = ref_vals.gather(-1, ids.clamp(min=0).unsqueeze(-1))[..., 0]
    lo, hi = _rank_window(ref_vals, v, self_in)
    for got in (got_single, got_batch):
        assert bool(((got >= lo) & (got <= hi) | ~valid).all())
    clear = (lo == hi) & valid
    assert torch.equal(got_batch[clear], got_single[clear])
    assert torch.equal(got_batch[clear], lo[clear])
    ties.add(clear[valid])


def _check_topk(ref_vals, ids_single, ids_batch, ties: Ties) -> None:
    """Top-k ids: the reference values of the batched ids are the reference top-k values, and
    the ids are equal wherever both neighbouring gaps in the reference exceed TOL."""
    k = ids_single.shape[-1]
    top = ref_vals.topk(k + 1, dim=-1).values
    for ids in (ids_single, ids_batch):
        torch.testing.assert_close(ref_vals.gather(-1, ids), top[..., :k], rtol=0, atol=2 * TOL)
    gaps = top[..., :-1] - top[..., 1:]  # gap below each slot
    above = torch.cat([torch.full_like(gaps[..., :1], float("inf")), gaps[..., :-1]], -1)
    clear = (gaps > TOL) & (above > TOL)
    assert torch.equal(ids_batch[clear], ids_single[clear])
    ties.add(clear)


def _seqs(model, lengths=LENGTHS, seed=3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.layout.vocab_size, (n,), generator=g) for n in lengths]


def _utterances(model, n: int, seed: int = 5, prefix: str = "u") -> list[Utterance]:
    """Utterances of 2..5 words (mixed prompt lengths) at the family's frame rate."""
    rate = model.layout.units.frame_rate
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(n):
        n_words = 2 + (j * 3) % 4
        picks = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
        words = tuple(Word(WORDS[p], k * 0.2, (k + 1) * 0.2) for k, p in enumerate(picks))
        n_frames = round(0.2 * n_words * rate)
        units = torch.randint(0, 100, (n_frames,), generator=g).tolist()
        out.append(Utterance(f"{prefix}{j}", words, tuple(units), None, rate))
    return out


def _random_tuned(model) -> TunedLens:
    lens = TunedLens.from_model(model)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return lens


# ------------------------------------------------------------------------------------------------
# logit lens
# ------------------------------------------------------------------------------------------------


def _compare_logit(model, seqs, single, batcheds, lens=None, hooks=()) -> Ties:
    """``batcheds``: batched runs (e.g. both padding sides) each checked against ``single``."""
    ties = Ties()
    for b, s in enumerate(seqs):
        lp = _reference(model, s, lens, hooks).log_softmax(-1)  # one reference for every run
        for batched in batcheds:
            _compare_logit_one(model, s, lp, single[b], batched[b], ties)
    return ties


def _compare_logit_one(model, s, lp, one, bat, ties: Ties) -> None:
    assert bat.positions.tolist() == one.positions.tolist() == list(range(len(s)))
    _check_topk(lp, one.topk_ids_all, bat.topk_ids_all, ties)
    text = lp.masked_fill(~model.layout.text_mask, float("-inf"))
    _check_topk(text, one.topk_ids, bat.topk_ids, ties)
    assert one.target_ranks is not None and bat.target_ranks is not None
    _check_ranks(lp, one.target_ids[:, 0].expand(len(lp), -1), one.target_ranks[..., 0],
                 bat.target_ranks[..., 0], ties)  # fmt: skip
    for name in ("topk_logprobs_all", "topk_logprobs", "mass", "target_logprobs"):
        x, y = getattr(one, name), getattr(bat, name)
        torch.testing.assert_close(y, x, **CLOSE, equal_nan=True)
        torch.testing.assert_close(x, y, **CLOSE, equal_nan=True)


def test_logit_lens_batch_equals_single(family, tiny_model):
    model = tiny_model(family)
    seqs = _seqs(model)
    single = [logit_lens(model, s, k=5, targets="next") for s in seqs]
    runs = [
        logit_lens_batch(model, seqs, k=5, targets="next", padding_side=side)
        for side in ("right", "left")
    ]
    _compare_logit(model, seqs, single, runs).check(f"{family} logit lens, both paddings")


def test_tuned_lens_layers_and_user_hook_batched(tiny_model):
    """A tuned lens with non-zero translators, a layer subset, and a user's ablation hook."""
    model = tiny_model("sims-qwen")
    lens = _random_tuned(model)
    seqs = _seqs(model, seed=4)

    # zero-ablate block 0's MLP output in every row of the batch: changes rows >= 1
    def ablate(act, *, hook):
        return torch.zeros_like(act)

    hooks = [("blocks.0.hook_mlp_out", ablate)]
    kw = dict(k=5, targets="next", lens=lens, fwd_hooks=hooks)
    single = [logit_lens(model, s, **kw) for s in seqs]
    batched = logit_lens_batch(model, seqs, padding_side="left", **kw)
    _compare_logit(model, seqs, single, [batched], lens, hooks).check("tuned + ablation, left")
    plain = logit_lens(model, seqs[0], k=5, lens=lens)
    assert not torch.equal(plain.topk_logprobs_all[1:], single[0].topk_logprobs_all[1:])
    assert torch.equal(plain.topk_ids_all[0], single[0].topk_ids_all[0])  # before the ablation

    # a layer subset: the same rows as the full run (same padded batch, same hooks)
    full = logit_lens_batch(model, seqs, padding_side="right", **kw)
    for layers in ([1], [0, -1]):
        sub = logit_lens_batch(model, seqs, padding_side="right", layers=layers, **kw)
        rows = [i % (model.n_layers + 1) for i in layers]
        for f, s in zip(full, sub, strict=True):
            assert s.layers == tuple(rows) and s.n_rows == len(rows)
            assert s.layer_labels == [f.layer_labels[i] for i in rows]
            assert torch.equal(s.topk_ids_all, f.topk_ids_all[rows])
            assert torch.equal(s.target_ranks, f.target_ranks[rows])
            torch.testing.assert_close(s.mass, f.mass[rows], rtol=0, atol=0)
    with pytest.raises(ValueError, match="layers"):
        logit_lens_batch(model, seqs, layers=[model.n_layers + 1])


def test_layer_subset_stops_the_forward_early(tiny_model):
    model = tiny_model("spiritlm")
    seqs = _seqs(model, (12, 7))
    fired: list[int] = []

    def spy(i):
        def fn(act, *, hook):
            fired.append(i)

        return fn

    spies = [(resid_pre_name(i), spy(i)) for i in range(model.n_layers)]
    res = logit_lens_batch(model, seqs, k=3, layers=[0], fwd_hooks=spies)
    assert fired == [0]  # block 0's resid_pre is the last activation needed
    fired.clear()
    logit_lens_batch(model, seqs, k=3, layers=[0], fwd_hooks=spies, stop_early=False)
    assert fired == list(range(model.n_layers))
    full = logit_lens_batch(model, seqs, k=3)
    for r, f in zip(res, full, strict=True):
        assert torch.equal(r.topk_ids_all[0], f.topk_ids_all[0])


# ------------------------------------------------------------------------------------------------
# word lens
# ------------------------------------------------------------------------------------------------


def _pooled_reference(model, prompt, lens=None) -> list[torch.Tensor]:
    """Per spoken word: the max over its unit positions of the reference lens logits [rows, V]."""
    ref = _reference(model, prompt.tokens, lens)
    out = []
    for s in prompt.speech_spans():
        units = [p for p in s.positions if prompt.kind[p] == SPEECH]
        out.append(ref[:, units].amax(1))
    return out


def test_word_lens_batch_equals_single(family, tiny_model):
    model = tiny_model(family)
    lens = _random_tuned(model) if family == "spiritlm" else None
    utts = _utterances(model, 3)
    prompts = [encode_prompt(model, u, mode="speech") for u in utts]
    assert len({len(p) for p in prompts}) == len(prompts)  # mixed lengths
    targets = [word_targets(model, u) for u in utts]
    single = [word_lens(model, p, t, k=5, lens=lens) for p, t in zip(prompts, targets, strict=True)]
    runs = [
        word_lens_batch(model, prompts, targets, k=5, lens=lens, padding_side=side)
        for side in ("right", "left")
    ]
    text_mask = model.layout.text_mask
    ties = Ties()
    for b, p in enumerate(prompts):
        pooled = torch.stack(_pooled_reference(model, p, lens), 1)  # [rows, word, V]
        for batched in runs:
            _compare_word(p, single[b], batched[b], pooled, text_mask, ties)
    ties.check(f"{family} word lens, both paddings{' (tuned)' if lens else ''}")


def _compare_word(p, one, bat, pooled, text_mask, ties: Ties) -> None:
    wo, wb = one.words, bat.words
    assert wo is not None and wb is not None and len(wb) == len(wo) == len(p.speech_spans())
    assert torch.equal(wb.cand_ids, wo.cand_ids) and torch.equal(wb.cand_word, wo.cand_word)
    text = pooled.masked_fill(~text_mask, float("-inf"))
    _check_topk(text, wo.topk_ids, wb.topk_ids, ties)
    # candidate ranks among text ids, per row
    vals = text[:, wo.cand_word]  # [rows, cand, V]
    ids = wo.cand_ids.expand(vals.shape[0], -1)
    _check_ranks(vals, ids, wo.cand_ranks, wb.cand_ranks, ties, text_mask[ids])
    for x, y in ((wo.topk_logits, wb.topk_logits), (wo.cand_logits, wb.cand_logits),
                 (one.mass, bat.mass), (one.topk_logprobs, bat.topk_logprobs)):  # fmt: skip
        torch.testing.assert_close(y, x, **CLOSE)
        torch.testing.assert_close(x, y, **CLOSE)


@pytest.mark.parametrize("mode", ["speech", "interleaved"])
def test_speech_positions_give_the_same_records(tiny_model, mode):
    """positions="speech" unembeds only unit positions; the records are the same."""
    model = tiny_model("sims-llama")
    utts = _utterances(model, 3, seed=8)
    for i, u in enumerate(utts):
        p = encode_prompt(model, u, mode=mode, seed=i) if mode == "interleaved" else (
            encode_prompt(model, u, mode="speech"))  # fmt: skip
        t = word_targets(model, u)
        full = word_lens(model, p, t, k=5)
        part = word_lens(model, p, t, k=5, positions="speech")
        assert part.positions.tolist() == p.positions_of(SPEECH).tolist()
        if mode == "interleaved":
            assert len(part.positions) < len(full.positions)
        a = utterance_record(full, p, model.layout).to_json()
        b = utterance_record(part, p, model.layout).to_json()
        assert a == b
    sub = word_lens(model, p, t, k=5, layers=[1])
    with pytest.raises(ValueError, match="every layer"):
        utterance_record(sub, p, model.layout)


# ------------------------------------------------------------------------------------------------
# the data-set runner
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model64(tiny_checkpoint):
    """fp64 weights: batched rows agree with one-by-one to ~1e-16, below the fp32 resolution of
    the reductions, so whole records can be compared for equality."""
    from speech_lens import load_model

    path, kw = tiny_checkpoint("spiritlm")
    return path, load_model(path, dtype=torch.float64, **kw)


def _records(path: Path) -> dict[str, dict]:
    lines = path.read_text().splitlines()
    return {json.loads(ln)["utterance_id"]: json.loads(ln) for ln in lines[1:]}


def test_run_dataset_batch_sizes_write_the_same_records(model64, tmp_path):
    path, model = model64
    utts = _utterances(model, 5, seed=9)
    cfg = LensRunConfig(checkpoint=str(path), data="mem", family="spiritlm", k=5, n_boot=10)
    runs = {}
    for bs in (1, 3, "auto"):
        out = tmp_path / f"bs{bs}"
        run_dataset(model, utts, out, cfg, progress=False, batch_size=bs, memory_budget_gb=1.0)
        runs[bs] = _records(out / PARTIAL)
        assert (out / "metrics.json").exists()
    assert set(runs[1]) == {u.id for u in utts}
    prompts = [encode_prompt(model, u, mode="speech") for u in utts[:2]]
    with pytest.raises(ValueError, match="float64"):  # HF eager attention NaNs there
        word_lens_batch(model, prompts, padding_side="left")
    assert runs[3] == runs[1] and runs["auto"] == runs[1]

    # a crash in the middle of a batch: the finished records stay, the rest is recomputed
    out = tmp_path / "crash"
    seen: list[str] = []

    def crash(rec):
        seen.append(rec.utterance_id)
        if len(seen) == 4:  # the first record of the second batch of 3 (5 = 3 + 2)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_dataset(model, utts, out, cfg, progress=False, batch_size=3, on_record=crash)
    assert len(_records(out / PARTIAL)) == 4
    again: list[str] = []
    run_dataset(model, utts, out, cfg, progress=False, batch_size=3, on_record=lambda r: again.append(r.utterance_id))  # fmt: skip
    assert sorted(again) == sorted(set(runs[1]) - set(seen))
    assert _records(out / PARTIAL) == runs[1]


def test_cli_batch_size_flags(tiny_checkpoint, tmp_path, capsys):
    from speech_lens import load_model, write_manifest
    from speech_lens.cli.main import main

    path, kw = tiny_checkpoint("spiritlm")
    model = load_model(path, **kw)
    data = tmp_path / "data.jsonl"
    write_manifest(data, _utterances(model, 3, seed=2))
    base = ["lens", str(path), str(data), "--no-progress", "--n-boot", "10", "--k", "3"]
    out = tmp_path / "out"
    args = [*base, "--out", str(out), "--batch-size", "auto", "--memory-budget", "1"]
    assert main([*args, "--padding-side", "left"]) == 0
    assert len(_records(out / PARTIAL)) == 3
    assert main([*base, "--out", str(tmp_path / "x"), "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
