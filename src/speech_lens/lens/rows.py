"""Which lens rows a run reads: every row, a stride, or an explicit list.

Lens rows are ``0..n_layers``: row 0 is the embeddings (``blocks.0.hook_resid_pre``), row ``i``
the residual entering block ``i``, row ``n_layers`` the model's own output. A selection keeps
each row's true index everywhere (records, ``layers.csv``, figures, relative depth
``index / n_layers``); rows not selected are never unembedded, which is where the time goes at a
large vocabulary (one ``[positions, vocab]`` matmul, softmax and top-k per row).

A run's selection always holds the output row: it is the model's own prediction, the curves'
right end (relative depth 1) and what ``compare`` lines runs up against. ``layer_stride`` also
always holds row 0: the stride's grid starts at the embeddings (``0, s, 2s, ...``), so a strided
curve starts where every full one does (relative depth 0), and row 0 is the lens's floor (what
the token embeddings alone decode to) for one row's cost.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence


def layer_stride(n_rows: int, stride: int) -> tuple[int, ...]:
    """Rows ``0, stride, 2 * stride, ...`` below ``n_rows``, plus the last row ``n_rows - 1``
    (the model's output) whether or not the stride lands on it. ``stride=1``: every row."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"--layer-stride {stride!r}: a positive integer (1 = every row)")
    if n_rows < 1:
        raise ValueError(f"n_rows={n_rows}: a model has at least one lens row")
    return tuple(sorted({*range(0, n_rows, stride), n_rows - 1}))


def check_layers(layers: Sequence[int], n_rows: int, option: str = "--layers") -> tuple[int, ...]:
    """``layers`` as a run reads them: non-empty, strictly increasing, within ``0..n_rows-1``,
    holding the output row ``n_rows - 1``. Errors name ``option`` and the offending rows."""
    rows = [int(i) for i in layers]
    last = n_rows - 1
    where = f"{option} {','.join(map(str, rows)) or '(empty)'}"
    if not rows:
        raise ValueError(f"{where}: no lens rows selected (rows are 0..{last}, 0 = embeddings)")
    bad = [i for i in rows if not 0 <= i <= last]
    if bad:
        raise ValueError(
            f"{where}: rows {bad} are out of range; this model's lens rows are 0..{last} "
            f"(0 = embeddings, {last} = output)"
        )
    if any(b <= a for a, b in itertools.pairwise(rows)):
        raise ValueError(f"{where}: rows must be strictly increasing (sorted, no repeats)")
    if rows[-1] != last:
        raise ValueError(
            f"{where}: must include the output row {last} (every run reads the model's own "
            "prediction)"
        )
    return tuple(rows)


def parse_layers(text: str, option: str = "--layers") -> tuple[int, ...]:
    """``"0,3,6"`` -> ``(0, 3, 6)``, ``"0,20-23"`` -> ``(0, 20, 21, 22, 23)``; the order is
    kept as written (``check_layers`` refuses an unsorted one)."""
    rows: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        bounds = [lo, hi] if sep and lo else [part]  # "-1": one (negative) row, refused later
        if not all(b.strip().lstrip("-").isdigit() for b in bounds):
            raise ValueError(
                f"{option} {text!r}: {part!r} is not a lens row; give row indices or ranges, "
                "e.g. 0,3,6,30 or 0,20-30"
            )
        first, last = int(bounds[0]), int(bounds[-1])
        if last < first:
            raise ValueError(f"{option} {text!r}: range {part} runs backwards")
        rows.extend(range(first, last + 1))
    return tuple(rows)


def selected_rows(
    n_rows: int,
    *,
    stride: int | None = None,
    layers: Sequence[int] | str | None = None,
) -> tuple[int, ...] | None:
    """The rows a run reads from ``--layer-stride`` or ``--layers`` (at most one of them);
    ``None`` when that is every row (the default, also ``--layer-stride 1``)."""
    if stride is not None and layers is not None:
        raise ValueError("--layer-stride and --layers: pass one of them, not both")
    if layers is not None:
        raw = parse_layers(layers) if isinstance(layers, str) else tuple(layers)
        rows = check_layers(raw, n_rows)
    elif stride is not None:
        rows = layer_stride(n_rows, stride)
    else:
        return None
    return None if rows == tuple(range(n_rows)) else rows


def describe_rows(rows: Sequence[int] | None, n_rows: int) -> str:
    """``"all 31 rows"`` or ``"11 of 31 rows: 0, 3, ..., 30"`` (for reports and logs)."""
    if rows is None or tuple(rows) == tuple(range(n_rows)):
        return f"all {n_rows} rows"
    return f"{len(rows)} of {n_rows} rows: {', '.join(map(str, rows))}"


def translator_rows(layers: Sequence[int] | None, n_layers: int) -> tuple[int, ...]:
    """The tuned-lens translators a selection trains: its lens rows below the output row.

    ``layers`` are lens rows as ``layer_stride`` / ``selected_rows`` give them (the output row
    ``n_layers`` may be left out: it has no translator); ``None``: every translator
    ``0..n_layers-1``. Checked as ``check_layers`` checks a lens run's rows.
    """
    if layers is None:
        return tuple(range(n_layers))
    rows = [int(i) for i in layers]
    if rows and rows[-1] != n_layers:
        rows.append(n_layers)
    trained = check_layers(rows, n_layers + 1)[:-1]
    if not trained:
        raise ValueError(
            f"--layers {n_layers}: only the output row, which has no translator; "
            f"select rows in 0..{n_layers - 1} to train"
        )
    return trained
