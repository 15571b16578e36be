"""The demo report's sections: knowledge, ASR, tuned lens, patching."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from speech_lens.data.prompts import encode_prompt
from speech_lens.data.utterance import Utterance
from speech_lens.data.word_targets import word_targets
from speech_lens.lens import word_lens
from speech_lens.lens.kl import lens_kl
from speech_lens.lens.metrics import DatasetMetrics, aggregate
from speech_lens.lens.records import DEFAULT_MATCH, utterance_record
from speech_lens.lens.tuned import TunedLens
from speech_lens.models.load import SpeechLM
from speech_lens.report.html import Report, Table
from speech_lens.report.lens import recall_figure
from speech_lens.report.tuned import kl_figure
from speech_lens.runs.patch import run_experiment

K = 5


@dataclass(frozen=True)
class Organism:
    name: str
    path: Path
    label: str
    config: dict[str, Any]
    measured: dict[str, Any]  # this organism's entry in results.json

    @property
    def aux_layer(self) -> int | None:
        return self.config.get("aux_layer")

    @property
    def saw_speech(self) -> bool:
        mix = self.config.get("mix") or {}
        return any(v for key, v in mix.items() if key != "text")


def lens_metrics(
    model: SpeechLM,
    utts: Sequence[Utterance],
    *,
    mode: str = "speech",
    lens: Any = None,
    label: str = "",
    n_boot: int = 500,
    layers: Sequence[int] | None = None,
    match: str = DEFAULT_MATCH,
) -> DatasetMetrics:
    """Word-level lens curves over ``utts`` (speech-only or interleaved prompts), at the lens
    rows ``layers`` (default every row), words matched by rule ``match``."""
    records = []
    for i, u in enumerate(utts):
        if mode == "interleaved":
            prompt = encode_prompt(model, u, mode="interleaved", seed=i)
        else:
            prompt = encode_prompt(model, u, mode="speech")
        res = word_lens(model, prompt, word_targets(model, u), k=10, lens=lens, layers=layers)
        records.append(utterance_record(res, prompt, model.layout))
    return aggregate(records, match=match, ks=(1, 5, 10), n_boot=n_boot, seed=0, label=label)


def curve_peak(curve: list[float]) -> tuple[float, int]:
    i = int(np.argmax(curve))
    return float(curve[i]), i


def _crossover(m: DatasetMetrics) -> int | str:
    """First layer (row >= 1) from which unit mass stays above text mass at unit positions;
    "every layer" when text mass never leads (row 0, the embeddings, reads the input unit)."""
    unit, text = m.mass["unit"].mean, m.mass["text"].mean
    rows = range(1, len(unit))
    if all(unit[j] > text[j] for j in rows):
        return "every layer"
    for i in rows:
        if all(unit[j] > text[j] for j in range(i, len(unit))):
            return i
    return "never"


@dataclass(frozen=True)
class SummarySources:
    """Where the summary table's columns come from and on how much data (in their labels): the
    lens columns are recomputed by the demo, gates and knowledge are read from results.json."""

    lens: str  # e.g. "recomputed: 150 utt."
    gates: str  # e.g. "results.json: 300 utt."
    knowledge: str  # e.g. "results.json: 48 facts"


def summary_sources(
    n_lens: int, orgs: Sequence[Organism], results: dict[str, Any]
) -> SummarySources:
    """Labels from the data actually used: ``n_lens`` utterances lensed here (``--limit``), the
    held-out set the gates ran on and the facts the knowledge test asked (``results.json``)."""
    n_gate = results.get("corpus", {}).get("test", {}).get("utterances", "?")
    facts = sorted(
        {o.measured["knowledge"].get("n_facts") for o in orgs if o.measured.get("knowledge")}
        - {None}
    )
    return SummarySources(
        lens=f"recomputed: {n_lens} utt.",
        gates=f"results.json: {n_gate} utt.",
        knowledge=f"results.json: {'/'.join(map(str, facts)) or '?'} facts",
    )


def summary_row(o: Organism, m: DatasetMetrics, src: SummarySources) -> dict[str, Any]:
    cur1, l1 = curve_peak(m.recall_current[1].mean[1:])
    cur5, l5 = curve_peak(m.recall_current[K].mean[1:])
    nxt5, ln = curve_peak(m.recall_next[K].mean[1:])
    gates = o.measured.get("gates", {})
    know = o.measured.get("knowledge", {})
    return {
        "organism": o.name,
        "role": o.label,
        f"cur@1 peak (layer) [{src.lens}]": f"{cur1:.3f} ({l1 + 1})",
        f"cur@{K} peak (layer) [{src.lens}]": f"{cur5:.3f} ({l5 + 1})",
        f"next@{K} peak (layer) [{src.lens}]": f"{nxt5:.3f} ({ln + 1})",
        f"units overtake text at layer [{src.lens}]": _crossover(m),
        f"next word after speech / text prefix [{src.gates}]": _pair(
            gates, "next_word_after_speech_prefix", "next_word_after_text_prefix"
        ),
        f"transcription acc [{src.gates}]": _fmt(gates.get("transcription_word_acc")),
        f"spoken knowledge acc [{src.knowledge}]": _fmt(know.get("speech_acc")),
    }


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{float(v):.3f}"


def _pair(d: dict[str, Any], a: str, b: str) -> str:
    return f"{_fmt(d.get(a))} / {_fmt(d.get(b))}"


def describe_organism(o: Organism) -> str:
    c = o.config
    t = o.measured.get("training", {})
    parts = [f"init: {c.get('init', '?')}", f"data mix: {c.get('mix', '?')}"]
    if c.get("d_model"):
        parts.append(
            f"d_model {c['d_model']}, {c.get('n_layers')} layers, {c.get('n_heads')} heads"
        )
    if t:
        parts.append(
            f"{t.get('steps')} steps, {t.get('tokens')} tokens, {t.get('wall_seconds')} s on 2 CPU cores"
        )
    if o.aux_layer is not None:
        parts.append(f"POSITIVE CONTROL: auxiliary current-word loss at layer {o.aux_layer}")
    return "; ".join(str(p) for p in parts)


def knowledge_section(
    rep: Report,
    orgs: Sequence[Organism],
    metrics: dict[str, DatasetMetrics],
    results: dict[str, Any],
) -> None:
    rows, xs, ys = [], [], []
    for o in orgs:
        k = o.measured.get("knowledge")
        if not k:
            continue
        m = metrics[o.name]
        strength = curve_peak(m.recall_current[K].mean[1:])[0]
        rows.append(
            {
                "organism": o.name,
                "facts": k.get("n_facts"),
                "accuracy from text": _fmt(k.get("text_acc")),
                "accuracy from speech": _fmt(k.get("speech_acc")),
                f"transcription strength (peak cur@{K}, recomputed: {m.n_utterances} utt.)": (
                    f"{strength:.3f}"
                ),
            }
        )
        if o.saw_speech and o.aux_layer is None and k.get("speech_acc") is not None:
            xs.append(strength)
            ys.append(float(k["speech_acc"]))
    text = (
        "Facts about a small synthetic world appear only in the text training data; the test "
        "plays the prompt in speech and compares the likelihood of the correct and a "
        "counterfactual spoken completion (the paper's Common-Sense Facts Audio setup). "
        "The accuracies were measured when the organisms were built (organisms/knowledge.py, "
        "read from results.json); the transcription strength is recomputed by this demo."
    )
    if len(xs) >= 3 and np.std(xs) > 0 and np.std(ys) > 0:
        r = float(np.corrcoef(xs, ys)[0, 1])
        text += (
            f"\n\nPearson correlation across the emergent organisms: r = {r:.2f} (n = {len(xs)})."
        )
    if rows:
        rep.add_section("Spoken knowledge", text=text, tables=[Table(rows)])


def asr_section(rep: Report, results: dict[str, Any]) -> None:
    asr = results.get("asr")
    if not asr:
        return
    rep.add_section(
        "The corpus is real speech",
        text=(
            f"{asr.get('system')}: word accuracy {asr.get('word_accuracy')} on "
            f"{asr.get('utterances')} held-out utterances ({asr.get('reference_words')} words)."
        ),
        tables=[Table(asr.get("examples", []), caption="examples")],
    )


def tuned_section(
    rep: Report,
    orgs: Sequence[Organism],
    models: dict[str, SpeechLM],
    test: Sequence[Utterance],
    say: Callable[[str], None],
) -> None:

    figs, rows = [], []
    for o in orgs:
        lens_dir = o.path / "tuned_lens"
        if not (lens_dir / "params.pt").exists():
            continue
        model = models[o.name]
        tuned = TunedLens.load(lens_dir, model)
        seqs = [encode_prompt(model, u, mode="speech").tokens for u in test[:100]]
        kl_logit = lens_kl(model, None, seqs)
        kl_tuned = lens_kl(model, tuned, seqs)
        figs.append(
            kl_figure(kl_logit, kl_tuned, title=f"{o.name}: KL(final ‖ lens), held-out speech")
        )
        m = lens_metrics(model, test, lens=tuned, label=f"{o.name} (tuned)")
        figs.append(recall_figure(m, ks=[K]))
        for i in range(model.n_layers + 1):
            rows.append(
                {
                    "organism": o.name,
                    "row": i,
                    "KL logit lens": f"{kl_logit[i]:.3f}",
                    "KL tuned lens": f"{kl_tuned[i]:.3f}",
                }
            )
        say(
            f"tuned lens {o.name}: KL logit {kl_logit[:-1].mean():.3f} vs tuned {kl_tuned[:-1].mean():.3f}"
        )
    if figs:
        rep.add_section(
            "Tuned lens vs logit lens",
            text=(
                "One affine translator per layer (tuned-lens format, zero-initialised, trained on the "
                "organism's own speech to minimise KL to its final distribution). Lower KL means the "
                "lens reads what the model will output; the recall curves read through the tuned lens."
            ),
            figures=figs,
            tables=[Table(rows, max_rows=100)],
        )


def patching_section(
    rep: Report,
    orgs: Sequence[Organism],
    models: dict[str, SpeechLM],
    utts: Sequence[Utterance],
    out: Path,
    say: Callable[[str], None],
) -> None:

    fig = go.Figure()
    rows = []
    for o in orgs:
        if not o.saw_speech:
            continue
        summ = run_experiment(
            models[o.name],
            utts,
            out / "patching" / o.name,
            experiment="text-to-speech",
            progress=False,
        )
        ys = list(summ["curve"])
        xs = [str(x) for x in summ["layers"]]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=o.name))
        rows.append(
            {
                "organism": o.name,
                "words": summ["words"],
                "unpatched speech run": f"{summ['baseline']:.3f}",
                "text (source) run": "-" if summ["source"] is None else f"{summ['source']:.3f}",
                **{f"patched {x}": f"{y:.3f}" for x, y in zip(xs, ys, strict=True)},
            }
        )
        say(f"patching text->speech {o.name}: done")
    if rows:
        fig.update_layout(
            title="text -> speech patching: next word's log-prob after patching, per layer",
            xaxis_title="layer patched (resid_pre)",
            yaxis_title="mean log P(next word, text token)",
        )
        rep.add_section(
            "Causal patching: text residual into the speech run",
            text=(
                "For each word, the residual stream of the text run at the word's last token is "
                "patched into the speech run at the word's last unit (rule 'last'), one layer at a "
                "time; the curve is the mean log-probability of the next word's text token at the "
                "output, to compare with the unpatched speech run and the text run in the table. If "
                "the speech positions live in the text space from some layer on, patching there "
                "moves the speech run toward the text run."
            ),
            figures=[fig],
            tables=[Table(rows)],
        )
