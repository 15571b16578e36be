"""The patch run: an experiment over a manifest, written to a run folder (CSV, plots, provenance)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from speech_lens.data.utterance import Utterance
from speech_lens.files import atomic_write_text
from speech_lens.models.load import SpeechLM
from speech_lens.patching.hooks import resolve_layer_sets
from speech_lens.patching.positions import PatchingError, Rule
from speech_lens.patching.result import write_csv
from speech_lens.provenance import collect_provenance, stable
from speech_lens.runs.experiments import EXPERIMENTS, Experiment, ExperimentRun


def run_experiment(
    model: SpeechLM,
    utterances: Iterable[Utterance],
    out: str | Path,
    *,
    experiment: str = "text-to-speech",
    component: str = "resid_pre",
    rule: Rule | str = "last",
    layers: int | Iterable[int | Iterable[int]] | None = None,
    word: int = 1,
    read_layer: int | None = None,
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    padding_side: str = "right",
    data: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run one worked experiment over ``utterances`` and write its table and figures to ``out``.

    ``experiment``: a name registered in ``runs.experiments.EXPERIMENTS``.
    ``text-to-speech`` / ``speech-to-text``: :func:`cross_modal` for every word; writes
    ``{experiment}.csv``, the mean per-layer curve ``{experiment}_curve.html`` and a layer x
    word heatmap of the first utterance. ``word-swap``: word ``word`` of each utterance is
    swapped for a word of another utterance (:func:`splice_word`) and patched both ways
    (:func:`word_swap`); writes ``word-swap.csv`` and layer x word heatmaps of the first
    utterance, plus the mean per-layer value at the swapped word. Both write
    ``{experiment}.json``: the returned summary with a ``provenance`` key (checkpoint and
    ``data`` digests, versions, settings).

    ``batch_size`` (int or ``"auto"`` from ``memory_budget_gb``, default the free memory):
    utterances per padded forward (``padding_side`` ``"right"`` or ``"left"``) for the source
    and target runs, and patched runs per forward, across the utterances of a group; values
    equal the one-by-one run (fp32: up to summation order).
    """

    if experiment not in EXPERIMENTS:
        raise PatchingError(f"experiment must be one of {tuple(EXPERIMENTS)}, not {experiment!r}")
    chosen = EXPERIMENTS[experiment]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    utts = list(utterances)
    layer_sets = resolve_layer_sets(model, layers)
    if not utts:
        raise PatchingError("no utterances to patch")
    summary: dict[str, Any] = {
        "experiment": experiment,
        "component": component,
        "rule": rule,
        "utterances": len(utts),
        "readout": "output" if read_layer is None else f"logit lens row {read_layer}",
    }
    batching: dict[str, Any] = {
        "batch_size": batch_size,
        "memory_budget_gb": memory_budget_gb,
        "padding_side": padding_side,
        "progress": progress,
    }
    run = ExperimentRun(
        model, utts, out, component, str(rule), layer_sets, word, read_layer, batching
    )
    rows = chosen.run(run, summary)
    summary["table"] = str(write_csv(rows, out / f"{experiment}.csv"))
    summary["figures"] = [str(f) for f in run.figures]
    settings = experiment_settings(chosen, run, summary, batch_size, padding_side)
    prov = collect_provenance(model, data=data, lens="logit", settings=settings)
    # no timestamp: a rerun writes a byte-identical file
    summary["provenance"] = stable(prov)
    summary["metadata"] = str(out / f"{experiment}.json")
    atomic_write_text(summary["metadata"], json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def experiment_settings(
    chosen: Experiment,
    run: ExperimentRun,
    summary: dict[str, Any],
    batch_size: int | str,
    padding_side: str,
) -> dict[str, Any]:
    """The run's settings as recorded in its provenance."""
    return {
        "experiment": chosen.name,
        "component": summary["component"],
        "rule": summary["rule"],
        "layers": [list(e) for e in run.layers],
        "metric": chosen.metric,
        "readout": summary["readout"],
        "positions": chosen.positions,
        "word": run.word if chosen.uses_word else None,
        "utterance_ids": [u.id for u in run.utterances],
        "batch_size": batch_size,
        "padding_side": padding_side,
        "seed": None,  # nothing random: the same inputs give the same numbers
    }
