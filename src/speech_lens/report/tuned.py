"""Tuned-lens figures."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from jaxtyping import Float
from torch import Tensor


def kl_figure(
    logit_kl: Float[Tensor, " row"],
    tuned_kl: Float[Tensor, " row"],
    title: str = "",
    layers: Sequence[int] | None = None,
) -> go.Figure:
    """Per-layer KL(final ‖ lens), logit lens vs tuned lens.

    Rows are lens rows: 0 = embeddings (``resid_pre`` of block 0) ... ``n_layers`` = output;
    ``layers``: the true row of each value when ``lens_kl`` read a selection (default 0, 1, ...).
    """
    rows = list(range(len(logit_kl))) if layers is None else [int(i) for i in layers]
    if len(rows) != len(logit_kl):
        raise ValueError(f"{len(logit_kl)} KL values for {len(rows)} layers {rows}")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=rows, y=logit_kl.tolist(), mode="lines+markers", name="logit lens"))
    fig.add_trace(go.Scatter(x=rows, y=tuned_kl.tolist(), mode="lines+markers", name="tuned lens"))
    fig.update_layout(
        title=title or "KL(final distribution ‖ lens) per layer",
        xaxis_title="layer (resid_pre; last = output)",
        yaxis_title="KL, nats/token",
        template="plotly_white",
    )
    return fig
