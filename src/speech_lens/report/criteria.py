"""The pre-registered reading of a lens run (organisms/README.md, "Pre-registered: what counts as
emerged"): E1 implicit transcription, E2 latent next-word prediction in text, E3 phase order.

Input: the ``layers.csv`` of a speech-only ``speech-lens lens`` run (Recall@k with bootstrap CIs,
the mismatched-word baseline, the frequency priors, first/last-unit recalls, modality masses)
and, for E2, the ``layers.csv`` of the same run with ``--scramble-words``. ``L_units`` is the
first row after the embeddings (row 0, where a unit token reads back as itself) at which unit
mass exceeds text mass; candidate rows are those strictly between row 0 and the output row, and
"adjacent" means consecutive among the rows the run read (``--layer-stride``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

Row = dict[str, float]


def read_layers(path: str | Path) -> list[Row]:
    """``layers.csv`` as numbers (the ``match`` column dropped), one dict per row, in order."""
    with Path(path).open() as f:
        rows = [{k: float(v) for k, v in r.items() if k != "match"} for r in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


@dataclass(frozen=True)
class Test:
    """One criterion: does it hold, and at which candidate rows does the comparison pass."""

    holds: bool
    rows: tuple[int, ...]  # every candidate row below L_units where the CI test passes
    first_row: int | None  # first row of the first adjacent passing pair


@dataclass(frozen=True)
class Reading:
    l_units: int | None  # None: text mass stays above unit mass at every row after row 0
    e1: Test  # pooled current word
    e1_last_unit: Test  # the same test from the word's last unit alone
    e1_first_unit: Test
    e2: Test  # next word (at the last unit), also above the scrambled control
    e3: bool
    verdict: str  # "shows the effect" | "partly" | "null"
    e1_kind: str  # "transcription" | "current word from context" | "pooled only" | "none"
    peak_current: float  # max over candidate rows of current-word Recall@k
    peak_row: int


def peak_index(rows: list[Row], key: str = "current", k: int = 5) -> int:
    """Index of the candidate row (strictly between row 0 and the output row; any row when
    there are fewer than three) with the highest ``recall@k_<key>``."""
    cands = range(1, len(rows) - 1) if len(rows) > 2 else range(len(rows))
    return max(cands, key=lambda i: rows[i][f"recall@{k}_{key}"])


def units_overtake(rows: list[Row]) -> int | None:
    for r in rows[1:]:
        if r["unit_mass"] > r["text_mass"]:
            return int(r["layer"])
    return None


def _above(rows: list[Row], key: str, bars: list[list[float]], k: int, l_units: int | None) -> Test:
    """Rows whose lower CI of ``recall@k_<key>`` is above every bar (bars[i]: the upper CI
    bounds to clear at row i); holds at two consecutive candidates."""
    cands = [(i, r) for i, r in enumerate(rows[1:-1], start=1)]
    cands = [(i, r) for i, r in cands if l_units is None or r["layer"] < l_units]
    passing = []
    for i, r in cands:
        lo = r[f"recall@{k}_{key}_lo"]
        if all(lo > b for b in bars[i]):
            passing.append(i)
    pair = next((i for i in passing if i + 1 in passing), None)
    return Test(
        pair is not None,
        tuple(int(rows[i]["layer"]) for i in passing),
        None if pair is None else int(rows[pair]["layer"]),
    )


def reading(
    rows: list[Row],
    scrambled: list[Row] | None = None,
    k: int = 5,
    phases_from: list[Row] | None = None,
) -> Reading:
    """Apply E1-E3 to a run's layer rows (and its scrambled-order control's, for E2).
    ``phases_from``: take ``L_units`` from these rows instead (a tuned lens's reading uses the
    logit lens's: a tuned lens is trained to reproduce the output, unit-dominated at unit
    positions, so its own unit mass cannot place the phases)."""
    if scrambled is not None and [r["layer"] for r in scrambled] != [r["layer"] for r in rows]:
        raise ValueError("the scrambled control read other rows than the run")
    l_units = units_overtake(phases_from if phases_from is not None else rows)
    cur_bars = [[r[f"recall@{k}_mismatched_hi"], r[f"recall@{k}_current_prior_hi"]] for r in rows]
    e1 = _above(rows, "current", cur_bars, k, l_units)
    last = _above(rows, "last_unit", cur_bars, k, l_units)
    first = _above(rows, "first_unit", cur_bars, k, l_units)
    nxt_bars = [
        # no control: E2 cannot pass (an impossible bar), it is not silently skipped
        [r[f"recall@{k}_mismatched_hi"], r[f"recall@{k}_next_prior_hi"],
         scrambled[i][f"recall@{k}_next_hi"] if scrambled is not None else 2.0]
        for i, r in enumerate(rows)
    ]  # fmt: skip
    e2 = _above(rows, "next", nxt_bars, k, l_units)
    e3 = bool(
        e1.holds
        and e2.holds
        and e1.first_row is not None
        and e2.first_row is not None
        and e1.first_row <= e2.first_row
    )
    if e1.holds and last.holds:
        kind = "transcription"
    elif e1.holds and first.holds:
        kind = "current word from context"
    else:
        kind = "pooled only" if e1.holds else "none"
    verdict = "shows the effect" if e1.holds and e2.holds else "partly" if e1.holds else "null"
    peak = rows[peak_index(rows, "current", k)]
    return Reading(
        l_units, e1, last, first, e2, e3, verdict, kind,
        peak[f"recall@{k}_current"], int(peak["layer"]),
    )  # fmt: skip


REGISTERED_DOSES = (0.0, 0.1, 0.2, 0.35, 0.5)  # organisms/README.md, "Dose-response"
REGISTERED_STAGE2_TOKENS = 1000 * 16 * 128  # the grid's cells: ~2M stage-2 tokens (gate G2)


def dose_verdict(doses: list[float], lo: float, hi: float) -> str:
    """The pre-registered dose-response reading: confirmed only if every registered dose was
    measured and the Spearman CI lies below 0; with doses missing it is not read at all."""
    missing = [p for p in REGISTERED_DOSES if p not in doses]
    if missing:
        n = len(REGISTERED_DOSES)
        return f"incomplete ({n - len(missing)} of {n} registered doses measured): not read"
    if hi < 0:
        return "confirmed (CI below 0)"
    if lo > 0:
        return "not confirmed (CI above 0: the opposite sign)"
    return "not confirmed (CI includes 0)"
