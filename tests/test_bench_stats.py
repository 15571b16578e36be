"""benchmarks/bench_lens.py statistics: within-round ratios, spreads, FLOP floor flags (no model)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))  # bench_lens imports bench_meta from its own directory
    try:
        spec = importlib.util.spec_from_file_location("bench_lens", BENCH / "bench_lens.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def _calls(rounds: list[tuple[float, float, float]]) -> list[dict]:
    out = []
    for r, (f, ln, nv) in enumerate(rounds):
        for route, s, mb in (("forward", f, 100.0), ("lens", ln, 130.0 + r), ("naive", nv, 900.0)):
            out.append({"round": r, "route": route, "seconds": s, "extra_mb": mb})
    return out


def test_flop_floor_of_the_llama_shape(bench):
    dims = bench.SHAPES["llama2-7b"]["dims"]
    h, f, v = 4096, 11008, 32512
    per_position_layer = 2 * (4 * h * h + 3 * h * f)  # 32 kv heads: k, v as wide as q
    fwd = 4 * per_position_layer + 2 * h * v
    assert bench.flop_floor(dims, 4, v, seq=0) == pytest.approx(1 + 4 * 2 * h * v / fwd)
    # attention over longer prompts makes the forward costlier, so the floor drops
    assert bench.flop_floor(dims, 4, v, seq=1024) < bench.flop_floor(dims, 4, v, seq=256)
    assert 1.5 < bench.flop_floor(dims, 4, v, seq=1024) < 1.6


def test_ratios_are_taken_within_a_round(bench):
    # a loaded round slows all three routes; its ratios stay those of the quiet rounds
    rounds = [(10.0, 20.0, 25.0), (10.0, 20.0, 25.0), (40.0, 80.0, 100.0)]
    out = bench.summarise(_calls(rounds), floor=1.5)
    lens = out["ratios"]["lens/forward"]
    assert lens["values"] == [2.0, 2.0, 2.0] and lens["median"] == 2.0
    assert out["ratios"]["lens/naive"]["median"] == pytest.approx(0.8)
    assert out["routes"]["forward"]["seconds"]["median"] == 10.0
    assert out["routes"]["forward"]["seconds"]["max"] == 40.0
    assert out["extra_over_forward_mb"]["lens"]["values"] == [30.0, 31.0, 32.0]
    assert out["extra_over_forward_mb"]["naive"]["median"] == 800.0
    assert out["measurement_error"] == []


def test_ratios_below_the_floor_are_flagged(bench):
    # round 0: forward slowed by a burst of load, lens/forward 0.9x: impossible, not a result
    rounds = [(30.0, 27.0, 40.0), (10.0, 14.0, 25.0), (12.0, 13.0, 26.0)]
    out = bench.summarise(_calls(rounds), floor=1.5)
    lens, naive = out["ratios"]["lens/forward"], out["ratios"]["naive/forward"]
    assert lens["rounds_below_floor"] == 3 and lens["median_below_floor"]
    assert naive["rounds_below_floor"] == 1 and not naive["median_below_floor"]
    assert out["measurement_error"] == ["lens/forward"]
    assert "flop_floor" not in out["ratios"]["lens/naive"]
