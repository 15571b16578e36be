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

from near_ties import TOL, Ties, check_ranks, check_topk, rank_window
from speech_lens import Utterance, Word
from speech_lens._tl import final_norm_and_unembed, resid_pre_name
from speech_lens.data.encoded import SPEECH
from speech_lens.data.prompts import encode_prompt
from speech_lens.data.word_targets import word_targets
from speech_lens.lens.logit import logit_lens, logit_lens_batch, word_lens, word_lens_batch
from speech_lens.lens.records import match_ids, utterance_record
from speech_lens.lens.tuned import TunedLens
from speech_lens.runs.lens import PARTIAL, run_dataset
from speech_lens.runs.lens_settings import LensRunConfig

pytestmark = pytest.mark.float_order  # every test here compares differently ordered float sums

CLOSE = dict(rtol=1e-5, atol=1e-5)
LENGTHS = (23, 9, 16, 5)
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]


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
    check_topk(lp, one.topk_ids_all, bat.topk_ids_all, ties)
    text = lp.masked_fill(~model.layout.text_mask, float("-inf"))
    check_topk(text, one.topk_ids, bat.topk_ids, ties)
    assert one.target_ranks is not None and bat.target_ranks is not None
    check_ranks(lp, one.target_ids[:, 0].expand(len(lp), -1), one.target_ranks[..., 0],
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


def _pooled_reference(model, prompt, lens=None, ref=None) -> list[torch.Tensor]:
    """Per spoken word: the max over its unit positions of the reference lens logits [rows, V]
    (``ref``: the reference of ``prompt`` when already computed)."""
    ref = _reference(model, prompt.tokens, lens) if ref is None else ref
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
    check_topk(text, wo.topk_ids, wb.topk_ids, ties)
    # candidate ranks among text ids, per row
    vals = text[:, wo.cand_word]  # [rows, cand, V]
    ids = wo.cand_ids.expand(vals.shape[0], -1)
    check_ranks(vals, ids, wo.cand_ranks, wb.cand_ranks, ties, text_mask[ids])
    for x, y in ((wo.topk_logits, wb.topk_logits), (wo.cand_logits, wb.cand_logits),
                 (one.mass, bat.mass), (one.topk_logprobs, bat.topk_logprobs)):  # fmt: skip
        torch.testing.assert_close(y, x, **CLOSE)
        torch.testing.assert_close(x, y, **CLOSE)


@pytest.mark.parametrize("mode", ["speech", "interleaved"])
def test_speech_positions_give_the_same_records(tiny_model, mode):
    """positions="speech" unembeds only unit positions; the records are the same (up to float
    summation order: the unembedding runs over fewer rows)."""
    model = tiny_model("sims-llama")
    utts = _utterances(model, 3, seed=8)
    ties = RecordTies()
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
        _check_records(model, p, t, a, [b], ties, SUM_CLOSE)
    ties.check(f"records, all positions vs unit positions ({mode})")
    # a layer subset: its record states the rows it holds (tests/test_layer_stride.py)
    sub = word_lens(model, p, t, k=5, layers=[1])
    assert utterance_record(sub, p, model.layout).layers == [1]
    assert a["layers"] == list(range(model.n_layers + 1))


# ------------------------------------------------------------------------------------------------
# records (partial.jsonl lines) from differently ordered float computations
# ------------------------------------------------------------------------------------------------

EXACT_FIELDS = (
    "utterance_id",
    "n_layers",
    "words",
    "word_index",
    "next_words",
    "words_without_units",  # zero-unit-word policy fields (fix-lens): ids and counts, exact
    "target_ids",  # each word's hit token ids per match rule (mismatched-word baseline): ids
    "next_target_ids",  # the same for the next word (its frequency prior): ids
    "n_utterance_words",
    "layers",  # the lens rows read (layer selection): ints, exact
)
RECORD_FIELDS = {
    *EXACT_FIELDS,
    "n_speech_positions",
    "ranks",
    "top_ids",
    "mass_sums",
    "unit_top1",
    "unit_ranks",  # current-word ranks at each word's first / last unit: _check_unit_ranks
}
# masses come from an fp32 softmax (the lens casts logits to fp32, also for an fp64 model) and
# are summed over unit positions in fp64: bs 1 vs auto differed by up to 2.8e-7 relative here
SUM_CLOSE = dict(rtol=1e-5, atol=1e-9)


class RecordTies:
    """Near-ties of top-k ids and counts, and of ranks: a word's rank lies deep in a vocabulary
    of up to 128k ids, where about a third have another id within TOL (measured: 80 of 237 on
    sims-llama), so ranks get their own count and bound."""

    def __init__(self) -> None:
        self.ids, self.ranks = Ties(), Ties()

    def check(self, what: str) -> None:
        self.ids.check(f"{what}, ids and counts")
        self.ranks.check(f"{what}, ranks", max_share=0.5)


def _check_records(model, prompt, targets, a: dict, others: list, ties: RecordTies, close) -> None:
    """Records of one prompt, ``a`` and each of ``others``: ids, ranks and counts equal outside
    near-ties of the independent reference (and inside its window everywhere), float sums
    within ``close``."""
    full = _reference(model, prompt.tokens)  # [rows, pos, vocab]
    for b in others:
        _check_record_pair(model, prompt, targets, full, a, b, ties, close)


def _check_record_pair(model, prompt, targets, full, a, b, ties: RecordTies, close) -> None:
    assert set(a) == set(b) == RECORD_FIELDS  # a new field must be compared here too
    assert all(a[f] == b[f] for f in EXACT_FIELDS), [f for f in EXACT_FIELDS if a[f] != b[f]]
    units = prompt.positions_of(SPEECH)
    assert a["n_speech_positions"] == b["n_speech_positions"] == len(units)
    ref = full[:, units]  # [rows, unit position, vocab]
    pooled = torch.stack(_pooled_reference(model, prompt, ref=full), 1)  # [rows, word, vocab]
    text_mask = model.layout.text_mask
    text = pooled.masked_fill(~text_mask, float("-inf"))
    check_topk(text, *(torch.tensor(r["top_ids"]).transpose(0, 1) for r in (a, b)), ties.ids)
    assert a["ranks"].keys() == b["ranks"].keys() and a["mass_sums"].keys() == b["mass_sums"].keys()
    for rule, by_which in a["ranks"].items():
        assert by_which.keys() == b["ranks"][rule].keys() == {"current", "next"}
        for which, per_word in by_which.items():
            for j, got_a in enumerate(per_word):
                n = a["word_index"][j] + (which == "next")  # index into the utterance's words
                t = targets[n] if n < len(targets) else None
                got = [torch.tensor(got_a), torch.tensor(b["ranks"][rule][which][j])]
                if t is None:  # the last word has no next word
                    assert got[0].eq(-1).all() and got[1].eq(-1).all()
                    continue
                windows = [  # the record's rank is the best rank over the rule's ids
                    rank_window(text[:, j], text[:, j, i], bool(text_mask[i]))
                    for i in match_ids(t, rule)
                ]
                lo = torch.stack([w[0] for w in windows]).amin(0)
                hi = torch.stack([w[1] for w in windows]).amin(0)
                _check_window(lo, hi, *got, ties.ranks)
    _check_unit_ranks(model, prompt, targets, full, a, b, ties)
    # unit_top1: how many unit positions have a unit as top-1 over the whole vocabulary
    unit_mask = model.layout.unit_mask
    near = ref >= ref.amax(-1, keepdim=True) - TOL
    either = (near & unit_mask).any(-1) & (near & ~unit_mask).any(-1)
    lo = (~either & unit_mask[ref.argmax(-1)]).sum(1)
    counts = [torch.tensor(r["unit_top1"]) for r in (a, b)]
    _check_window(lo, lo + either.sum(1), *counts, ties.ids)
    for g in a["mass_sums"]:
        x, y = torch.tensor(a["mass_sums"][g]), torch.tensor(b["mass_sums"][g])
        torch.testing.assert_close(y, x, **close)
        torch.testing.assert_close(x, y, **close)


def _check_unit_ranks(model, prompt, targets, full, a, b, ties: RecordTies) -> None:
    """``unit_ranks``: each word's current-word rank among text ids at its first / last unit
    position alone, from the reference log-probs (what the lens ranks there), ``k`` standing
    for "k or worse"."""
    logprobs = torch.log_softmax(full, dim=-1)
    text_mask = model.layout.text_mask
    k = len(a["top_ids"][0][0]) if a["top_ids"] else 0
    spans = [s for s in prompt.speech_spans() if any(prompt.kind[p] == SPEECH for p in s.positions)]
    assert a["unit_ranks"].keys() == b["unit_ranks"].keys() == set(a["ranks"])
    for rule, by_edge in a["unit_ranks"].items():
        assert by_edge.keys() == b["unit_ranks"][rule].keys() == {"first", "last"}
        for edge, per_word in by_edge.items():
            assert len(per_word) == len(spans) == len(a["words"])
            for j, s in enumerate(spans):
                units = [p for p in s.positions if prompt.kind[p] == SPEECH]
                text = logprobs[:, units[0] if edge == "first" else units[-1]]
                text = text.masked_fill(~text_mask, float("-inf"))  # [rows, V]
                windows = [
                    rank_window(text, text[:, i], bool(text_mask[i]))
                    for i in match_ids(targets[s.index], rule)
                ]
                lo = torch.stack([w[0] for w in windows]).amin(0).clamp(max=k)
                hi = torch.stack([w[1] for w in windows]).amin(0).clamp(max=k)
                got = [torch.tensor(r["unit_ranks"][rule][edge][j]) for r in (a, b)]
                _check_window(lo, hi, *got, ties.ranks)


def _check_window(lo, hi, got_a, got_b, ties: Ties) -> None:
    """Both values inside [lo, hi]; equal to each other and to lo wherever lo == hi."""
    for got in (got_a, got_b):
        assert bool(((got >= lo) & (got <= hi)).all()), (got, lo, hi)
    clear = lo == hi
    assert torch.equal(got_a[clear], lo[clear]) and torch.equal(got_b[clear], lo[clear])
    ties.add(clear)


# ------------------------------------------------------------------------------------------------
# the data-set runner
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model64(tiny_checkpoint):
    """fp64 weights: batched rows agree with one-by-one to ~1e-16, yet the fp32 masses can
    still round one ulp apart (seen on another machine), so records are compared with
    _check_records at fp32-rounding tolerance."""
    from speech_lens import load_model

    path, kw = tiny_checkpoint("spiritlm")
    return path, load_model(path, dtype=torch.float64, **kw)


def _records(path: Path) -> dict[str, dict]:
    lines = path.read_text().splitlines()
    return {json.loads(ln)["utterance_id"]: json.loads(ln) for ln in lines[1:]}


def _check_same_records(model, utts, ref: dict[str, dict], *others: dict[str, dict]) -> None:
    """Records per utterance id: the same ids, and each record the same as ``ref``'s up to float
    summation order (the padded batches differ)."""
    ties = RecordTies()
    for u in utts:
        p, t = encode_prompt(model, u, mode="speech"), word_targets(model, u)
        assert all(other.keys() == ref.keys() for other in others)
        _check_records(model, p, t, ref[u.id], [o[u.id] for o in others], ties, SUM_CLOSE)
    ties.check("records at other batch sizes")


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
    _check_same_records(model, utts, runs[1], runs[3], runs["auto"])

    # a crash in the middle of a batch (of the first and of the second: 5 = 3 + 2): the finished
    # records stay, the rest is recomputed in the uninterrupted run's batches
    for cut in (2, 4):
        out = tmp_path / f"crash{cut}"
        seen: list[str] = []

        def crash(rec, cut=cut, seen=seen):
            seen.append(rec.utterance_id)
            if len(seen) == cut:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run_dataset(model, utts, out, cfg, progress=False, batch_size=3, on_record=crash)
        assert len(_records(out / PARTIAL)) == cut
        again: list[str] = []
        run_dataset(model, utts, out, cfg, progress=False, batch_size=3, on_record=lambda r, a=again: a.append(r.utterance_id))  # fmt: skip
        assert sorted(again) == sorted(set(runs[1]) - set(seen))
        # the same batches (the cut one recomputed whole): the bs3 run's outputs, bit for bit
        assert _records(out / PARTIAL) == runs[3]
        for name in ("metrics.json", "layers.csv", "words.csv"):
            assert (out / name).read_bytes() == (tmp_path / "bs3" / name).read_bytes(), name


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
