"""Padding and batch planning: a padded batch gives every row its own one-by-one logits."""

import pytest
import torch

from speech_lens.batching import auto_batch_size, pad_batch, plan_batches


def test_pad_batch_both_sides():
    seqs = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([1, 2])]
    r = pad_batch(seqs, side="right", pad_id=0)
    assert r.tokens.tolist() == [[5, 6, 7], [8, 0, 0], [1, 2, 0]]
    assert r.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert r.position_ids.tolist() == [[0, 1, 2], [0, 0, 0], [0, 1, 1]]
    assert r.offsets == (0, 0, 0)
    left = pad_batch(seqs, side="left", pad_id=9)
    assert left.tokens.tolist() == [[5, 6, 7], [9, 9, 8], [9, 1, 2]]
    assert left.position_ids.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    assert left.offsets == (0, 2, 1)
    for b, s in enumerate(seqs):
        assert torch.equal(left.tokens[b, left.columns(b)], s)
        assert torch.equal(r.tokens[b, r.columns(b)], s)


@pytest.mark.parametrize(
    "seqs, side, match",
    [
        ([], "right", "no sequences"),
        ([torch.tensor([1])], "top", "padding side"),
        ([torch.tensor([1]), torch.tensor([], dtype=torch.long)], "right", "sequence 1"),
    ],
)
def test_pad_batch_refuses(seqs, side, match):
    with pytest.raises(ValueError, match=match):
        pad_batch(seqs, side=side)


@pytest.mark.float_order
def test_padded_forward_equals_single_runs(tiny_model, family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, model.layout.vocab_size, (n,), generator=g) for n in (23, 9, 16)]
    with torch.no_grad():
        single = [model.bridge(s[None].to(model.device))[0] for s in seqs]
        for side in ("right", "left"):
            batch = pad_batch(seqs, side=side)
            logits = model.bridge(batch.tokens, **batch.forward_kwargs(model.device))
            for b in range(len(seqs)):
                got = logits[b, batch.columns(b)]
                # not bit-equal: matmuls of another shape sum in another order (measured
                # <= 8e-7 at 2 threads); fp32 only, reduced precisions are not checked here
                torch.testing.assert_close(got, single[b], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(single[b], got, rtol=1e-5, atol=1e-5)


def test_auto_batch_size_follows_budget(tiny_model):
    model = tiny_model("spiritlm")
    small = auto_batch_size(model, 512, memory_budget_gb=0.2, max_batch=10_000)
    big = auto_batch_size(model, 512, memory_budget_gb=1.0, max_batch=10_000)
    assert 1 <= small < big
    assert auto_batch_size(model, 64, memory_budget_gb=0.2, max_batch=10_000) > small
    assert auto_batch_size(model, 64, memory_budget_gb=1.0, max_batch=4) == 4
    with pytest.raises(ValueError, match="raise the budget"):
        auto_batch_size(model, 4096, memory_budget_gb=0.1)


def test_plan_batches_cover_every_index_once(tiny_model):
    model = tiny_model("spiritlm")
    lengths = [5, 40, 12, 40, 7, 33, 2]
    for size in (1, 3, "auto"):
        plan = plan_batches(model, lengths, size, memory_budget_gb=0.2)
        flat = sorted(i for b in plan for i in b)
        assert flat == list(range(len(lengths)))
        if size == 3:
            assert [len(b) for b in plan] == [3, 3, 1]
            assert sorted(plan[0]) == [1, 3, 5]  # the longest go together
    with pytest.raises(ValueError, match="positive integer"):
        plan_batches(model, lengths, 0)


def test_padded_inputs_mask_only_mixed_lengths_and_refuse_fp64_left(tiny_model, tiny_checkpoint):
    from speech_lens import load_model
    from speech_lens.batching import padded_inputs

    model = tiny_model("spiritlm")
    same = [torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])]
    mixed = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    assert padded_inputs(model, same, "left")[2] == {}  # equal lengths: the plain forward
    batch, tokens, kwargs = padded_inputs(model, mixed, "left")
    assert torch.equal(tokens, batch.tokens) and set(kwargs) == {"attention_mask", "position_ids"}
    path, kw = tiny_checkpoint("spiritlm")
    fp64 = load_model(path, dtype=torch.float64, **kw)
    with pytest.raises(ValueError, match="float64"):
        padded_inputs(fp64, mixed, "left")
    assert set(padded_inputs(fp64, mixed, "right")[2]) == {"attention_mask", "position_ids"}
