"""``speech-lens compare RUN_DIR... --out DIR``: lens runs of several models on one depth axis.

Each run directory is the output of ``speech-lens lens`` (its ``metrics.json`` holds the
provenance and the metrics). The runs are compared only when everything but the model is the
same: data set hash, lens kind, every recorded setting (mode, k, ks, match rule, pooling,
limit, seed, n_boot, ...) and the package versions. Differences that are intended are named with
``--allow FIELD[,FIELD]`` (``--allow versions`` allows every package version); all others are
refused with the differing values per run. The model identity (checkpoint hash, family,
geometry) is expected to differ and is not compared, nor are the lens rows a run read
(``--layer-stride`` / ``--layers``): a strided run's curves are sampled at fewer depths (each
row at its true index), not computed differently.

Across tokenizer kinds the match rule must be ``first-spaced`` (``CROSS_FAMILY_MATCH``): under
SentencePiece's dummy prefix (SpiritLM, SpeechGPT) a bare word is tokenized as its spaced form,
so ``first`` offers one candidate token per word there and two on byte-level BPE (SIMS), and
``first-bare`` / ``any`` compare different forms. Runs whose tokenizers differ so (the
``bare_form_is_spaced`` a lens run records; the family when a run predates it) are refused under any
other rule unless ``--allow match``.

Writes ``compare.html`` (a :class:`~speech_lens.report.Report`), ``compare.csv`` (one row per
model and layer, with relative depth ``layer / n_layers``) and ``compare.json`` (every run's
provenance and the differences that were allowed).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from speech_lens.files import atomic_write_text
from speech_lens.lens.metrics import Curve, DatasetMetrics
from speech_lens.lens.rows import describe_rows
from speech_lens.provenance import FORMAT, provenance_table
from speech_lens.report.compare import QUANTITIES, depth_figure
from speech_lens.report.html import Report, Table

CROSS_FAMILY_MATCH = "first-spaced"
# settings recorded but not compared: the lens rows a run read (``--layer-stride`` / ``--layers``)
# change where its curves are sampled, not their values; the runs line up on relative depth
SAMPLING_SETTINGS = ("layers",)


class CompareError(ValueError):
    """Runs that cannot be compared; the message names the run directory or the field."""


@dataclass(frozen=True)
class Run:
    """One lens run directory as read back from its ``metrics.json``."""

    dir: Path
    label: str
    provenance: dict[str, Any]
    metrics: DatasetMetrics

    @property
    def k(self) -> int:
        """The run's own Recall@k (its ``--k``), else the largest k it computed."""
        k = self.provenance["settings"].get("k")
        return int(k) if k in self.metrics.ks else max(self.metrics.ks)


@dataclass(frozen=True)
class Comparison:
    runs: list[Run]
    fields: dict[str, list[Any]]  # compared field -> value per run
    allowed: dict[str, list[Any]]  # the differing fields that were allowed
    rows: list[dict[str, Any]]
    figures: dict[str, go.Figure]


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], DatasetMetrics]:
    """(provenance, metrics) of a ``speech-lens lens`` output directory."""
    d = Path(run_dir)
    path = d / "metrics.json"
    if not path.is_file():
        raise CompareError(f"{d}: no metrics.json (not a `speech-lens lens` output directory)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CompareError(f"{path} is not valid JSON: {e}") from None
    prov = info.get("provenance")
    if not isinstance(prov, dict):
        raise CompareError(
            f"{path} has no provenance: it was written by an older speech_lens. Rerun "
            f"`speech-lens lens CHECKPOINT DATA --out {d}` with the same settings (finished "
            "utterances are reused from partial.jsonl; only the outputs are rewritten)."
        )
    if prov.get("format") != FORMAT:
        raise CompareError(f"{path}: provenance format {prov.get('format')!r}, expected {FORMAT}")
    for key in ("model", "versions", "lens", "settings"):
        if key not in prov:
            raise CompareError(f"{path}: provenance has no {key!r} field")
    try:
        metrics = DatasetMetrics.from_json(info["metrics"])
    except (KeyError, TypeError) as e:
        raise CompareError(f"{path}: field 'metrics' is not a lens run's metrics ({e})") from None
    return prov, metrics


def compared_fields(prov: dict[str, Any]) -> dict[str, Any]:
    """The fields that must match across runs: data, lens kind, settings, package versions."""
    data = prov.get("data") or {}
    return {
        # an in-memory data set has no hash: then its name has to match
        "data": data.get("sha256") or data.get("path"),
        "lens": prov["lens"].get("kind"),
        **{k: v for k, v in prov["settings"].items() if k not in SAMPLING_SETTINGS},
        **{f"versions.{k}": v for k, v in prov["versions"].items()},
    }


def _labels(provs: Sequence[dict[str, Any]], dirs: Sequence[Path]) -> list[str]:
    names = [Path(p["model"]["path"]).name for p in provs]
    labels = [
        n if names.count(n) == 1 else f"{n} ({d.name})" for n, d in zip(names, dirs, strict=True)
    ]
    return [lab if labels.count(lab) == 1 else f"{lab} #{i + 1}" for i, lab in enumerate(labels)]


def _check(
    runs: Sequence[Run], allow: Iterable[str]
) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    per_run = [compared_fields(r.provenance) for r in runs]
    names = list(dict.fromkeys(k for f in per_run for k in f))
    fields = {n: [f.get(n) for f in per_run] for n in names}
    allow = [a.strip() for a in allow if a.strip()]
    unknown = [a for a in allow if not any(n == a or n.startswith(a + ".") for n in names)]
    if unknown:
        raise CompareError(
            f"--allow names unknown field(s) {', '.join(unknown)}; fields: {', '.join(names)}"
        )

    def allowed(name: str) -> bool:
        return any(name == a or name.startswith(a + ".") for a in allow)

    differ = {n: v for n, v in fields.items() if any(x != v[0] for x in v)}
    refused = {n: v for n, v in differ.items() if not allowed(n)}
    if refused:
        lines = [
            f"  {n}: " + ", ".join(f"{x!r} ({r.dir})" for x, r in zip(v, runs, strict=True))
            for n, v in refused.items()
        ]
        raise CompareError(
            "the runs differ in settings that must match for a comparison:\n"
            + "\n".join(lines)
            + f"\nif these differences are intended, pass --allow {','.join(refused)} "
            f"(Python: allow={list(refused)!r})"
        )
    return fields, {n: v for n, v in differ.items() if allowed(n)}


def _check_match_across_tokenizers(
    runs: Sequence[Run],
    fields: dict[str, list[Any]],
    allowed: dict[str, list[Any]],
    allow: Iterable[str],
) -> dict[str, list[Any]]:
    """Refuse a match rule other than ``first-spaced`` across tokenizer kinds (module doc);
    with ``--allow match`` the rule is returned as an allowed difference."""
    models = [r.provenance["model"] for r in runs]
    if all("bare_form_is_spaced" in m for m in models):
        kinds = [str(m["bare_form_is_spaced"]) for m in models]
    else:  # a run of an older speech_lens: one tokenizer kind per family, conservatively
        kinds = [f"family {m.get('family')}" for m in models]
    rules = fields.get("match", [])
    if len(set(kinds)) <= 1 or set(rules) == {CROSS_FAMILY_MATCH} or "match" in allowed:
        return {}
    if "match" in [a.strip() for a in allow]:
        return {"match": rules}
    form = {"True": "bare form = spaced form", "False": "bare form separate"}
    lines = [
        f"  {r.dir}: match {rule!r}, {form.get(k, k)}"
        for r, rule, k in zip(runs, rules, kinds, strict=True)
    ]
    raise CompareError(
        "the runs' tokenizers differ in how they write a bare word, so their word targets "
        "differ under the match rule used:\n"
        + "\n".join(lines)
        + f"\nunder 'first' a word has one candidate token where the bare form = the spaced form "
        f"(SentencePiece dummy prefix: SpiritLM, SpeechGPT) and two on byte-level BPE (SIMS). "
        f"Compare across these with --match {CROSS_FAMILY_MATCH}: rerun `speech-lens lens "
        f"CHECKPOINT DATA --out RUN --match {CROSS_FAMILY_MATCH}` on each run directory "
        "(finished utterances are reused, only the scores are recomputed), or pass --allow match"
    )


def run_curves(m: DatasetMetrics, k: int) -> dict[str, Curve | None]:
    """Every compare.csv curve of one run at its ``k``: the quantities, then the Recall@k
    baselines (None where the run did not compute one: first / last-unit recall, mismatched-word
    baseline and frequency priors are absent from runs written before them)."""
    out: dict[str, Curve | None] = {}
    for q, (_, get) in QUANTITIES.items():
        try:
            out[q] = get(m, k)
        except KeyError:
            out[q] = None
    out["recall_current_mismatched"] = m.recall_mismatched.get(k)
    out["recall_current_prior"] = m.recall_prior_current.get(k)
    out["recall_next_prior"] = m.recall_prior_next.get(k)
    return out


def table_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per model and layer: relative depth, Recall@k and its baselines with bands,
    masses (empty where a run did not compute a curve)."""
    rows = []
    for r in runs:
        m, k = r.metrics, r.k
        curves = run_curves(m, k)
        for i, layer in enumerate(m.layers):  # i: index into the curves
            row: dict[str, Any] = {
                "model": r.label,
                "family": r.provenance["model"].get("family"),
                "n_layers": m.n_layers,
                "layer": layer,
                "relative_depth": layer / m.n_layers,
                "k": k,
            }
            for q, c in curves.items():
                row[q], row[f"{q}_lo"], row[f"{q}_hi"] = (
                    (c.mean[i], c.lo[i], c.hi[i]) if c is not None else (None, None, None)
                )
            rows.append(row)
    return rows


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def compare_runs(
    run_dirs: Sequence[str | Path], *, allow: Iterable[str] = (), out: Path | None = None
) -> Comparison:
    """Read the runs, refuse unintended setting differences, and (with ``out``) write
    ``compare.html``, ``compare.csv`` and ``compare.json``."""
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise CompareError(f"compare needs at least two run directories, got {len(dirs)}")
    loaded = [load_run(d) for d in dirs]
    labels = _labels([p for p, _ in loaded], dirs)
    runs = [Run(d, lab, p, m) for d, lab, (p, m) in zip(dirs, labels, loaded, strict=True)]
    fields, allowed = _check(runs, allow)
    allowed.update(_check_match_across_tokenizers(runs, fields, allowed, allow))
    rows = table_rows(runs)
    # a quantity no run computed (first / last-unit recall of older runs) gets no figure
    shown = [q for q in QUANTITIES if any(run_curves(r.metrics, r.k)[q] for r in runs)]
    figures = {q: depth_figure([(r.label, r.metrics, r.k) for r in runs], q) for q in shown}
    cmp = Comparison(runs, fields, allowed, rows, figures)
    if out is not None:
        write_comparison(cmp, Path(out))
    return cmp


def write_comparison(cmp: Comparison, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "runs": [
            {"dir": str(r.dir.resolve()), "label": r.label, "provenance": r.provenance}
            for r in cmp.runs
        ],
        "compared": {n: v[0] for n, v in cmp.fields.items() if n not in cmp.allowed},
        "allowed_differences": {
            n: {r.label: x for r, x in zip(cmp.runs, v, strict=True)}
            for n, v in cmp.allowed.items()
        },
    }
    atomic_write_text(out / "compare.json", json.dumps(info, indent=2, ensure_ascii=False))
    atomic_write_text(out / "compare.csv", _csv(cmp.rows))
    build_report(cmp).write(out / "compare.html")


def build_report(cmp: Comparison) -> Report:
    runs = cmp.runs
    rep = Report(
        f"speech_lens compare: {len(runs)} models",
        subtitle=", ".join(r.label for r in runs),
    )
    rep.add_section(
        "Runs",
        text=(
            "x axes are relative depth, layer / n_layers (0 = embeddings, 1 = the model's "
            "output), so models with different layer counts share one axis. Bands: each run's "
            "bootstrap confidence interval over utterances. Recall@k figures carry each run's "
            "baselines in its colour where the run computed them: the mismatched-word baseline "
            "(dash-dot, current word) and the frequency prior (flat, long dash-dot: a fixed "
            "top-k of the data set's most frequent words, fit leaving each utterance out)."
        ),
        tables=[
            [
                {
                    "model": r.label,
                    "family": r.provenance["model"].get("family"),
                    "n_layers": r.metrics.n_layers,
                    "lens rows read": describe_rows(r.metrics.layers, r.metrics.n_layers + 1),
                    "checkpoint sha256": str(r.provenance["model"].get("sha256"))[:16],
                    "lens": r.provenance["lens"].get("kind"),
                    "k": r.k,
                    "utterances": r.metrics.n_utterances,
                    "words": r.metrics.n_words,
                    "run": str(r.dir),
                }
                for r in runs
            ]
        ],
    )
    same = [{"field": n, "value": v[0]} for n, v in cmp.fields.items() if n not in cmp.allowed]
    diff = [
        {"field": n, **{r.label: x for r, x in zip(runs, v, strict=True)}}
        for n, v in cmp.allowed.items()
    ]
    rep.add_section(
        "Settings",
        text=(
            "Equal in every run (checked):"
            + ("\n\nDifferences allowed with --allow are listed below." if diff else "")
        ),
        tables=[Table(same, caption="equal settings")]
        + ([Table(diff, caption="allowed differences")] if diff else []),
    )
    for q, fig in cmp.figures.items():
        rep.add_section(QUANTITIES[q][0], figures=[fig])
    rep.add_section(
        "Per-layer table", tables=[Table(cmp.rows, caption="compare.csv", max_rows=500)]
    )
    table = provenance_table({r.label: r.provenance for r in runs})
    rep.add_section("Provenance", tables=[Table(table, caption="per run", max_rows=2000)])
    return rep
