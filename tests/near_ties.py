"""Near-tie-aware comparison of ids and ranks from computations whose float summation order
differs (padded batch vs one-by-one, a position subset vs all positions, thread counts).

fp32 results of two such computations agree to ~1e-7, so an id whose value lies within TOL of
another id's may legitimately swap places. Each check takes the window from an independent
reference and demands exact equality wherever no other id lies within TOL; ties are counted and
must stay a small minority, so the exact part of a check cannot pass vacuously.
"""

from __future__ import annotations

import torch

TOL = 2e-6  # fp32 near-tie window: batched rows differ from one-by-one by <= 8e-7 (measured)


class Ties:
    """Counts checked entries and near-ties (entries checked only within the window)."""

    def __init__(self) -> None:
        self.n = 0
        self.ties = 0

    def add(self, clear: torch.Tensor) -> None:
        self.n += int(clear.numel())
        self.ties += int((~clear).sum())

    def check(self, what: str, max_share: float = 0.2) -> None:
        print(f"{what}: {self.ties} near-ties of {self.n} checked entries")
        assert self.n > 0 and self.ties <= max_share * self.n, (what, self.ties, self.n)


def rank_window(values: torch.Tensor, v: torch.Tensor, self_in: torch.Tensor | bool = True):
    """Rank bounds of value ``v`` among ``values`` [..., vocab] (ids within TOL may go either way)."""
    lo = (values > v.unsqueeze(-1) + TOL).sum(-1)
    hi = (values > v.unsqueeze(-1) - TOL).sum(-1) - torch.as_tensor(self_in).long()
    return lo, hi


def check_ranks(ref_vals, ids, got_single, got_batch, ties: Ties, self_in=True) -> None:
    """Ranks (count of strictly higher values) of ``ids`` against the reference values."""
    valid = ids >= 0
    v = ref_vals.gather(-1, ids.clamp(min=0).unsqueeze(-1))[..., 0]
    lo, hi = rank_window(ref_vals, v, self_in)
    for got in (got_single, got_batch):
        assert bool(((got >= lo) & (got <= hi) | ~valid).all())
    clear = (lo == hi) & valid
    assert torch.equal(got_batch[clear], got_single[clear])
    assert torch.equal(got_batch[clear], lo[clear])
    ties.add(clear[valid])


def check_topk(ref_vals, ids_single, ids_batch, ties: Ties) -> None:
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
