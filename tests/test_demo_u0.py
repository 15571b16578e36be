"""The demo's U0-grid section on artifacts written in the formats of scripts/u0_grid.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from speech_lens.report import criteria
from speech_lens.report.html import Report
from speech_lens.runs import demo_u0

LAYERS = list(range(9))  # embeddings, 7 candidates, output
RNG = np.random.default_rng(1)


def write_cell(root: Path, name: str, cur_rate: float) -> np.ndarray:
    """words.csv with random ranks (hit rate ``cur_rate`` at rows 3-4) and its layers.csv."""
    d = root / name / "lens"
    d.mkdir(parents=True)
    n = 120
    rate = np.where(np.isin(np.arange(len(LAYERS)), (3, 4)), cur_rate, 0.02)
    hit = RNG.random((n, len(LAYERS))) < rate
    ranks = np.where(hit, 0, 50)  # 0-based ranks
    with (d / "words.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["utterance", "word_index", "word", "next_word", "layer", "match",
                    "rank_current", "rank_next", "top_tokens"])  # fmt: skip
        for i in range(n):
            for j, layer in enumerate(LAYERS):
                w.writerow([f"u{i // 5}", i % 5, "w", "", layer, "first", ranks[i, j], 50, ""])
    with (d / "layers.csv").open("w", newline="") as f:
        keys = ["current", "next", "mismatched", "first_unit", "last_unit", "current_prior",
                "next_prior"]  # fmt: skip
        cols = [f"recall@5_{k}{s}" for k in keys for s in ("", "_lo", "_hi")]
        w = csv.writer(f)
        w.writerow(["layer", "relative_depth", "match", *cols, "text_mass", "unit_mass",
                    "other_mass"])  # fmt: skip
        for j, layer in enumerate(LAYERS):
            cur = hit[:, j].mean()
            vals = {"current": cur, "last_unit": cur, "first_unit": 0.02, "next": 0.02,
                    "mismatched": 0.03, "current_prior": 0.1, "next_prior": 0.1}  # fmt: skip
            row = [v + dv for k in keys for v in [vals[k]] for dv in (0, -0.04, 0.04)]
            units = 0.9 if j in (0, len(LAYERS) - 1) else 0.05
            w.writerow([layer, layer / 8, "first", *row, 1 - units, units, 0.0])
    return hit


def results(cells: dict[str, dict]) -> dict:
    out = {}
    for name, cfg in cells.items():
        out[name] = {
            "config": {
                "init": "u0_text_lm",
                "mix": {"interleaved": 0.6, "speech": 0.2, "text": 0.2},
                "seed": 0,
                "steps": 1000,
                "batch": 16,
                "seq_len": 128,
                **cfg,
            },
            "gates": {
                "next_word_after_speech_prefix": 0.15,
                "next_word_after_text_prefix": 0.2,
                "probe": {"text_fit_on_speech": [0.0, 0.1, 0.3, 0.2, 0.5]},  # row 4 = output
            },
            "knowledge": {
                "speech_acc": 0.5,
                "speech_correct": [int(x) for x in RNG.random(320) < 0.5],
            },
        }
    return out


def test_section_reads_the_grid_and_tests_the_dose(tmp_path: Path) -> None:
    root = tmp_path / "u0"
    doses = {"a_p0": 0.0, "b_p20": 0.2, "c_p50": 0.5}
    hits = {n: write_cell(root, n, r) for n, r in zip(doses, (0.6, 0.35, 0.1), strict=True)}
    write_cell(root, "d_planted", 0.9)
    write_cell(root, "a_p0_long", 0.05)  # exploratory: 3x the tokens, outside the tests
    res = results({n: {"unit_noise": p} for n, p in doses.items()})
    res.update(results({"d_planted": {"aux_layer": 3, "aux_weight": 1.0}}))
    res.update(results({"a_p0_long": {"steps": 3000}}))
    for name in res:
        rows = criteria.read_layers(root / name / "lens" / "layers.csv")
        res[name]["reading"] = json.loads(json.dumps(criteria.reading(rows, rows).__dict__,
                                                     default=lambda o: o.__dict__))  # fmt: skip
    res["c_p50"]["reading"]["e2"]["holds"] = True  # E2 alone: still a null, said so
    (root / "results.json").write_text(json.dumps({"organisms": res}))
    rep = Report("t")
    said: list[str] = []
    out = demo_u0.u0_section(rep, demo_u0.U0Grid(root), said.append)
    assert len(rep.sections) == 1 and "5 organisms" in said[0]
    table = out["cells"]
    assert [r["organism"] for r in table] == ["a_p0", "b_p20", "c_p50", "a_p0_long", "d_planted"]
    assert [r["p"] for r in table] == ["0", "0.2", "0.5", "0", "0"]
    assert table[3]["data"] == "interleaved 0.6, 6.1M tokens"
    assert table[0]["text probe at last unit (row)"] == "0.300 (2)"
    assert table[0]["verdict"].startswith("partly")
    assert table[2]["verdict"] == "null (E2 holds, E1 fails)"
    peaks = [hits[n][:, 1:-1].mean(0).max() for n in doses]
    rho = stats.spearmanr(list(doses.values()), peaks).statistic
    assert out["dose_response"]["estimate"] == pytest.approx(rho)
    assert out["dose_response"]["n_cells"] == 3  # the control is not a dose cell
    assert out["dose_response"]["verdict"].startswith("incomplete (3 of 5")  # 0.1, 0.35 missing
    assert out["knowledge_vs_transcription"]["n_cells"] == 3
    dose_fig, tokens_fig, mass, _ = rep.sections[0].figures
    assert list(dose_fig.data[0].x) == [0.0, 0.2, 0.5]
    assert list(tokens_fig.data[0].x) == [2.048, 6.144]  # a_p0 and a_p0_long, millions
    # the mass figure: every run drawn; p = 0.2 and the control start hidden
    visible = {t.legendgroup: t.visible for t in mass.data}
    assert visible == {"a_p0": True, "b_p20": "legendonly", "c_p50": True, "a_p0_long": True,
                       "d_planted": "legendonly"}  # fmt: skip
    (line,) = out["controls"]  # the planted control, at its planted row (3): 0.9 hit rate
    rows = criteria.read_layers(root / "d_planted" / "lens" / "layers.csv")
    assert f"row 3 {rows[3]['recall@5_current']:.3f}" in line and "logit lens readout" in line


def test_no_artifacts_no_section(tmp_path: Path) -> None:
    rep = Report("t")
    said: list[str] = []
    assert demo_u0.u0_section(rep, demo_u0.U0Grid(tmp_path / "u0"), said.append) == {}
    assert rep.sections == [] and "skipped" in said[0]
