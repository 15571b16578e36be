"""Across lens runs (a grid of models): peak recall per run, dose-response and correlation tests
with bootstrap CIs, and their figures (the pre-registered tests of organisms/README.md).

A run is read from its ``words.csv`` (per word and lens row: the rank of the current and the next
word) and ``layers.csv``; the candidate rows are those strictly between the embeddings (row 0) and
the output row, as in :mod:`speech_lens.report.criteria`.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Bool

from speech_lens.report.criteria import Row, peak_index
from speech_lens.report.lens import PALETTE


@dataclass(frozen=True)
class WordHits:
    """Hits (0-based rank < k, as Recall@k in layers.csv) at every candidate row of one run."""

    rows: tuple[int, ...]  # candidate lens rows
    current: Bool[np.ndarray, "word row"]
    next: Bool[np.ndarray, "word_with_next row"]  # only words that have a next word


def read_word_hits(path: str | Path, k: int = 5) -> WordHits:
    """Per-word hits from a run's ``words.csv`` (or ``words.csv.gz``): ranks are 0-based and
    ``rank_next`` is -1 for an utterance's last word (not scored, as in ``layers.csv``)."""
    ranks: dict[tuple[str, int], dict[int, tuple[int, int]]] = {}
    path = Path(path)
    with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as f:
        for r in csv.DictReader(f):
            word = (r["utterance"], int(r["word_index"]))
            ranks.setdefault(word, {})[int(r["layer"])] = (
                int(r["rank_current"]),
                int(r["rank_next"]),
            )
    if not ranks:
        raise ValueError(f"{path}: no words")
    layers = sorted(next(iter(ranks.values())))
    rows = tuple(layers[1:-1])
    a = np.array([[ranks[w][row] for row in rows] for w in ranks])  # [word, row, 2]
    cur, nxt = a[..., 0], a[..., 1]
    has_next = (nxt >= 0).all(1)
    return WordHits(rows, (cur >= 0) & (cur < k), (nxt[has_next] >= 0) & (nxt[has_next] < k))


def peak(hits: Bool[np.ndarray, "word row"]) -> float:
    """Highest mean hit rate over the candidate rows."""
    return float(hits.mean(0).max())


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = (np.argsort(np.argsort(v, kind="stable"), kind="stable") for v in (x, y))
    # average ranks for ties (several cells share a dose p)
    rx = np.array([rx[x == v].mean() for v in x])
    ry = np.array([ry[y == v].mean() for v in y])
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


@dataclass(frozen=True)
class Correlation:
    estimate: float
    lo: float
    hi: float
    n_cells: int
    n_boot: int


def _interval(est: float, boots: list[float], n_cells: int) -> Correlation:
    b = np.array([v for v in boots if np.isfinite(v)])
    lo, hi = np.quantile(b, [0.025, 0.975]) if len(b) else (np.nan, np.nan)
    return Correlation(est, float(lo), float(hi), n_cells, len(b))


def dose_response(
    doses: Sequence[float], hits: Sequence[Bool[np.ndarray, "word row"]], *,
    n_boot: int = 1000, seed: int = 0,
) -> Correlation:  # fmt: skip
    """Spearman correlation of dose vs each run's peak recall; CI: words resampled within each
    run, the peak re-taken per replicate (the peak row may move)."""
    x = np.asarray(doses, dtype=float)
    est = _spearman(x, np.array([peak(h) for h in hits]))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        ys = [peak(h[rng.integers(len(h), size=len(h))]) for h in hits]
        boots.append(_spearman(x, np.array(ys)))
    return _interval(est, boots, len(hits))


def knowledge_correlation(
    knowledge: Sequence[Sequence[int]], hits: Sequence[Bool[np.ndarray, "word row"]], *,
    n_boot: int = 1000, seed: int = 0,
) -> Correlation:  # fmt: skip
    """Pearson correlation across runs of spoken-knowledge accuracy (per-item 0/1) and the peak
    current-word recall; CI: items and words resampled within each run."""

    def pearson(a: list[float], b: list[float]) -> float:
        if np.std(a) == 0 or np.std(b) == 0:
            return float("nan")
        return float(np.corrcoef(a, b)[0, 1])

    acc = [float(np.mean(k)) for k in knowledge]
    est = pearson(acc, [peak(h) for h in hits])
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        a = [float(np.mean(np.asarray(k)[rng.integers(len(k), size=len(k))])) for k in knowledge]
        b = [peak(h[rng.integers(len(h), size=len(h))]) for h in hits]
        boots.append(pearson(a, b))
    return _interval(est, boots, len(hits))


def _err(rows: list[Row], key: str, at: int) -> tuple[float, float, float]:
    r = rows[at]
    return r[key], r[key] - r[f"{key}_lo"], r[f"{key}_hi"] - r[key]


def dose_figure(
    runs: Sequence[tuple[float, str, list[Row]]], k: int = 5, axis: str = "unit noise p"
) -> go.Figure:
    """Peak current- and next-word Recall@k per run vs dose (or another axis: ``axis``), with CIs
    (at the peak row) and the baselines at that row: frequency prior, mismatched word.
    ``runs``: (x, label, rows)."""
    fig = go.Figure()
    series = [
        ("current", "current word", PALETTE[0], "circle"),
        ("next", "next word", PALETTE[1], "diamond"),
        ("current_prior", "frequency prior (current)", "#7f7f7f", "line-ew"),
        ("next_prior", "frequency prior (next)", "#bcbd22", "line-ew"),
        ("mismatched", "mismatched word", "#17becf", "x"),
    ]
    for key, name, color, symbol in series:
        xs, ys, lo, hi, text = [], [], [], [], []
        for dose, label, rows in runs:
            src = "current" if key in ("current", "current_prior", "mismatched") else "next"
            at = peak_index(rows, src, k)
            y, dn, up = _err(rows, f"recall@{k}_{key}", at)
            xs.append(dose)
            ys.append(y)
            lo.append(dn)
            hi.append(up)
            text.append(f"{label}, row {int(rows[at]['layer'])}")
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name=name, text=text, marker={"color": color,
            "symbol": symbol, "size": 9}, error_y={"array": hi, "arrayminus": lo, "width": 3},
        ))  # fmt: skip
    fig.update_layout(
        title=f"Peak mid-layer Recall@{k} vs {axis} (95% CI; baselines at the peak row)",
        xaxis_title=axis, yaxis_title=f"Recall@{k}", template="plotly_white",
    )  # fmt: skip
    return fig


def mass_figure(
    runs: Sequence[tuple[str, list[Row]]], shown: Collection[str] | None = None
) -> go.Figure:
    """Text, unit and other-id mass at unit positions per lens row, one colour per run
    (relative depth on x): the three-phase profile. Runs not in ``shown`` start hidden (a click
    on the legend shows them)."""
    fig = go.Figure()
    dashes = {"text_mass": "solid", "unit_mass": "dash", "other_mass": "dot"}
    for i, (label, rows) in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        x = [r["relative_depth"] for r in rows]
        for key, dash in dashes.items():
            fig.add_trace(go.Scatter(
                x=x, y=[r[key] for r in rows], mode="lines+markers", legendgroup=label,
                name=f"{label}: {key.split('_')[0]}", line={"color": color, "dash": dash},
                marker={"size": 4}, visible=True if shown is None or label in shown else "legendonly",
            ))  # fmt: skip
    fig.update_layout(
        title="Modality mass at unit positions (solid text, dashed units, dotted other ids)",
        xaxis_title="relative depth", yaxis_title="mass", template="plotly_white",
    )  # fmt: skip
    return fig


def knowledge_figure(
    points: Sequence[tuple[str, Sequence[int], list[Row]]], corr: Correlation, k: int = 5
) -> go.Figure:
    """Spoken-knowledge accuracy (Wilson 95% CI) vs peak current-word Recall@k (layers.csv CI)
    per run, with the correlation in the title. ``points``: (label, per-item 0/1, rows)."""
    fig = go.Figure()
    for i, (label, items, rows) in enumerate(points):
        at = peak_index(rows, "current", k)
        x, xl, xh = _err(rows, f"recall@{k}_current", at)
        n, acc = len(items), float(np.mean(items))
        z = 1.96
        mid = (acc + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        fig.add_trace(go.Scatter(
            x=[x], y=[acc], name=label, mode="markers",
            marker={"size": 10, "color": PALETTE[i % len(PALETTE)]},
            error_x={"array": [xh], "arrayminus": [xl]},
            error_y={"array": [mid + half - acc], "arrayminus": [acc - (mid - half)]},
        ))  # fmt: skip
    fig.add_hline(y=0.5, line={"dash": "dot", "color": "rgba(127,127,127,0.8)"})  # chance
    fig.update_layout(
        title=f"Spoken knowledge vs transcription: Pearson r = {corr.estimate:.2f} "
        f"[{corr.lo:.2f}, {corr.hi:.2f}] over {corr.n_cells} models",
        xaxis_title=f"peak current-word Recall@{k}", yaxis_title="spoken-knowledge accuracy",
        template="plotly_white",
    )  # fmt: skip
    return fig
