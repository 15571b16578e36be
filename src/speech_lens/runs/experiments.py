"""Patching experiments: one class per experiment, registered once.

``speech-lens patch --experiment`` takes its choices from :data:`EXPERIMENTS` and
:func:`speech_lens.runs.patch.run_experiment` dispatches through it; nothing else names an
experiment. An experiment runs on an :class:`ExperimentRun` (model, utterances, options, a
figure writer), returns its table rows and adds its numbers to the run's summary; the run writes
the CSV, the JSON summary and the provenance around it. The classes live here rather than in
``patching/`` because they write figures (the report layer sits above ``patching``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import plotly.graph_objects as go
import torch
from torch import Tensor

from speech_lens.data.utterance import Utterance
from speech_lens.models.load import SpeechLM
from speech_lens.patching.cross_modal import cross_modal_many
from speech_lens.patching.pairs import mean_curve, stack_curves
from speech_lens.patching.positions import PatchingError
from speech_lens.patching.word_swap import splice_word, swap_donor, word_swap_many
from speech_lens.report.patching import plot_layer_curves, plot_layer_position

Row = dict[str, Any]


@dataclass(frozen=True)
class ExperimentRun:
    """What an experiment is given; ``figure`` writes an HTML figure into the run folder."""

    model: SpeechLM
    utterances: list[Utterance]
    out: Path
    component: str
    rule: str
    layers: list[tuple[int, ...]]
    word: int
    read_layer: int | None
    batching: dict[str, Any]
    figures: list[Path] = field(default_factory=list)

    def figure(self, name: str, fig: go.Figure) -> None:
        self.figures.append(self.out / name)
        fig.write_html(self.figures[-1], include_plotlyjs=True)


class Experiment:
    """Subclass, set the class attributes, implement :meth:`run`, decorate with
    :func:`register_experiment`."""

    name: ClassVar[str]
    metric: ClassVar[str]  # what the numbers are (recorded in the provenance settings)
    positions: ClassVar[str]  # which positions are patched (ditto)
    uses_word: ClassVar[bool] = False  # reads the ``word`` option (recorded only then)

    def run(self, run: ExperimentRun, summary: dict[str, Any]) -> list[Row]:
        """Patch, write figures with ``run.figure``, add numbers to ``summary``; return rows."""
        raise NotImplementedError


EXPERIMENTS: dict[str, Experiment] = {}


def register_experiment(cls: type[Experiment]) -> type[Experiment]:
    """Class decorator: make ``cls.name`` a choice of ``speech-lens patch --experiment``."""
    if cls.name in EXPERIMENTS:
        raise ValueError(f"patching experiment {cls.name!r} is already registered")
    EXPERIMENTS[cls.name] = cls()
    return cls


def unregister_experiment(name: str) -> None:
    EXPERIMENTS.pop(name, None)


def safe_name(name: str) -> str:
    """``name`` usable in a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class CrossModal(Experiment):
    """:func:`cross_modal` for every word: the next-word log-prob curve and a word heatmap."""

    metric = "log P(next word's first text sub-token) at the patched word's end"
    positions = "the word's span"

    def run(self, run: ExperimentRun, summary: dict[str, Any]) -> list[Row]:
        utts = run.utterances
        per_utt = cross_modal_many(
            run.model,
            utts,
            direction=self.name,
            words=None,
            component=run.component,
            rule=run.rule,
            layers=run.layers,
            read_layer=run.read_layer,
            **run.batching,
        )
        results = [r for rs in per_utt for r in rs]
        curve = mean_curve(results)
        fig = plot_layer_curves(
            {f"patched ({run.component}, rule={run.rule})": curve["mean"]},
            layers=curve["layers"],
            references={"unpatched target": curve["baseline"], "source run": curve["source"]},
            title=f"{self.name}: next-word log-prob at the patched word "
            f"(mean of {curve['n']} words, {len(utts)} utterances)",
            yaxis="log P(next word, text token)"
            + ("" if run.read_layer is None else f", lens row {run.read_layer}"),
        )
        run.figure(f"{self.name}_curve.html", fig)
        first = [r for r in results if r.extra["utterance"] == utts[0].id]
        if first:
            heatmap = plot_layer_position(stack_curves(first))
            run.figure(f"{self.name}_{safe_name(utts[0].id)}_heatmap.html", heatmap)
        summary.update(
            layers=list(curve["layers"]),
            curve=[round(float(x), 6) for x in curve["mean"]],
            sem=[round(float(x), 6) for x in curve["sem"]],
            baseline=curve["baseline"],
            source=curve["source"],
            words=curve["n"],
        )
        return [row for r in results for row in r.to_table()]


@register_experiment
class TextToSpeech(CrossModal):
    name = "text-to-speech"


@register_experiment
class SpeechToText(CrossModal):
    name = "speech-to-text"


@register_experiment
class WordSwap(Experiment):
    """Word ``word`` of each utterance swapped for another utterance's word, patched both ways."""

    name = "word-swap"
    metric = "logit(clean word) - logit(swapped word), text tokens, at the swapped word's end"
    positions = "each word alone"
    uses_word = True
    modes = ("denoise", "noise")

    def run(self, run: ExperimentRun, summary: dict[str, Any]) -> list[Row]:
        items, firsts = self.pairs(run)
        swapped = word_swap_many(
            run.model,
            items,
            run.word,
            modes=self.modes,
            component=run.component,
            rule=run.rule,
            layers=run.layers,
            **run.batching,
        )
        rows: list[Row] = []
        per_mode: dict[str, list[Tensor]] = {m: [] for m in self.modes}
        baselines: dict[str, list[float]] = {m: [] for m in self.modes}
        for is_first, (u, _), pair in zip(firsts, items, swapped, strict=True):
            for mode, r in zip(self.modes, pair, strict=True):
                rows += r.to_table()
                w = next(i for i, lab in enumerate(r.positions) if "->" in lab)
                per_mode[mode].append(r.values[:, w])
                baselines[mode].append(r.baseline)
                if is_first:
                    fig = plot_layer_position(r, title=f"word swap ({mode}): {r.metric}")
                    run.figure(f"word-swap_{mode}_{safe_name(u.id)}.html", fig)
                    summary.setdefault("layers", list(r.layer_labels))
        for mode, vals in per_mode.items():
            if vals:
                summary[f"{mode}_curve"] = [round(float(x), 6) for x in torch.stack(vals).mean(0)]
                summary[f"{mode}_baseline"] = sum(baselines[mode]) / len(baselines[mode])
        summary["words"] = len(per_mode["denoise"])
        return rows

    @staticmethod
    def pairs(run: ExperimentRun) -> tuple[list[tuple[Utterance, Any]], list[bool]]:
        """(utterance, utterance with word ``run.word`` swapped in from a donor) per utterance
        that has that word, and whether it is the first utterance."""
        utts, word = run.utterances, run.word
        items, firsts = [], []
        for k, u in enumerate(utts):
            if not 0 <= word < len(u.words):
                continue
            donor = swap_donor(utts, k, word)
            if donor is None:
                raise PatchingError(f"no donor word to swap into {u.id!r}: need another utterance")
            items.append((u, splice_word(u, word, *donor)))
            firsts.append(k == 0)
        return items, firsts
