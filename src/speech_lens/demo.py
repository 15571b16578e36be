"""``speech-lens demo``: every analysis of the library on the shipped model organisms, one report.

The organisms (``organisms/`` in the repository) are small Llama-architecture speech-text LMs
trained here on real synthetic speech, saved in the SpiritLM on-disk layout with a spec file. The
demo only analyses them: logit lens per layer (current- and next-word Recall@k, modality mass),
the ablation grid on one axis, the positive control, the Figure-1 view, tuned lens against logit
lens, text->speech activation patching, and the gates and spoken-knowledge numbers measured when
the organisms were built (``organisms/results.json``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from speech_lens.adapters import AdapterError, SpeechLM, load_model
from speech_lens.data import Utterance, read_manifest
from speech_lens.lens import logit_lens, word_lens
from speech_lens.metrics import DatasetMetrics, aggregate, layer_table, utterance_record
from speech_lens.plots import compare_figure, lens_heatmap, modality_figure, recall_figure
from speech_lens.prompts import encode_prompt, word_targets
from speech_lens.provenance import POOLING, collect_provenance, provenance_table
from speech_lens.report import Report, Table, atomic_write_text

REPO_ORGANISMS = Path(__file__).resolve().parents[2] / "organisms"
GRID = ("textinit_interleaved", "textinit_speechonly", "random_interleaved", "random_speechonly")
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


def find_organisms(root: Path) -> tuple[list[Organism], dict[str, Any]]:
    """The shipped organisms under ``root`` and the build-time measurements."""
    if not (root / "results.json").exists():
        raise AdapterError(
            f"no model organisms in {root} (results.json missing); run the demo from a clone of "
            f"the repository, or pass --organisms DIR"
        )
    results = json.loads((root / "results.json").read_text())
    found = []
    for d in sorted(p for p in root.iterdir() if (p / "config.json").exists()):
        meta = (
            json.loads((d / "organism.json").read_text()) if (d / "organism.json").exists() else {}
        )
        measured = results.get("organisms", {}).get(d.name, {})
        found.append(
            Organism(
                name=d.name,
                path=d,
                label=measured.get("label", d.name),
                config=meta.get("config", {}),
                measured=measured,
            )
        )
    if not found:
        raise AdapterError(f"{root} holds no organism checkpoints (directories with config.json)")
    return found, results


def lens_metrics(
    model: SpeechLM,
    utts: Sequence[Utterance],
    *,
    mode: str = "speech",
    lens: Any = None,
    label: str = "",
    n_boot: int = 500,
) -> DatasetMetrics:
    """Word-level lens curves over ``utts`` (speech-only or interleaved prompts)."""
    records = []
    for i, u in enumerate(utts):
        if mode == "interleaved":
            prompt = encode_prompt(model, u, mode="interleaved", seed=i)
        else:
            prompt = encode_prompt(model, u, mode="speech")
        res = word_lens(model, prompt, word_targets(model, u), k=10, lens=lens)
        records.append(utterance_record(res, prompt, model.layout))
    return aggregate(records, ks=(1, 5, 10), n_boot=n_boot, seed=0, label=label)


def _peak(curve: list[float]) -> tuple[float, int]:
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


def summary_row(o: Organism, m: DatasetMetrics) -> dict[str, Any]:
    cur1, l1 = _peak(m.recall_current[1].mean[1:])
    cur5, l5 = _peak(m.recall_current[K].mean[1:])
    nxt5, ln = _peak(m.recall_next[K].mean[1:])
    gates = o.measured.get("gates", {})
    know = o.measured.get("knowledge", {})
    return {
        "organism": o.name,
        "role": o.label,
        "cur@1 peak (layer)": f"{cur1:.3f} ({l1 + 1})",
        f"cur@{K} peak (layer)": f"{cur5:.3f} ({l5 + 1})",
        f"next@{K} peak (layer)": f"{nxt5:.3f} ({ln + 1})",
        "units overtake text at layer": _crossover(m),
        "next word after speech / text prefix": _pair(
            gates, "next_word_after_speech_prefix", "next_word_after_text_prefix"
        ),
        "transcription acc": _fmt(gates.get("transcription_word_acc")),
        "spoken knowledge acc": _fmt(know.get("speech_acc")),
    }


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{float(v):.3f}"


def _pair(d: dict[str, Any], a: str, b: str) -> str:
    return f"{_fmt(d.get(a))} / {_fmt(d.get(b))}"


def run_demo(
    out: str | Path,
    *,
    organisms: str | Path | None = None,
    limit: int | None = 150,
    patch_utterances: int = 20,
    progress: bool = True,
) -> Path:
    """Analyse every shipped organism and write ``out/report.html`` (+ ``out/demo.json``)."""
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(organisms) if organisms is not None else REPO_ORGANISMS
    orgs, results = find_organisms(root)
    test = list(read_manifest(root / "test_manifest.jsonl"))
    if limit is not None:
        test = test[:limit]

    say: Callable[[str], None] = (lambda s: tqdm.write(s)) if progress else (lambda s: None)
    metrics: dict[str, DatasetMetrics] = {}
    interleaved: dict[str, DatasetMetrics] = {}
    models: dict[str, SpeechLM] = {}
    bar = tqdm(orgs, desc="organisms", unit="model", disable=not progress)
    for o in bar:
        bar.set_postfix_str(o.name)
        model = load_model(o.path)
        models[o.name] = model
        metrics[o.name] = lens_metrics(model, test, label=o.name)
        if (o.config.get("mix") or {}).get("interleaved"):
            interleaved[o.name] = lens_metrics(model, test, mode="interleaved", label=o.name)
    say(
        f"lens over {len(test)} held-out utterances x {len(orgs)} organisms: {time.time() - t0:.0f} s"
    )

    rep = Report(
        "speech_lens demo: model organisms",
        subtitle=(
            f"{len(orgs)} organisms, {len(test)} held-out spoken utterances "
            f"({sum(len(u.words) for u in test)} words); logit lens max-pooled per spoken word, "
            f"text ids only, match rule 'first'"
        ),
    )
    rows = [summary_row(o, metrics[o.name]) for o in orgs]
    rep.add_section(
        "What this shows",
        text=(
            "Small Llama-architecture speech-text LMs trained on this machine's CPU from real "
            "synthetic speech (Piper TTS, units from k-means on the audio), saved in SpiritLM's "
            "on-disk format. The ablation grid crosses initialisation (a text-pretrained LM vs "
            "random) with data (interleaved speech-text vs speech-only), as in the paper. The "
            "positive control is trained with an auxiliary loss that plants the current word's "
            "text token at one middle layer: it validates the tool and is not a replication. "
            "Every number below is measured; small organisms trained for minutes need not show "
            "the paper's effect, and the table says what they show.\n\n"
            "Rows: 0 = embeddings, n = the model's output. Peaks exclude row 0."
        ),
        tables=[
            Table(
                rows,
                caption="per organism: lens peaks (speech-only prompts), gates and spoken knowledge",
            )
        ],
    )
    grid = {o.name: metrics[o.name] for o in orgs if o.name in GRID}
    if grid:
        rep.add_section(
            "Ablation grid: implicit transcription (current word)",
            text=f"Current-word Recall@{K} per relative depth, speech-only prompts, 95% bootstrap bands.",
            figures=[
                compare_figure(grid, metric="recall_current", k=K),
                compare_figure(grid, metric="recall_next", k=K),
            ],
        )
    longer = {o.name: metrics[o.name] for o in orgs if o.name.startswith("textinit_interleaved")}
    if len(longer) > 1:
        rep.add_section(
            "Does more interleaved training help?",
            text=(
                "textinit_interleaved continued for 2x and 3x the stage-2 tokens, and with strict "
                "one-word speech/text alternation (_1word)."
            ),
            figures=[
                compare_figure(longer, metric="recall_current", k=K),
                compare_figure(longer, metric="recall_next", k=K),
            ],
        )
    control = [o for o in orgs if o.aux_layer is not None]
    for o in control:
        twin = next((t for t in orgs if t.name == "textinit_interleaved"), None)
        shown = [metrics[o.name]] + ([metrics[twin.name]] if twin else [])
        m = metrics[o.name]
        cur, layer = _peak(m.recall_current[K].mean[1:])
        rep.add_section(
            f"Positive control: {o.name} (planted at layer {o.aux_layer})",
            text=(
                f"Trained with an auxiliary loss reading the current word through the final norm "
                f"and unembedding at the residual entering block {o.aux_layer} (lens row "
                f"{o.aux_layer}) at speech positions. The lens finds current-word Recall@{K} = "
                f"{cur:.3f} peaking at row {layer + 1}"
                + (
                    f"; the same recipe without the auxiliary loss ({twin.name}) peaks at "
                    f"{_peak(metrics[twin.name].recall_current[K].mean[1:])[0]:.3f}."
                    if twin
                    else "."
                )
            ),
            figures=[recall_figure(shown, ks=[K], which=("current",))],
        )
    for o in orgs:
        figs = [recall_figure(metrics[o.name]), modality_figure(metrics[o.name])]
        if o.name in interleaved:
            figs.append(recall_figure(interleaved[o.name], ks=[K]))
        rep.add_section(
            f"{o.name}: {o.label}",
            text=_describe(o),
            figures=figs,
            tables=[Table(layer_table(metrics[o.name]), caption="speech-only prompts, per layer")],
        )
    # the paper's Figure 1 view on a few utterances
    focus = next((o for o in orgs if o.name == "textinit_interleaved"), orgs[0])
    heat = []
    for u in test[:3]:
        prompt = encode_prompt(models[focus.name], u, mode="speech")
        res = logit_lens(models[focus.name], prompt.tokens, k=5)
        heat.append(lens_heatmap(res, models[focus.name].tokenizer, prompt=prompt))
    rep.add_section(
        f"Layer x position: {focus.name}",
        text="Top text token per layer and unit position; colour: probability mass on speech units.",
        figures=heat,
    )
    _knowledge_section(rep, orgs, metrics, results)
    _asr_section(rep, results)
    _tuned_section(rep, orgs, models, test, say)
    _patching_section(rep, orgs, models, test[:patch_utterances], out, say)
    settings = {  # lens_metrics' settings for the per-organism curves above
        "mode": "speech",
        "k": 10,
        "ks": [1, 5, 10],
        "match": "first",
        "pooling": POOLING,
        "ranking": "text ids",
        "limit": limit,
        "n_boot": 500,
        "seed": 0,
    }
    data = root / "test_manifest.jsonl"
    provs = {o.name: collect_provenance(models[o.name], data=data, settings=settings) for o in orgs}
    rep.add_section(
        "Provenance",
        text="Model, code, data and settings behind the lens curves (also in demo.json).",
        tables=[Table(provenance_table(provs), caption="per organism", max_rows=2000)],
    )

    summary = {
        "organisms": {o.name: metrics[o.name].to_json() for o in orgs},
        "table": rows,
        "seconds": round(time.time() - t0, 1),
        "provenance": provs,
    }
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=1))
    path = rep.write(out / "report.html")
    say(f"demo report: {path} ({time.time() - t0:.0f} s)")
    return path


def _describe(o: Organism) -> str:
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


def _knowledge_section(
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
        strength = _peak(metrics[o.name].recall_current[K].mean[1:])[0]
        rows.append(
            {
                "organism": o.name,
                "facts": k.get("n_facts"),
                "accuracy from text": _fmt(k.get("text_acc")),
                "accuracy from speech": _fmt(k.get("speech_acc")),
                f"transcription strength (peak cur@{K})": f"{strength:.3f}",
            }
        )
        if o.saw_speech and o.aux_layer is None and k.get("speech_acc") is not None:
            xs.append(strength)
            ys.append(float(k["speech_acc"]))
    text = (
        "Facts about a small synthetic world appear only in the text training data; the test "
        "plays the prompt in speech and compares the likelihood of the correct and a "
        "counterfactual spoken completion (the paper's Common-Sense Facts Audio setup). "
        "Measured when the organisms were built (organisms/knowledge.py)."
    )
    if len(xs) >= 3 and np.std(xs) > 0 and np.std(ys) > 0:
        r = float(np.corrcoef(xs, ys)[0, 1])
        text += (
            f"\n\nPearson correlation across the emergent organisms: r = {r:.2f} (n = {len(xs)})."
        )
    if rows:
        rep.add_section("Spoken knowledge", text=text, tables=[Table(rows)])


def _asr_section(rep: Report, results: dict[str, Any]) -> None:
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


def _tuned_section(
    rep: Report,
    orgs: Sequence[Organism],
    models: dict[str, SpeechLM],
    test: Sequence[Utterance],
    say: Callable[[str], None],
) -> None:
    from speech_lens.lens.tuned import TunedLens
    from speech_lens.tuned_train import kl_figure, lens_kl

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


def _patching_section(
    rep: Report,
    orgs: Sequence[Organism],
    models: dict[str, SpeechLM],
    utts: Sequence[Utterance],
    out: Path,
    say: Callable[[str], None],
) -> None:
    import plotly.graph_objects as go

    from speech_lens.patching import run_experiment

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
