"""Plotly figures for activation patching results (each function returns a ``go.Figure``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
import torch

from speech_lens.patching.result import PatchResult


def _title(r: PatchResult, what: str) -> str:
    return (
        f"{what}: {r.component}, rule={r.rule}, {r.source_id} → {r.target_id}<br>"
        f"<sup>metric {r.metric}; unpatched target {r.baseline:.3g}"
        + (f"; source {r.source_value:.3g}" if r.source_value is not None else "")
        + "</sup>"
    )


def plot_layer_position(
    result: PatchResult, *, effect: bool = True, title: str | None = None
) -> go.Figure:
    """Heatmap layer x position (map group / patched position). ``effect`` subtracts the
    unpatched target metric, so 0 is "no change"."""
    if result.axes[:2] != ("layer", "position") or len(result.axes) != 2:
        raise ValueError(f"needs a layer x position result, got axes {result.axes}")
    z = (result.effect() if effect else result.values).float()
    lim = float(z.abs().max()) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(),
            x=list(result.positions),
            y=list(result.layer_labels),
            colorscale="RdBu",
            zmid=0.0 if effect else None,
            zmin=-lim if effect else None,
            zmax=lim if effect else None,
            colorbar={"title": "Δ metric" if effect else "metric"},
            hovertemplate="layer %{y}<br>position %{x}<br>%{z:.4g}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or _title(result, "patching layer × position"),
        xaxis_title="patched position (target)",
        yaxis_title=f"layer ({result.component})",
    )
    return fig


def plot_layer_head(
    result: PatchResult,
    *,
    position: int | str | None = None,
    effect: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Heatmap layer x head. For a layer x position x head sweep, pick ``position`` (index or
    label)."""
    z = result.effect() if effect else result.values
    if result.axes == ("layer", "position", "head"):
        if position is None:
            raise ValueError("a layer x position x head result needs position= (index or label)")
        pi = result.positions.index(position) if isinstance(position, str) else int(position)
        z = z[:, pi]
        where = f" at position {result.positions[pi]}"
    elif result.axes == ("layer", "head"):
        where = ""
    else:
        raise ValueError(f"needs a head sweep (heads='each'), got axes {result.axes}")
    lim = float(z.abs().max()) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z.float().tolist(),
            x=[f"H{h}" for h in (result.heads or ())],
            y=list(result.layer_labels),
            colorscale="RdBu",
            zmid=0.0 if effect else None,
            zmin=-lim if effect else None,
            zmax=lim if effect else None,
            colorbar={"title": "Δ metric" if effect else "metric"},
        )
    )
    fig.update_layout(
        title=title or _title(result, f"patching layer × head{where}"),
        xaxis_title="head",
        yaxis_title="layer",
    )
    return fig


def plot_layer_curves(
    curves: Mapping[str, Sequence[float] | torch.Tensor],
    *,
    layers: Sequence[str],
    references: Mapping[str, float] | None = None,
    title: str = "patching effect per layer",
    yaxis: str = "metric",
) -> go.Figure:
    """One line per curve over layers; ``references`` are drawn as dashed horizontal lines
    (e.g. the unpatched target and the source run)."""
    fig = go.Figure()
    for name, ys in curves.items():
        vals = ys.tolist() if isinstance(ys, torch.Tensor) else list(ys)
        fig.add_trace(go.Scatter(x=list(layers), y=vals, mode="lines+markers", name=name))
    for name, y in (references or {}).items():
        fig.add_hline(y=y, line_dash="dash", annotation_text=name, annotation_position="top left")
    fig.update_layout(title=title, xaxis_title="patched layer", yaxis_title=yaxis)
    return fig


def plot_result_curve(result: PatchResult, *, title: str | None = None) -> go.Figure:
    """Per-layer curve of a layer-only sweep (``positions="all"``) with its reference lines."""
    if result.axes != ("layer",):
        raise ValueError(f"needs a layer-only result (positions='all'), got axes {result.axes}")
    refs = {"unpatched target": result.baseline}
    if result.source_value is not None:
        refs["source run"] = result.source_value
    return plot_layer_curves(
        {result.metric: result.values},
        layers=result.layer_labels,
        references=refs,
        title=title or _title(result, "patching per layer"),
        yaxis=result.metric,
    )


__all__ = ["plot_layer_curves", "plot_layer_head", "plot_layer_position", "plot_result_curve"]
