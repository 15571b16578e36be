"""PatchResult: a sweep's frozen result and its CSV."""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    pass


# ---------------------------------------------------------------------------------------------
# Sweeps and results
# ---------------------------------------------------------------------------------------------


def _layer_label(layers: tuple[int, ...]) -> str:
    if len(layers) > 1 and layers == tuple(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return "+".join(str(x) for x in layers)


@dataclass(frozen=True, eq=False)
class PatchResult:
    """Metric values of a patching sweep, with everything needed to read them.

    ``values`` has one axis per name in ``axes`` (``"layer"``, then ``"position"`` unless the
    whole map was patched at once, then ``"head"`` for head sweeps). ``baseline`` is the metric
    on the unpatched target run, ``source_value`` on the unpatched source run when the metric
    can be read there (equal lengths), else None.
    """

    values: Float[Tensor, "..."]
    axes: tuple[str, ...]
    layers: tuple[tuple[int, ...], ...]
    positions: tuple[str, ...]
    heads: tuple[int, ...] | None
    component: str
    rule: str
    metric: str
    baseline: float
    source_value: float | None
    source_id: str
    target_id: str
    position_mode: str
    head_mode: str = "all"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def layer_labels(self) -> tuple[str, ...]:
        return tuple(_layer_label(e) for e in self.layers)

    def effect(self) -> Float[Tensor, "..."]:
        """Values minus the unpatched target metric."""
        return self.values - self.baseline

    def to_table(self) -> list[dict[str, Any]]:
        """One row per cell: layer, position, head, value, and the run's settings."""
        rows = []
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in self.values.shape]).reshape(
            -1, self.values.ndim
        ):
            cell = dict(zip(self.axes, idx.tolist(), strict=True))
            row: dict[str, Any] = {"layer": self.layer_labels[cell["layer"]]}
            row["position"] = (
                self.positions[cell["position"]] if "position" in cell else self.position_mode
            )
            if "head" in cell:
                row["head"] = (self.heads or ())[cell["head"]]
            elif self.heads is not None:
                row["head"] = "+".join(str(h) for h in self.heads)
            row["value"] = float(self.values[tuple(idx.tolist())])
            row.update(
                component=self.component,
                rule=self.rule,
                metric=self.metric,
                baseline=self.baseline,
                source_value=self.source_value,
                source=self.source_id,
                target=self.target_id,
                **self.extra,
            )
            rows.append(row)
        return rows

    def to_csv(self, path: str | Path) -> Path:
        return write_csv(self.to_table(), path)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows atomically (temp file + os.replace); columns are the union, in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; a table is for reading
    os.replace(tmp, path)
    return path
