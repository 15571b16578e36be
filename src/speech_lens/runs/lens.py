"""Run the word-level lens over a data set: progress bar, per-utterance resume, atomic outputs.

``out_dir/partial.jsonl`` holds a header line (the run's settings) and one
:class:`~speech_lens.metrics.UtteranceRecord` per finished utterance, appended and fsynced as
soon as it is done. A rerun with the same settings skips the utterances already there; a torn
last line (a crash mid-write) is dropped. At the end ``metrics.json``, ``layers.csv``,
``words.csv`` and ``report.html`` are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from speech_lens.batching import plan_batches
from speech_lens.data.word_targets import (
    WORD_PIECE_RULE,
    bare_form_is_spaced,
    word_targets,
)
from speech_lens.files import atomic_write_text
from speech_lens.lens.logit import logit_lens, word_lens_batch
from speech_lens.lens.metrics import DatasetMetrics, aggregate
from speech_lens.lens.numerics import readout_settings
from speech_lens.lens.records import UtteranceRecord, utterance_record
from speech_lens.lens.rows import describe_rows
from speech_lens.lens.tables import layer_table, word_table
from speech_lens.lens.tuned import lens_from_spec
from speech_lens.provenance import POOLING, collect_provenance, provenance_rows, stable
from speech_lens.report.html import Report, Table
from speech_lens.report.lens import lens_heatmap, modality_figure, recall_figure
from speech_lens.runs.lens_settings import (
    LensRunConfig,
    encode_for_lens,
    lens_utterances,
    prior_setting,
    training_prior,
)

PARTIAL = "partial.jsonl"


class RunError(RuntimeError):
    """A run directory that cannot be resumed with these settings."""


def read_partial(
    path: Path, cfg: LensRunConfig, *, repair: bool = True
) -> dict[str, UtteranceRecord]:
    """Records already finished in ``path``; refuses other settings. A torn last line is
    skipped, and with ``repair`` also dropped from the file (a dry run reads without writing)."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    good: list[str] = []
    done: dict[str, UtteranceRecord] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # the last line: a write cut short by a crash
                break
            raise RunError(
                f"{path}: line {i + 1} is not valid JSON (not a torn last line)"
            ) from None
        if i == 0:
            if obj.get("header") != cfg.resume_key():
                raise RunError(
                    f"{path} was written with other settings {obj.get('header')}; "
                    f"these are {cfg.resume_key()} (differing: "
                    f"{', '.join(_differing(obj.get('header'), cfg.resume_key()))}). "
                    "Use another --out or --restart."
                )
        else:
            rec = UtteranceRecord.from_json(obj)
            done[rec.utterance_id] = rec
        good.append(line)
    if repair and len(good) != sum(1 for ln in lines if ln.strip()):
        atomic_write_text(path, "".join(g + "\n" for g in good))
    return done


def _differing(header: Any, key: dict[str, Any]) -> list[str]:
    """The resume-key fields whose values differ (a missing field counts as differing)."""
    old = header if isinstance(header, dict) else {}
    return [n for n in dict.fromkeys([*old, *key]) if old.get(n, ...) != key.get(n, ...)]


def _append(path: Path, obj: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def lens_batch(
    model: Any,
    prompts: Sequence[Any],
    utts: Sequence[Any],
    cfg: LensRunConfig,
    lens: Any,
    padding_side: str = "right",
) -> list[Any]:
    """The word lens of one batch, as a run computes it (``run_dataset`` and its dry run)."""

    # positions="speech": the records read unit positions only (same records, fewer unembeds)
    return word_lens_batch(
        model,
        list(prompts),
        [word_targets(model, u) for u in utts],
        k=cfg.k,
        lens=lens,
        layers=cfg.rows(model.n_layers),
        positions="speech",
        padding_side=padding_side,
        zero_unit_words=cfg.zero_unit_words,
    )


def run_dataset(
    model: Any,
    utterances: Iterable[Any],
    out_dir: str | Path,
    cfg: LensRunConfig,
    *,
    restart: bool = False,
    progress: bool = True,
    on_record: Callable[[UtteranceRecord], None] | None = None,
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    padding_side: str = "right",
) -> DatasetMetrics:
    """Lens every utterance (resuming), then write metrics, CSVs and the HTML report.

    ``batch_size``: utterances per forward pass (padded on ``padding_side``), or ``"auto"`` to
    size each batch from ``memory_budget_gb`` (default: the memory free now) for its longest
    prompt. Batches group similar lengths, longest first; records are appended after each batch,
    and resume per utterance as before. The records do not depend on the batch size (up to
    float summation order), so it is not part of the resume key. A resumed run with the same
    batch plan (same ``batch_size``; for ``"auto"`` the same ``memory_budget_gb``) writes the
    uninterrupted run's records and outputs byte for byte.
    """

    cfg.rows(model.n_layers)  # a selection that does not fit the model: refused before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL
    if restart:
        partial.unlink(missing_ok=True)
    done = read_partial(partial, cfg)
    if not partial.exists():
        atomic_write_text(partial, json.dumps({"header": cfg.resume_key()}) + "\n")
    utts = list(utterances)
    if cfg.limit is not None:
        utts = utts[: cfg.limit]
    utts = lens_utterances(utts, cfg)  # the scrambled-word-order control, if asked for
    seen: set[str] = set()
    for u in utts:
        if u.id in seen:
            raise RunError(f"{cfg.data}: utterance id {u.id!r} appears twice")
        seen.add(u.id)
    finished = set(done)
    lens = lens_from_spec(cfg.lens, model)
    bar = tqdm(
        total=len(utts),
        initial=len(finished & seen),
        desc="lens",
        unit="utt",
        disable=not progress,
    )
    # batches are planned over all utterances, so a resumed run rebuilds the uninterrupted run's
    # batches (same padding, same float sums: the same records, bit for bit); a batch cut short
    # is recomputed whole and only its missing records are appended
    prompts = [encode_for_lens(model, u, cfg) for u in utts]
    if batch_size == 1:
        plan = [[i] for i in range(len(utts)) if utts[i].id not in finished]  # input order
    else:
        plan = plan_batches(
            model, [len(p) for p in prompts], batch_size, memory_budget_gb=memory_budget_gb
        )
    for idx in plan:
        if all(utts[i].id in finished for i in idx):
            continue
        results = lens_batch(
            model, [prompts[i] for i in idx], [utts[i] for i in idx], cfg, lens, padding_side
        )
        for i, res in zip(idx, results, strict=True):
            if utts[i].id in finished:
                continue
            rec = utterance_record(res, prompts[i], model.layout)
            _append(partial, rec.to_json())
            done[utts[i].id] = rec
            if on_record is not None:
                on_record(rec)
            bar.update(1)
    bar.close()
    records = [done[u.id] for u in utts]
    if not records:
        raise RunError(f"{cfg.data}: no utterances to analyse")
    metrics = aggregate(
        records,
        match=cfg.match,
        ks=cfg.ks,
        n_boot=cfg.n_boot,
        seed=cfg.seed,
        label=Path(cfg.checkpoint).name,
        zero_unit_words=cfg.zero_unit_words,
        prior=training_prior(model, cfg),
    )
    write_outputs(model, out, cfg, metrics, records, utts[0])
    return metrics


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def write_outputs(
    model: Any,
    out: Path,
    cfg: LensRunConfig,
    metrics: DatasetMetrics,
    records: Sequence[UtteranceRecord],
    first: Any,
) -> None:

    layers = layer_table(metrics)
    words = word_table(records, match=cfg.match, tokenizer=model.tokenizer)
    # what `speech-lens compare` requires to be equal across models (model identity aside)
    settings = {
        "mode": cfg.mode,
        "k": cfg.k,
        "ks": list(metrics.ks),
        "match": metrics.match,
        "word_pieces": WORD_PIECE_RULE,
        "pooling": POOLING,
        "ranking": "text ids",
        "limit": cfg.limit,
        "n_boot": metrics.n_boot,
        "seed": metrics.seed,
        "ci": metrics.ci,
        "bootstrap_unit": metrics.bootstrap_unit,
        **cfg.span_settings(),
        "zero_unit_words": metrics.zero_unit_words,
        **readout_settings(),
        "layers": list(metrics.layers),  # the rows read; `compare` lines them up by depth
        "scramble_words": cfg.scramble_words,  # `compare` refuses a control beside a plain run
        "prior": prior_setting(cfg),
    }
    prov = collect_provenance(model, data=cfg.data, lens=cfg.lens, settings=settings)
    # a property of the model, not a setting: `compare` reads it to tell which match rules
    # compare across tokenizer kinds (bare = spaced under SentencePiece's dummy prefix)
    prov["model"]["bare_form_is_spaced"] = bare_form_is_spaced(model.tokenizer)
    info = {
        "config": asdict(cfg),
        "model": model.describe(),
        # no timestamp: a rerun (or a torchrun merge) writes byte-identical metrics.json
        "provenance": stable(prov),
        "metrics": metrics.to_json(),
    }
    atomic_write_text(out / "metrics.json", json.dumps(info, indent=2, ensure_ascii=False))
    atomic_write_text(out / "layers.csv", _csv(layers))
    atomic_write_text(out / "words.csv", _csv(words))
    rep = build_report(model, cfg, metrics, layers, words, first)
    rep.add_section(
        "Provenance",
        text="Model, code, lens, data and settings behind these numbers (also in metrics.json).",
        tables=[Table(provenance_rows(prov), caption="provenance", max_rows=1000)],
    )
    rep.write(out / "report.html")


def build_report(
    model: Any,
    cfg: LensRunConfig,
    metrics: DatasetMetrics,
    layers: Sequence[dict[str, Any]],
    words: Sequence[dict[str, Any]],
    first: Any,
) -> Report:
    k = cfg.k if cfg.k in metrics.ks else max(metrics.ks)
    best, i = peak_layer(metrics, k)
    rep = Report(
        f"speech_lens {'logit lens' if cfg.lens == 'logit' else 'tuned lens'}: "
        f"{Path(cfg.checkpoint).name}",
        subtitle=f"family {cfg.family}, {cfg.mode} prompts, lens {cfg.lens}, data {cfg.data}",
    )
    rep.add_section(
        "Summary",
        text=(
            f"{metrics.n_utterances} utterances, {metrics.n_words} spoken words "
            f"({metrics.n_next_words} with a next word), {metrics.n_speech_positions} unit "
            f"positions; {model.n_layers} layers (row 0 = embeddings, row {model.n_layers} = "
            f"the model's output); lens rows read: "
            f"{describe_rows(metrics.layers, model.n_layers + 1)}.\n\n"
            f"{_zero_unit_text(metrics)}\n\n"
            f"Word matching rule: {metrics.match} (first sub-token, spaced or bare form, unless "
            "the rule says otherwise; a lone leading word-boundary piece ▁ / Ġ is skipped). "
            "Lens logits (final norm and unembedding in float32) are "
            "max-pooled over each spoken word's unit positions and ranked over text ids; a tie "
            "counts against the target. "
            f"Confidence bands: {int(metrics.ci * 100)}% percentile bootstrap over utterances, "
            f"{metrics.n_boot} draws, seed {metrics.seed}.\n\n"
            f"Current-word Recall@{k} peaks at layer {best}: "
            f"{metrics.recall_current[k].mean[i]:.3f} "
            f"[{metrics.recall_current[k].lo[i]:.3f}, {metrics.recall_current[k].hi[i]:.3f}]."
            + _scramble_text(cfg)
        ),
    )
    rep.add_section(
        "Implicit transcription and next-word prediction",
        text=RECALL_TEXT + f" The priors are fit on: {metrics.prior_source or 'not computed'}.",
        figures=[recall_figure(metrics)],
    )
    rep.add_section(
        "Modality preference",
        text=(
            "Probability mass at unit positions, per layer, on speech units, text ids, modality "
            "markers and other ids (BOS/EOS/control); dotted: share of positions whose top-1 "
            "over the whole vocabulary is a unit."
        ),
        figures=[modality_figure(metrics)],
    )
    prompt = encode_for_lens(model, first, cfg)
    lens = lens_from_spec(cfg.lens, model)
    res = logit_lens(model, prompt.tokens, k=5, lens=lens, layers=cfg.rows(model.n_layers))
    rep.add_section(
        f"One utterance: {first.id}",
        text="Top text token per layer and position; colour: probability mass on speech units.",
        figures=[lens_heatmap(res, model.tokenizer, prompt=prompt)],
    )
    rep.add_section("Per-layer table", tables=[Table(layers, caption="layers.csv")])
    rep.add_section(
        "Per-word drill-down",
        tables=[Table(words, caption="words.csv (first rows)", max_rows=300)],
    )
    return rep


def peak_layer(metrics: DatasetMetrics, k: int) -> tuple[int, int]:
    """(lens row, index into the curves) where current-word Recall@k peaks."""
    curve = metrics.recall_current[k].mean
    i = max(range(len(metrics.layers)), key=lambda j: curve[j])
    return metrics.layers[i], i


RECALL_TEXT = (
    "Recall@k per layer of the spoken word (solid) and the next word (dashed), each with its "
    "baselines in its colour (where the run computed them). Frequency prior (flat, long "
    "dash-dot): a readout that ignores its input and always lists the same k text ids, those "
    "that hit the most words of the other utterances (leave one utterance out) or of a training "
    "manifest (--prior-manifest); greedy, so one word's spaced and bare forms do not take two "
    "slots. Mismatched-word baseline (dash-dot, "
    "current word): the same pooled top-k scored against another word of the data set. First "
    "unit only (dotted) / last unit only (long dashes): current-word Recall@k read at the "
    "word's first or last unit position alone; at a word's onset the next token in text space "
    "is the current word, so a readout that scores on the first unit may predict the word from "
    "its context rather than hear it."
)


def _scramble_text(cfg: LensRunConfig) -> str:
    if cfg.scramble_words is None:
        return ""
    return (
        f"\n\nControl: word order scrambled (--scramble-words {cfg.scramble_words}). Each "
        "utterance's words were shuffled, each word's units moving with it, so words sound as "
        "before in another context: next-word Recall@k should fall toward its frequency prior, "
        "current-word Recall@k (transcription) should not."
    )


def _zero_unit_text(metrics: DatasetMetrics) -> str:
    """The report's line on spoken words that got no unit position."""
    n = metrics.n_words_without_units
    how = {
        "skip": "left out of Recall@k",
        "miss": "counted as misses in Recall@k (current and next word)",
    }.get(metrics.zero_unit_words, "refused")
    return (
        f"Spoken words with no unit position: {n} (policy {metrics.zero_unit_words}: {how}; "
        "a word's units are those whose end time falls in (word start, word end])."
    )


def parse_batch_size(value: Any) -> int | str:
    """``--batch-size``: a positive integer or ``auto``."""
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(f"--batch-size {value!r}: a positive integer or 'auto'")
    return n
