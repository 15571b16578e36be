"""Across-run statistics of report/grid.py against scipy and brute force, and their figures."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
from scipy import stats

from speech_lens.report import grid

RNG = np.random.default_rng(0)


def write_words(path: Path, ranks: np.ndarray, layers: list[int]) -> None:
    """0-based ranks [word, layer, 2] (current, next; next -1 = none) as a words.csv."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["utterance", "word_index", "word", "next_word", "layer", "match",
                    "rank_current", "rank_next", "top_tokens"])  # fmt: skip
        for i, per_layer in enumerate(ranks):
            for layer, (cur, nxt) in zip(layers, per_layer, strict=True):
                w.writerow([f"u{i // 4}", i % 4, "w", "", layer, "first", int(cur), int(nxt), ""])


def test_word_hits_are_ranks_within_k_at_the_candidate_rows(tmp_path: Path) -> None:
    ranks = RNG.integers(0, 12, size=(40, 5, 2))
    ranks[::7, :, 1] = -1  # last words: no next word
    write_words(tmp_path / "words.csv", ranks, [0, 1, 2, 3, 4])
    hits = grid.read_word_hits(tmp_path / "words.csv", k=5)
    assert hits.rows == (1, 2, 3)
    np.testing.assert_array_equal(hits.current, ranks[:, 1:4, 0] < 5)  # rank 0 = top-1
    with_next = [i for i in range(40) if i % 7]
    assert hits.next.shape == (len(with_next), 3)
    np.testing.assert_array_equal(hits.next, ranks[with_next, 1:4, 1] < 5)
    assert grid.peak(hits.current) == max((ranks[:, r, 0] < 5).mean() for r in (1, 2, 3))


def cells(rates: list[float], n: int = 400) -> list[np.ndarray]:
    return [RNG.random((n, 3)) < np.array([r / 2, r, r / 3]) for r in rates]


def test_dose_response_matches_scipy_and_its_ci_excludes_zero_for_a_clear_dose() -> None:
    doses = [0.0, 0.0, 0.1, 0.2, 0.35, 0.5]
    hits = cells([0.6, 0.58, 0.45, 0.3, 0.2, 0.1])
    got = grid.dose_response(doses, hits, n_boot=300)
    expect = stats.spearmanr(doses, [grid.peak(h) for h in hits]).statistic
    assert got.estimate == pytest.approx(expect, abs=1e-12)
    assert got.hi < 0 and got.lo <= got.estimate <= got.hi and got.n_boot == 300
    mirrored = grid.dose_response([-d for d in doses], hits, n_boot=300)  # same seed, same draws
    assert (mirrored.estimate, mirrored.lo, mirrored.hi) == pytest.approx(
        (-got.estimate, -got.hi, -got.lo)
    )


def test_knowledge_correlation_matches_scipy() -> None:
    hits = cells([0.1, 0.2, 0.3, 0.4, 0.5])
    knowledge = [(RNG.random(320) < a).astype(int).tolist() for a in (0.5, 0.55, 0.6, 0.7, 0.8)]
    got = grid.knowledge_correlation(knowledge, hits, n_boot=200)
    acc = [np.mean(k) for k in knowledge]
    assert got.estimate == pytest.approx(stats.pearsonr(acc, [grid.peak(h) for h in hits])[0])
    assert got.lo <= got.estimate <= got.hi


def layer_rows(peak_at: int, value: float) -> list[dict[str, float]]:
    rows = []
    for i in range(5):
        r = {"layer": float(i), "relative_depth": i / 4, "text_mass": 0.5, "unit_mass": 0.4,
             "other_mass": 0.1}  # fmt: skip
        for key in ("current", "next", "current_prior", "next_prior", "mismatched"):
            v = value if (i == peak_at and key in ("current", "next")) else 0.05
            r.update({f"recall@5_{key}": v, f"recall@5_{key}_lo": v - 0.01,
                      f"recall@5_{key}_hi": v + 0.02})  # fmt: skip
        rows.append(r)
    return rows


def test_figures_put_each_run_at_its_peak_row() -> None:
    runs = [(0.0, "p0", layer_rows(2, 0.4)), (0.5, "p0.5", layer_rows(3, 0.2))]
    fig = grid.dose_figure(runs)
    assert isinstance(fig, go.Figure) and len(fig.data) == 5
    cur = fig.data[0]
    assert list(cur.y) == [0.4, 0.2] and list(cur.error_y.arrayminus) == pytest.approx([0.01] * 2)
    assert list(cur.text) == ["p0, row 2", "p0.5, row 3"]
    mass = grid.mass_figure([("a", layer_rows(2, 0.4))])
    assert len(mass.data) == 3 and list(mass.data[1].y) == [0.4] * 5
    corr = grid.Correlation(0.5, 0.1, 0.8, 2, 100)
    kf = grid.knowledge_figure([("a", [1, 0, 1, 1], layer_rows(2, 0.4))], corr)
    assert kf.data[0].x[0] == 0.4 and kf.data[0].y[0] == 0.75 and "0.50" in kf.layout.title.text


def test_word_hits_reproduce_the_lens_runs_own_recall_curves() -> None:
    """Parity on a shipped lens run: hits re-read from words.csv.gz average to layers.csv."""
    lens = (
        Path(__file__).resolve().parents[1] / "organisms" / "u0" / "u0_random_interleaved" / "lens"
    )
    hits = grid.read_word_hits(lens / "words.csv.gz", k=5)
    with (lens / "layers.csv").open() as f:
        rows = {int(r["layer"]): r for r in csv.DictReader(f)}
    for key, h in (("current", hits.current), ("next", hits.next)):
        expect = np.array([float(rows[r][f"recall@5_{key}"]) for r in hits.rows])
        np.testing.assert_allclose(h.mean(0), expect, rtol=0, atol=1e-12)
