"""Plotly figures of the lens: per-layer curves with CI bands, the layer x position heatmap.

Every function returns a ``plotly.graph_objects.Figure`` and never shows it; put figures in a
:class:`~speech_lens.report.Report` or call ``fig.show()`` / ``fig.write_html()`` yourself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from speech_lens.data.encoded import EncodedPrompt
from speech_lens.lens.metrics import Curve, DatasetMetrics
from speech_lens.lens.registry import LENS_METRICS, MASS_METRICS
from speech_lens.lens.results import LensResult

PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
)


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def band(
    fig: go.Figure, x: Sequence[float], c: Curve, name: str, color: str, dash: str = "solid"
) -> None:
    """A mean line with a shaded confidence band (upper edge, then lower edge filled to it)."""
    fig.add_trace(
        go.Scatter(
            x=list(x),
            y=c.hi,
            mode="lines",
            line={"width": 0},
            hoverinfo="skip",
            showlegend=False,
            legendgroup=name,
        )
    )
    fig.add_trace(
        go.Scatter(
            x=list(x),
            y=c.lo,
            mode="lines",
            line={"width": 0},
            fill="tonexty",
            fillcolor=_rgba(color, 0.18),
            hoverinfo="skip",
            showlegend=False,
            legendgroup=name,
        )
    )
    fig.add_trace(
        go.Scatter(
            x=list(x),
            y=c.mean,
            mode="lines+markers",
            name=name,
            legendgroup=name,
            line={"color": color, "dash": dash},
            marker={"size": 5},
        )
    )


def _x(m: DatasetMetrics, relative_depth: bool) -> list[float]:
    return m.relative_depth if relative_depth else [float(i) for i in m.layers]


def _layout(fig: go.Figure, title: str, ytitle: str, relative_depth: bool, yrange: Any) -> None:
    fig.update_layout(
        title=title,
        xaxis_title="relative depth (layer / n_layers)"
        if relative_depth
        else "layer (0 = embeddings)",
        yaxis_title=ytitle,
        yaxis_range=yrange,
        xaxis={"dtick": None if relative_depth else 1},
        template="plotly_white",
        legend={"orientation": "h", "y": -0.2},
        margin={"l": 60, "r": 20, "t": 60, "b": 60},
    )


def _as_list(metrics: DatasetMetrics | Sequence[DatasetMetrics]) -> list[DatasetMetrics]:
    return [metrics] if isinstance(metrics, DatasetMetrics) else list(metrics)


# every Recall@k curve's baselines, drawn in its colour: (DatasetMetrics field, name, line dash)
PRIOR = ("frequency prior", "longdashdot")
BASELINES_OF: dict[str, tuple[tuple[str, str, str], ...]] = {
    "recall_current": (
        ("recall_mismatched", "mismatched-word baseline", "dashdot"),
        ("recall_prior_current", *PRIOR),
    ),
    "recall_next": (("recall_prior_next", *PRIOR),),
    "recall_first_unit": (("recall_prior_current", *PRIOR),),
    "recall_last_unit": (("recall_prior_current", *PRIOR),),
}
# current-word Recall@k read at one unit position of the word: the onset confound (issue 17)
WORD_EDGES = (
    ("recall_first_unit", "first unit only", "dot"),
    ("recall_last_unit", "last unit only", "longdash"),
)


def baseline_bands(
    fig: go.Figure,
    x: Sequence[float],
    m: DatasetMetrics,
    metric: str,
    k: int,
    name: str,
    color: str,
    extra: Sequence[tuple[str, str, str]] = (),
) -> None:
    """The baselines of ``metric``'s Recall@k curve (``BASELINES_OF``) and ``extra`` curves,
    those ``m`` holds at ``k`` (older metrics lack them), as bands named after the curve."""
    for key, what, dash in (*BASELINES_OF.get(metric, ()), *extra):
        curves = getattr(m, key)
        if k in curves:
            band(fig, x, curves[k], f"{name} ({what})", color, dash)


def recall_figure(
    metrics: DatasetMetrics | Sequence[DatasetMetrics],
    *,
    ks: Sequence[int] | None = None,
    which: Sequence[str] = ("current", "next"),
    relative_depth: bool = False,
    baselines: bool = True,
) -> go.Figure:
    """Recall@k per layer for the current word (implicit transcription) and the next word.

    With ``baselines``, each curve's baselines where computed, in its colour: for the current
    word the mismatched-word baseline (dash-dot), Recall@k read at the word's first unit alone
    (dotted) and at its last unit alone (long dashes); for both words the frequency prior (a
    flat long-dash-dot line: a fixed top-k of the data set's most frequent words)."""
    ms = _as_list(metrics)
    fig = go.Figure()
    i = 0
    for m in ms:
        x = _x(m, relative_depth)
        for k in ks or m.ks:
            for w in which:
                curves = m.recall_current if w == "current" else m.recall_next
                if k not in curves:
                    raise KeyError(f"{m.label or 'metrics'}: recall@{k} was not computed ({m.ks})")
                name = f"{m.label + ': ' if len(ms) > 1 else ''}{w} word R@{k}"
                color = PALETTE[i % len(PALETTE)]
                band(fig, x, curves[k], name, color, "solid" if w == "current" else "dash")
                if baselines:
                    edges = WORD_EDGES if w == "current" else ()
                    baseline_bands(fig, x, m, f"recall_{w}", k, name, color, edges)
                i += 1
    m0 = ms[0]
    _layout(
        fig,
        f"Word Recall@k per layer (match rule: {m0.match}; {int(m0.ci * 100)}% bootstrap CI)",
        "Recall@k",
        relative_depth,
        [0, 1],
    )
    return fig


def modality_figure(
    metrics: DatasetMetrics | Sequence[DatasetMetrics],
    *,
    groups: Sequence[str] = ("unit", "text", "marker", "other"),
    unit_top1: bool = True,
    relative_depth: bool = False,
) -> go.Figure:
    """Probability mass on speech units, text, markers and control ids at unit positions."""
    ms = _as_list(metrics)
    fig = go.Figure()
    i = 0
    for m in ms:
        prefix = f"{m.label}: " if len(ms) > 1 else ""
        for g in groups:
            band(
                fig,
                _x(m, relative_depth),
                m.mass[g],
                f"{prefix}{g} mass",
                PALETTE[i % len(PALETTE)],
            )
            i += 1
        if unit_top1:
            band(
                fig,
                _x(m, relative_depth),
                m.unit_top1,
                f"{prefix}top-1 is a unit",
                PALETTE[i % len(PALETTE)],
                "dot",
            )
            i += 1
    _layout(
        fig,
        "Modality preference at speech positions",
        "probability / share",
        relative_depth,
        [0, 1],
    )
    return fig


METRICS: dict[str, tuple[str, Callable[[DatasetMetrics, int], Curve]]] = {
    "recall_current": ("current-word Recall@{k}", lambda m, k: m.recall_current[k]),
    "recall_next": ("next-word Recall@{k}", lambda m, k: m.recall_next[k]),
    "recall_first_unit": (
        "current-word Recall@{k} at the first unit",
        lambda m, k: m.recall_first_unit[k],
    ),
    "recall_last_unit": (
        "current-word Recall@{k} at the last unit",
        lambda m, k: m.recall_last_unit[k],
    ),
    "unit_mass": ("unit mass", lambda m, k: m.mass["unit"]),
    "text_mass": ("text mass", lambda m, k: m.mass["text"]),
    "unit_top1": ("top-1 is a unit", lambda m, k: m.unit_top1),
}


def metric_getter(metric: str) -> tuple[str, Callable[[DatasetMetrics, int], Curve]]:
    """A curve by name: the recall / mass entries above, or a registered lens metric."""
    if metric in METRICS:
        return METRICS[metric]
    if metric in MASS_METRICS:  # built in: stored in DatasetMetrics.mass
        group = MASS_METRICS[metric]
        return LENS_METRICS[metric].label, lambda m, k: m.mass[group]
    if metric in LENS_METRICS:
        return LENS_METRICS[metric].label, lambda m, k: m.curves[metric]
    raise ValueError(f"unknown metric {metric!r}; one of {sorted({*METRICS, *LENS_METRICS})}")


def compare_figure(
    runs: Mapping[str, DatasetMetrics],
    *,
    metric: str = "recall_current",
    k: int | None = None,
    relative_depth: bool = True,
    baselines: bool = True,
) -> go.Figure:
    """One metric of several models / ablations on one axis (relative depth by default); a
    Recall@k metric with each run's baselines where computed (``BASELINES_OF``)."""
    label, get = metric_getter(metric)
    fig = go.Figure()
    for i, (name, m) in enumerate(runs.items()):
        kk = k if k is not None else m.ks[-1]
        x, color = _x(m, relative_depth), PALETTE[i % len(PALETTE)]
        band(fig, x, get(m, kk), name, color)
        if baselines:
            baseline_bands(fig, x, m, metric, kk, name, color)
    kk = k if k is not None else (next(iter(runs.values())).ks[-1] if runs else 0)
    _layout(fig, label.format(k=kk) + " across runs", label.format(k=kk), relative_depth, [0, 1])
    return fig


def _short(tok: str) -> str:
    return tok.replace("▁", "␣").replace("Ġ", "␣")[:10]


def heatmap_cells(
    result: LensResult, tokenizer: Any, rows: list[int], sel: list[int]
) -> tuple[list[list[str]], list[list[str]]]:
    """Per cell: the top text token (written in it) and the hover text (top-k text and overall)."""
    text, hover = [], []
    for r in rows:
        trow, hrow = [], []
        for i in sel:
            ids = result.topk_ids[r, i].tolist()
            toks = tokenizer.convert_ids_to_tokens(ids)
            all_toks = tokenizer.convert_ids_to_tokens(result.topk_ids_all[r, i].tolist())
            trow.append(_short(toks[0]))
            lp = result.topk_logprobs[r, i].tolist()
            hrow.append(
                "text: "
                + ", ".join(f"{t} ({v:.2f})" for t, v in zip(toks[:5], lp[:5], strict=False))
                + "<br>all: "
                + ", ".join(all_toks[:5])
                + f"<br>unit mass {float(result.unit_mass[r, i]):.3f}"
            )
        text.append(trow)
        hover.append(hrow)
    return text, hover


def position_labels(
    result: LensResult, tokenizer: Any, pos: list[int], prompt: EncodedPrompt | None
) -> list[str]:
    """x labels: position and input token, plus the word where a spoken or written word starts."""
    in_toks = tokenizer.convert_ids_to_tokens(result.tokens[pos].tolist())
    xlabels = []
    for p, t in zip(pos, in_toks, strict=True):
        label = f"{p}:{_short(t)}"
        if prompt is not None:
            w = int(prompt.word_index[p])
            if w >= 0 and (p == 0 or int(prompt.word_index[p - 1]) != w):
                label += f"<br><b>{prompt.words[w]}</b>"
        xlabels.append(label)
    return xlabels


def lens_heatmap(
    result: LensResult,
    tokenizer: Any,
    *,
    prompt: EncodedPrompt | None = None,
    color: str = "unit_mass",
    max_positions: int = 80,
    start: int = 0,
) -> go.Figure:
    """Layer x position grid for one utterance, the top text token written in each cell.

    ``color``: ``"unit_mass"`` (probability on speech units, the modality view) or
    ``"text_logprob"`` (log-prob of the written top text token). Hovering a cell shows the
    top-k text tokens and the overall top-k. ``max_positions`` from ``start`` keep cells legible.
    """
    if color not in ("unit_mass", "text_logprob"):
        raise ValueError(f"color={color!r}: 'unit_mass' or 'text_logprob'")
    n = int(result.positions.shape[0])
    sel = list(range(start, min(n, start + max_positions)))
    pos = [int(result.positions[i]) for i in sel]
    rows = list(range(result.n_rows))
    z = (result.unit_mass if color == "unit_mass" else result.topk_logprobs[..., 0])[:, sel]
    text, hover = heatmap_cells(result, tokenizer, rows, sel)
    xlabels = position_labels(result, tokenizer, pos, prompt)
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(),
            x=list(range(len(pos))),
            y=result.layer_labels,  # true lens rows: a layer selection shows only those read
            text=text,
            texttemplate="%{text}",
            textfont={"size": 9},
            customdata=hover,
            hovertemplate="layer %{y}, pos %{x}<br>%{customdata}<extra></extra>",
            colorscale="RdBu_r" if color == "unit_mass" else "Viridis",
            zmin=0 if color == "unit_mass" else None,
            zmax=1 if color == "unit_mass" else None,
            colorbar={"title": "unit mass" if color == "unit_mass" else "log p"},
        )
    )
    fig.update_layout(
        title="Logit lens: top text token per layer and position"
        + (f" ({prompt.utterance_id})" if prompt is not None else ""),
        xaxis={
            "tickmode": "array",
            "tickvals": list(range(len(pos))),
            "ticktext": xlabels,
            "tickangle": -60,
            "tickfont": {"size": 8},
        },
        yaxis={"title": "layer (0 = embeddings)", "type": "category"},
        template="plotly_white",
        height=max(360, 26 * result.n_rows + 200),
        width=max(700, 34 * len(pos) + 160),
        margin={"l": 70, "r": 20, "t": 60, "b": 120},
    )
    return fig
