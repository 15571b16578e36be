"""Tuned-lens figures."""

from __future__ import annotations

import plotly.graph_objects as go
from jaxtyping import Float
from torch import Tensor


def kl_figure(
    logit_kl: Float[Tensor, " row"], tuned_kl: Float[Tensor, " row"], title: str = ""
) -> go.Figure:
    """Per-layer KL(final ‖ lens), logit lens vs tuned lens.

    Rows are lens rows: 0 = embeddings (``resid_pre`` of block 0) ... ``n_layers`` = output.
    """
    rows = list(range(len(logit_kl)))
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
