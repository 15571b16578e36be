"""Several models on one axis: a per-layer quantity against relative depth (layer / n_layers).

Models with different layer counts share the x axis [0, 1] (row 0 = embeddings, 1 = output).
Each model is one line with its shaded bootstrap band (``lo``/``hi`` of the metrics' curves); a
Recall@k quantity also carries each model's baselines in its colour (``BASELINES_OF``: the
mismatched-word baseline and the frequency prior), where its run computed them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import plotly.graph_objects as go

from speech_lens.lens.metrics import Curve, DatasetMetrics
from speech_lens.report.lens import PALETTE, band, baseline_bands

Getter = Callable[[DatasetMetrics, int], Curve]
QUANTITIES: dict[str, tuple[str, Getter]] = {
    "recall_current": ("current-word Recall@k", lambda m, k: m.recall_current[k]),
    "recall_next": ("next-word Recall@k", lambda m, k: m.recall_next[k]),
    "recall_first_unit": (
        "current-word Recall@k at the word's first unit",
        lambda m, k: m.recall_first_unit[k],
    ),
    "recall_last_unit": (
        "current-word Recall@k at the word's last unit",
        lambda m, k: m.recall_last_unit[k],
    ),
    "unit_mass": ("probability mass on speech units", lambda m, k: m.mass["unit"]),
    "text_mass": ("probability mass on text ids", lambda m, k: m.mass["text"]),
    "unit_top1": ("share of unit positions whose top-1 is a unit", lambda m, k: m.unit_top1),
}


def depth_figure(
    runs: Sequence[tuple[str, DatasetMetrics, int]], quantity: str = "recall_current"
) -> go.Figure:
    """One line + band per ``(label, metrics, k)`` against relative depth; ``k`` is each run's
    Recall@k (it may differ between runs when the comparison allowed it)."""
    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}; one of {sorted(QUANTITIES)}")
    title, get = QUANTITIES[quantity]
    recall = quantity.startswith("recall")
    ks = {k for _, _, k in runs}
    fig = go.Figure()
    for i, (label, m, k) in enumerate(runs):
        name = f"{label} (@{k})" if recall and len(ks) > 1 else label
        color = PALETTE[i % len(PALETTE)]
        if recall and k not in getattr(m, quantity):
            continue  # first / last-unit recall of a run written before it
        band(fig, m.relative_depth, get(m, k), name, color)
        if recall:
            baseline_bands(fig, m.relative_depth, m, quantity, k, name, color)
    if recall:
        title = title.replace("@k", f"@{ks.pop()}" if len(ks) == 1 else "@k")
    ci = {int(m.ci * 100) for _, m, _ in runs}
    fig.update_layout(
        title=f"{title} by relative depth"
        + (f" ({ci.pop()}% bootstrap bands)" if len(ci) == 1 else " (bootstrap bands)"),
        xaxis_title="relative depth (layer / n_layers; 0 = embeddings, 1 = output)",
        xaxis_range=[0, 1],
        yaxis_title=title,
        yaxis_range=[0, 1],
        template="plotly_white",
        legend={"orientation": "h", "y": -0.2},
        margin={"l": 60, "r": 20, "t": 60, "b": 60},
    )
    return fig
