"""Lens metrics at speech (unit) positions: one registry entry per metric.

An entry is a name, a label and ``values(result, columns, layout)``: per lens row, one value per
speech position of an utterance (``[row, n_speech]``, read from a ``word_lens`` result at its
``columns``). From the entry alone the per-utterance record stores the row sums, the data set
metric is their ratio over all speech positions with an utterance-bootstrap band
(``lens.metrics.aggregate``), the layer table gets a column and ``compare_figure`` a curve.

The built-in entries are the vocabulary-group masses and ``unit_top1``; their record and
``metrics.json`` fields (``mass_sums`` / ``mass``, ``unit_top1``) predate the registry and keep
their names. Other entries are stored under ``position_sums`` / ``curves`` by name, and those keys
are written only when such a metric is registered, so the default file formats are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from speech_lens.lens.readout import MASS_GROUPS
from speech_lens.lens.results import LensResult
from speech_lens.vocab import VocabLayout

PositionValues = Callable[[LensResult, Tensor, VocabLayout], Tensor]


@dataclass(frozen=True)
class SpeechPositionMetric:
    """A per-layer lens statistic averaged over speech positions (see the module docstring)."""

    name: str
    label: str
    values: PositionValues


LENS_METRICS: dict[str, SpeechPositionMetric] = {}
# built-in metrics stored in the record's and metrics.json's own fields: name -> mass group
MASS_METRICS = {f"{g}_mass": g for g in MASS_GROUPS}
UNIT_TOP1 = "unit_top1"


def register_lens_metric(
    metric: SpeechPositionMetric, *, overwrite: bool = False
) -> SpeechPositionMetric:
    """Add ``metric`` to the registry (every lens run, table and comparison then reports it)."""
    if metric.name in LENS_METRICS and not overwrite:
        raise ValueError(f"lens metric {metric.name!r} is already registered")
    LENS_METRICS[metric.name] = metric
    return metric


def unregister_lens_metric(name: str) -> None:
    if name in MASS_METRICS or name == UNIT_TOP1:
        raise ValueError(f"lens metric {name!r} is built in (its fields are part of the formats)")
    LENS_METRICS.pop(name, None)


def group_mass(group: str) -> PositionValues:
    """Probability mass on vocabulary group ``group`` at each speech position."""
    i = MASS_GROUPS.index(group)

    def values(result: LensResult, columns: Tensor, layout: VocabLayout) -> Tensor:
        return result.mass[:, columns, i]

    return values


def unit_is_top1(result: LensResult, columns: Tensor, layout: VocabLayout) -> Tensor:
    """1 where the overall top-1 token at a speech position is a speech unit."""
    return layout.is_unit(result.topk_ids_all[:, columns, 0])


for _name, _group in MASS_METRICS.items():
    register_lens_metric(SpeechPositionMetric(_name, f"{_group} mass", group_mass(_group)))
register_lens_metric(SpeechPositionMetric(UNIT_TOP1, "top-1 is a unit", unit_is_top1))
