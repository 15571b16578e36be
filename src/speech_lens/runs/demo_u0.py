"""The demo's U0-grid section: issue 17's 7M-parameter organisms, read by the pre-registered rule.

The organisms (``scripts/organisms_u0.toml``: d 256 x 8 layers, idealised phoneme units with a
unit-noise dose p) are measured at build time by ``scripts/u0_grid.py``: ``speech-lens lens`` on
the 300 held-out clauses (plain and with scrambled word order), the gates and spoken knowledge,
and the E1-E3 reading of ``speech_lens.report.criteria``. This section reads those artifacts
(``organisms/u0/``) and draws the grid table, the dose-response figure with its pre-registered
Spearman test, the modality-mass profiles, the controls and knowledge vs transcription.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from speech_lens.report import criteria, grid
from speech_lens.report.html import Report

K = 5  # the pre-registered k


@dataclass(frozen=True)
class U0Grid:
    """What the section needs from ``organisms/u0/``."""

    root: Path

    @classmethod
    def under(cls, organisms_root: Path) -> U0Grid:
        return cls(Path(organisms_root) / "u0")

    def results(self) -> dict[str, Any]:
        path = self.root / "results.json"
        return json.loads(path.read_text()).get("organisms", {}) if path.exists() else {}

    def names(self) -> list[str]:
        """The measured organisms, text LM first, then text-init cells (interleaved 0.6 by
        stage-2 tokens, p and seed; then the other data), then random init, then the planted
        controls."""
        results = self.results()
        names = [n for n in results if (self.root / n / "lens" / "layers.csv").exists()]

        def order(n: str) -> tuple:
            c = cell_of(n, results[n]["config"])
            rank = {"never heard speech": 0, "": 1}.get(c.control, 2)
            return (
                rank,
                c.init != "text",
                c.data != "interleaved 0.6",
                c.tokens,
                c.data,
                c.p,
                c.seed,
                n,
            )

        return sorted(names, key=order)

    def layers(self, name: str, run: str = "lens") -> list[criteria.Row]:
        return criteria.read_layers(self.root / name / run / "layers.csv")

    def hits(self, name: str) -> grid.WordHits:
        words = self.root / name / "lens" / "words.csv.gz"  # shipped compressed
        return grid.read_word_hits(words if words.exists() else words.with_suffix(""), k=K)


@dataclass(frozen=True)
class Cell:
    name: str
    init: str  # "text" | "random"
    data: str  # "interleaved 0.6" | "speech only" | ...
    p: float
    seed: int
    control: str  # "" | "planted" | "rotated" | "never heard speech"
    tokens: int  # trained in this run (stage 2 for text init)

    @property
    def registered(self) -> bool:
        """A cell of the pre-registered grid: not a control, ~2M stage-2 tokens."""
        return not self.control and self.tokens == criteria.REGISTERED_STAGE2_TOKENS

    @property
    def data_label(self) -> str:
        """``data``, with the token count where it differs from the grid's (exploratory runs)."""
        if self.control or self.tokens == criteria.REGISTERED_STAGE2_TOKENS:
            return self.data
        return f"{self.data}, {self.tokens / 1e6:.1f}M tokens"


def cell_of(name: str, config: dict[str, Any]) -> Cell:
    mix = config.get("mix", {})
    data = "speech only" if set(mix) == {"speech"} else f"interleaved {mix.get('interleaved', 0):g}"
    control = ""
    if set(mix) == {"text"}:
        data, control = "text only", "never heard speech"
    elif config.get("aux_layer") is not None and config.get("aux_weight", 0) > 0:
        control = "rotated" if config.get("aux_rotation_seed") is not None else "planted"
    init = "random" if config.get("init", "random") == "random" else "text"
    tokens = config["steps"] * config["batch"] * config["seq_len"]
    p, seed = float(config.get("unit_noise", 0.0)), config.get("seed", 0)
    return Cell(name, init, data, p, seed, control, tokens)


def _ci(r: criteria.Row, key: str) -> str:
    return f"{r[key]:.3f} [{r[key + '_lo']:.3f}, {r[key + '_hi']:.3f}]"


def _probe(gates: dict[str, Any]) -> str:
    """Best mid row (1..L-1, as the lens columns) of the ridge probe fit on text positions,
    applied at spoken words' last units."""
    acc = gates.get("probe", {}).get("text_fit_on_speech")
    if not acc or len(acc) < 3:
        return "–"
    best = max(range(1, len(acc) - 1), key=acc.__getitem__)
    return f"{acc[best]:.3f} ({best})"


def _verdict_detail(reading: dict[str, Any]) -> str:
    """What holds behind the verdict: E1's kind, or E2 alone (which the rule calls a null)."""
    if reading["e1"]["holds"]:
        return f" ({reading['e1_kind']})"
    return " (E2 holds, E1 fails)" if reading["e2"]["holds"] else ""


def table_row(cell: Cell, measured: dict[str, Any], rows: list[criteria.Row]) -> dict[str, Any]:
    rd = measured["reading"]
    kind = f"{cell.control} control; " if cell.control else ""
    at = next(i for i, r in enumerate(rows) if int(r["layer"]) == rd["peak_row"])
    g = measured["gates"]
    sp, tx = g["next_word_after_speech_prefix"], g["next_word_after_text_prefix"]
    ratio = f"{sp / tx:.2f}" if tx > 0 else "–"
    return {
        "organism": cell.name,
        "init": cell.init,
        "data": cell.data_label,
        "p": f"{cell.p:g}",
        "seed": cell.seed,
        "G2 speech/text next word": f"{sp:.3f} / {tx:.3f} ({ratio})",
        "L_units": rd["l_units"] if rd["l_units"] is not None else "none",
        f"peak current @{K} (row)": f"{_ci(rows[at], f'recall@{K}_current')} ({rd['peak_row']})",
        "last unit @ peak": f"{rows[at][f'recall@{K}_last_unit']:.3f}",
        "prior / mismatched @ peak": f"{rows[at][f'recall@{K}_current_prior']:.3f} / "
        f"{rows[at][f'recall@{K}_mismatched']:.3f}",
        "text probe at last unit (row)": _probe(g),
        "verdict": kind + rd["verdict"] + _verdict_detail(rd),
        "spoken knowledge": f"{measured['knowledge']['speech_acc']:.3f}",
    }


def u0_section(rep: Report, u0: U0Grid, say: Callable[[str], None]) -> dict[str, Any]:
    """Add the U0 grid's sections to ``rep`` from the shipped artifacts; return the numbers."""
    results = u0.results()
    names = u0.names()
    if not names:
        say(f"U0 grid: no measured organisms under {u0.root}, section skipped")
        return {}
    cells = {n: cell_of(n, results[n]["config"]) for n in names}
    rows = {n: u0.layers(n) for n in names}
    table = [table_row(cells[n], results[n], rows[n]) for n in names]
    registered = [n for n in names if cells[n].registered]
    dose_cells = [
        n for n in registered if cells[n].init == "text" and cells[n].data == "interleaved 0.6"
    ]
    hits = {n: u0.hits(n) for n in registered}
    out: dict[str, Any] = {"cells": table}
    figures = []
    doses = [cells[n].p for n in dose_cells]
    if len(set(doses)) > 1:
        dose = grid.dose_response(doses, [hits[n].current for n in dose_cells])
        verdict = criteria.dose_verdict(doses, dose.lo, dose.hi)
        out["dose_response"] = {**asdict(dose), "verdict": verdict}
        figures.append(grid.dose_figure([(cells[n].p, n, rows[n]) for n in dose_cells], k=K))
    token_runs = [  # the headline cell at more stage-2 tokens (exploratory)
        n for n in names if not cells[n].control and cells[n].init == "text"
        and cells[n].data == "interleaved 0.6" and (cells[n].p, cells[n].seed) == (0, 0)
    ]  # fmt: skip
    if len({cells[n].tokens for n in token_runs}) > 1:
        runs = [(cells[n].tokens / 1e6, n, rows[n]) for n in token_runs]
        figures.append(grid.dose_figure(runs, k=K, axis="stage-2 tokens (millions)"))
    shown = mass_shown(cells)  # drawn first, so they get distinct colours
    ordered = sorted(names, key=lambda n: n not in shown)
    figures.append(grid.mass_figure([(n, rows[n]) for n in ordered], shown=shown))
    if len(registered) > 2:
        know = grid.knowledge_correlation(
            [results[n]["knowledge"]["speech_correct"] for n in registered],
            [hits[n].current for n in registered],
        )
        out["knowledge_vs_transcription"] = asdict(know)
        points = [(n, results[n]["knowledge"]["speech_correct"], rows[n]) for n in registered]
        figures.append(grid.knowledge_figure(points, know, k=K))
    out["controls"] = [
        control_line(u0, n, results[n]) for n in names if cells[n].control in ("planted", "rotated")
    ]
    rep.add_section(
        "Issue 17's grid: 7M-parameter organisms with idealised phoneme units (U0)",
        text="\n\n".join([grid_text(out, results, names), *out["controls"]]),
        figures=figures,
        tables=[table],
    )
    say(f"U0 grid: {len(names)} organisms read from {u0.root}")
    return out


def mass_shown(cells: dict[str, Cell]) -> set[str]:
    """The mass profiles drawn at first: the text LM and the seed-0 interleaved-0.6 organisms at
    p = 0 and 0.5 (text and random init, any length); the others start hidden."""
    return {
        n for n, c in cells.items() if c.seed == 0 and c.p in (0.0, 0.5)
        and (c.control == "never heard speech" or (not c.control and c.data == "interleaved 0.6"))
    }  # fmt: skip


def control_line(u0: U0Grid, name: str, measured: dict[str, Any]) -> str:
    """The planted layer's current-word Recall@K through the logit lens (and the tuned lens,
    when ``lens_tuned`` was run), against the prior: the controls' pre-registered test."""
    layer = int(measured["config"]["aux_layer"])
    row = next(r for r in u0.layers(name) if int(r["layer"]) == layer)
    key = f"recall@{K}_current"
    text = (
        f"{name} (current word planted at layer {layer} through "
        f"{'a fixed rotation Q: lm_head(norm(Q h))' if measured['config'].get('aux_rotation_seed') is not None else 'the logit lens readout lm_head(norm(h))'}): "
        f"logit lens at row {layer} {_ci(row, key)} (prior {row[f'recall@{K}_current_prior']:.3f}), "
        f"verdict {measured['reading']['verdict']}"
    )
    if (u0.root / name / "lens_tuned" / "layers.csv").exists():
        tuned = next(r for r in u0.layers(name, "lens_tuned") if int(r["layer"]) == layer)
        e1 = measured.get("reading_tuned", {}).get("e1", {})
        text += f"; tuned lens at row {layer} {_ci(tuned, key)}, E1 {'holds' if e1.get('holds') else 'fails'}"
    return text + "."


def grid_text(out: dict[str, Any], results: dict[str, Any], names: list[str]) -> str:
    verdicts = {n: results[n]["reading"]["verdict"] for n in names}
    shown = sum(v == "shows the effect" for v in verdicts.values())
    partly = sum(v == "partly" for v in verdicts.values())
    text = (
        "d 256 x 8 layers (7M parameters), text-pretrained on Austen + 320 world facts (4.9M "
        "tokens), then 2M stage-2 tokens; speech = one unit per espeak phoneme with unit noise p "
        "(organisms/README.md). Lens: speech-only prompts, 300 held-out clauses, match first, "
        f"Recall@{K} with utterance-bootstrap 95% CIs (layers.csv of organisms/u0/NAME/lens). "
        "Verdicts by the pre-registered rule (E1: two adjacent rows below L_units whose lower "
        "CI clears the prior and the mismatched word; E2: the same for the next word and the "
        f"scrambled-order control): {shown} of {len(names)} show the effect, {partly} partly. "
        "Rows whose data names a token count are exploratory longer runs (declared in "
        "organisms/README.md before training): they enter neither test below."
    )
    if "dose_response" in out:
        d = out["dose_response"]
        text += (
            f"\n\nDose-response (pre-registered: Spearman of p vs peak current-word Recall@{K}, "
            f"text init, interleaved 0.6, every seed): rho = {d['estimate']:.2f} "
            f"[{d['lo']:.2f}, {d['hi']:.2f}] over {d['n_cells']} organisms: {d['verdict']}."
        )
    if "knowledge_vs_transcription" in out:
        c = out["knowledge_vs_transcription"]
        text += (
            f"\n\nSpoken knowledge (320 facts) vs peak current-word Recall@{K}: Pearson r = "
            f"{c['estimate']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}] over {c['n_cells']} organisms "
            "(controls excluded)."
        )
    return text
