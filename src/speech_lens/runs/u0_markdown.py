"""Markdown tables of issue 17's U0 grid for the READMEs (``scripts/readme_tables.py``), from
the same code and numbers as the demo's section."""

from __future__ import annotations

from speech_lens.report.html import Report
from speech_lens.runs.demo_u0 import U0Grid, u0_section


def grid_markdown(grid: U0Grid) -> str:
    """One row per measured organism (``results.json``), then the two registered tests."""
    if not grid.names():
        return "No U0 organism measured yet (`scripts/u0_grid.py`)."
    out = u0_section(Report("README"), grid, lambda _: None)  # the demo's numbers, same code
    table = out["cells"]
    cols = list(table[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in table]
    note = (
        "`OMP_NUM_THREADS=1 .venv/bin/python scripts/u0_grid.py NAME --data runs/data_u0 --runs "
        "runs/u0` → `organisms/u0/results.json`, `organisms/u0/NAME/lens{,_scrambled}/`: "
        "speech-only prompts, 300 held-out clauses (1,698 words) at the organism's unit noise p, "
        "match first, k 5, utterance-bootstrap 95% CIs; G2 = next word (top-1) after a spoken vs a "
        "written prefix; text probe = a ridge probe for the current word fit on text positions, "
        "top-1 at each spoken word's last unit (best of rows 1–7; not part of the rule); verdict "
        "by the pre-registered rule (`speech_lens.report.criteria`); spoken knowledge = answer vs "
        "counterfactual on 320 facts (chance 0.5 ± 0.055)."
    )
    tests = []
    if "dose_response" in out:
        d = out["dose_response"]
        tests.append(
            f"Dose–response (Spearman of p vs peak current-word Recall@5 over the registered "
            f"text-init interleaved 0.6 cells, every seed; word bootstrap): ρ = {d['estimate']:.2f} "
            f"[{d['lo']:.2f}, {d['hi']:.2f}], {d['n_cells']} organisms: {d['verdict']}."
        )
    if "knowledge_vs_transcription" in out:
        c = out["knowledge_vs_transcription"]
        tests.append(
            f"Spoken knowledge vs peak current-word Recall@5 (Pearson, item and word bootstrap, "
            f"registered non-control cells): r = {c['estimate']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}], "
            f"{c['n_cells']} organisms."
        )
    return "\n".join([note, "", *lines, "", "\n\n".join(tests)])


def rows_markdown(grid: U0Grid) -> str:
    """Per organism and lens row 1..L-1: the curves behind the U0 grid's verdicts."""
    names = grid.names()
    if not names:
        return "No U0 organism measured yet."
    head = (
        "| organism | current@5, rows 1–7 | last unit@5 | text mass | next@5 | next@5 scrambled |\n"
        "|---|---|---|---|---|---|"
    )
    lines = [head]
    for n in names:
        rows, scr = grid.layers(n)[1:-1], grid.layers(n, "lens_scrambled")[1:-1]

        def seq(rs: list, key: str) -> str:
            return " ".join(f"{r[key]:.2f}" for r in rs)

        lines.append(
            f"| {n} | {seq(rows, 'recall@5_current')} | {seq(rows, 'recall@5_last_unit')} "
            f"| {seq(rows, 'text_mass')} | {seq(rows, 'recall@5_next')} "
            f"| {seq(scr, 'recall@5_next')} |"
        )
    prior = grid.layers(names[0])[1]
    note = (
        f"Frequency priors (from `organisms/u0/train_sample.jsonl`): current {prior['recall@5_current_prior']:.3f}, "
        f"next {prior['recall@5_next_prior']:.3f}; source `organisms/u0/NAME/lens{{,_scrambled}}/layers.csv`."
    )
    return "\n".join([*lines, "", note])
