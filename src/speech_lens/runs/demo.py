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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from speech_lens.data.manifest import read_manifest
from speech_lens.data.prompts import encode_prompt
from speech_lens.data.utterance import Utterance
from speech_lens.files import atomic_write_text
from speech_lens.lens import logit_lens
from speech_lens.lens.metrics import DatasetMetrics
from speech_lens.lens.tables import layer_table
from speech_lens.models.load import SpeechLM, load_model
from speech_lens.models.spec import AdapterError
from speech_lens.provenance import POOLING, collect_provenance, provenance_table
from speech_lens.report.html import Report, Table
from speech_lens.report.lens import compare_figure, lens_heatmap, modality_figure, recall_figure
from speech_lens.runs.demo_minisims import MiniSims, minisims_section
from speech_lens.runs.demo_sections import (
    K,
    Organism,
    SummarySources,
    asr_section,
    curve_peak,
    describe_organism,
    knowledge_section,
    lens_metrics,
    patching_section,
    summary_row,
    summary_sources,
    tuned_section,
)
from speech_lens.runs.demo_u0 import U0Grid, u0_section

REPO_ORGANISMS = Path(__file__).resolve().parents[3] / "organisms"
GRID = ("textinit_interleaved", "textinit_speechonly", "random_interleaved", "random_speechonly")


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


def run_demo(
    out: str | Path,
    *,
    organisms: str | Path | None = None,
    limit: int | None = 150,
    patch_utterances: int = 20,
    minisims_utterances: int = 40,
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
    models, metrics, interleaved = lens_every_organism(orgs, test, progress)
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
    sources = summary_sources(len(test), orgs, results)
    rows = [summary_row(o, metrics[o.name], sources) for o in orgs]
    overview_section(rep, rows, sources, orgs)
    u0 = u0_section(rep, U0Grid.under(root), say)
    comparison_sections(rep, orgs, metrics)
    control_sections(rep, orgs, metrics)
    organism_sections(rep, orgs, metrics, interleaved)
    heatmap_section(rep, orgs, models, test)
    knowledge_section(rep, orgs, metrics, results)
    asr_section(rep, results)
    tuned_section(rep, orgs, models, test, say)
    patching_section(rep, orgs, models, test[:patch_utterances], out, say)
    minisims = minisims_section(
        rep, MiniSims.under(root), metrics, out, say, limit=minisims_utterances
    )
    provs = provenance_section(rep, orgs, models, root / "test_manifest.jsonl", limit)

    summary = {
        "organisms": {o.name: metrics[o.name].to_json() for o in orgs},
        "table": rows,
        "minisims": minisims,
        "u0_grid": u0,
        "seconds": round(time.time() - t0, 1),
        "torch_threads": torch.get_num_threads(),  # the timing above depends on it
        "provenance": provs,
    }
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=1))
    path = rep.write(out / "report.html")
    say(f"demo report: {path} ({time.time() - t0:.0f} s)")
    return path


def lens_every_organism(
    orgs: list[Organism], test: list[Utterance], progress: bool
) -> tuple[dict[str, SpeechLM], dict[str, DatasetMetrics], dict[str, DatasetMetrics]]:
    """Load every organism and lens the test set: (models, speech-only metrics, interleaved
    metrics for the organisms trained on interleaved data)."""
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
    return models, metrics, interleaved


def overview_section(
    rep: Report, rows: list[dict[str, Any]], src: SummarySources, orgs: list[Organism]
) -> None:
    rep.add_section(
        "What this shows",
        text=(
            "Small Llama-architecture speech-text LMs trained on this machine's CPU from real "
            "synthetic speech (Piper TTS, units from k-means on the audio), saved in SpiritLM's "
            "on-disk format. The ablation grid crosses initialisation (a text-pretrained LM vs "
            "random) with data (interleaved speech-text vs speech-only), as in the paper. The "
            "positive control is trained with an auxiliary loss that plants the current word's "
            f"text token at one middle layer through {control_readout(orgs)}, the very readout "
            "the logit lens computes at that row: finding it there validates the plumbing "
            "(hooks, positions, word targets, pooling), not the lens's sensitivity to a signal "
            "the model encodes in some other way, and it is not a replication. "
            "Every number below is measured; small organisms trained for minutes need not show "
            "the paper's effect, and the table says what they show.\n\n"
            "Rows: 0 = embeddings, n = the model's output. Peaks exclude row 0."
        ),
        tables=[
            Table(
                rows,
                caption=(
                    "per organism: lens peaks (speech-only prompts) recomputed here on the "
                    f"held-out utterances of this run [{src.lens}]; gates [{src.gates}] and "
                    f"spoken knowledge [{src.knowledge}] read from organisms/results.json, "
                    "measured when the organisms were built"
                ),
            )
        ],
    )


def control_readout(orgs: list[Organism]) -> str:
    """The planted readout as the lens computes it, e.g. ``lm_head(final_norm(h_3))``."""
    layers = sorted({o.aux_layer for o in orgs if o.aux_layer is not None})
    return " / ".join(f"lm_head(final_norm(h_{n}))" for n in layers) or "lm_head(final_norm(h_L))"


def comparison_sections(
    rep: Report, orgs: list[Organism], metrics: dict[str, DatasetMetrics]
) -> None:
    """The ablation grid, and the longer / one-word interleaved training runs, side by side."""
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


def control_sections(rep: Report, orgs: list[Organism], metrics: dict[str, DatasetMetrics]) -> None:
    """One section per positive control (an organism with a planted layer) next to its twin."""
    control = [o for o in orgs if o.aux_layer is not None]
    for o in control:
        twin = next((t for t in orgs if t.name == "textinit_interleaved"), None)
        shown = [metrics[o.name]] + ([metrics[twin.name]] if twin else [])
        m = metrics[o.name]
        cur, layer = curve_peak(m.recall_current[K].mean[1:])
        rep.add_section(
            f"Positive control: {o.name} (planted at layer {o.aux_layer})",
            text=(
                f"Trained with an auxiliary loss reading the current word through the final norm "
                f"and unembedding at the residual entering block {o.aux_layer} (lens row "
                f"{o.aux_layer}) at speech positions, lm_head(final_norm(h_{o.aux_layer})): the very "
                "readout the logit lens computes at that row, so this validates the plumbing, not "
                f"the lens's sensitivity. The lens finds current-word Recall@{K} = "
                f"{cur:.3f} peaking at row {layer + 1}"
                + (
                    f"; the same recipe without the auxiliary loss ({twin.name}) peaks at "
                    f"{curve_peak(metrics[twin.name].recall_current[K].mean[1:])[0]:.3f}."
                    if twin
                    else "."
                )
            ),
            figures=[recall_figure(shown, ks=[K], which=("current",))],
        )


def organism_sections(
    rep: Report,
    orgs: list[Organism],
    metrics: dict[str, DatasetMetrics],
    interleaved: dict[str, DatasetMetrics],
) -> None:
    """One section per organism: recall and modality curves, the per-layer table."""
    for o in orgs:
        figs = [recall_figure(metrics[o.name]), modality_figure(metrics[o.name])]
        if o.name in interleaved:
            figs.append(recall_figure(interleaved[o.name], ks=[K]))
        rep.add_section(
            f"{o.name}: {o.label}",
            text=describe_organism(o),
            figures=figs,
            tables=[Table(layer_table(metrics[o.name]), caption="speech-only prompts, per layer")],
        )


def heatmap_section(
    rep: Report, orgs: list[Organism], models: dict[str, SpeechLM], test: list[Utterance]
) -> None:
    """The paper's Figure 1 view (layer x position) on a few utterances of one organism."""
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


def provenance_section(
    rep: Report,
    orgs: list[Organism],
    models: dict[str, SpeechLM],
    data: Path,
    limit: int | None,
) -> dict[str, Any]:
    """Model, code, data and settings behind the lens curves, per organism (also returned)."""
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
    provs = {o.name: collect_provenance(models[o.name], data=data, settings=settings) for o in orgs}
    rep.add_section(
        "Provenance",
        text="Model, code, data and settings behind the lens curves (also in demo.json).",
        tables=[Table(provenance_table(provs), caption="per organism", max_rows=2000)],
    )
    return provs
