"""Write the README's measured tables and sentences from committed artifacts, or check them.

    .venv/bin/python scripts/readme_tables.py          # rewrite the generated blocks in place
    .venv/bin/python scripts/readme_tables.py --check  # exit 1 if a block differs from its artifact

A generated block sits between ``<!-- readme_tables:NAME -->`` and ``<!-- /readme_tables:NAME -->``
in README.md or organisms/README.md; everything between the markers is this script's output, made
only from the artifacts named in BLOCKS (nothing is measured here). Edit the artifact (by rerunning
the command that made it), not the block.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "organisms" / "results.json"
BENCH = REPO / "benchmarks" / "results"
ROLE = {
    "text_lm": "text_lm (never heard speech)",
    "textinit_interleaved_x2": "textinit_interleaved_x2 (2× tokens)",
    "textinit_interleaved_x3": "textinit_interleaved_x3 (3× tokens)",
    "control_planted_l3": "**positive control** control_planted_l3",
}


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _f3(x: float) -> str:
    return f"{x:.3f}"


def _range(xs: list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = fmt.format(min(xs)), fmt.format(max(xs))
    return lo if lo == hi else f"{lo}–{hi}"


# ---------------------------------------------------------------- organisms/results.json


def _baseline_line(res: dict) -> str:
    fb = res["frequency_baseline"]
    return (
        f"Frequency baseline (rank words by training frequency): cur@1 {_f3(fb['cur@1'])}, "
        f"cur@5 {_f3(fb['cur@5'])}, next@1 {_f3(fb['nxt@1'])}, next@5 {_f3(fb['nxt@5'])}."
    )


def readme_organisms() -> str:
    res = _json(RESULTS)
    head = (
        "| organism | cur@1 | cur@5 | next@5 | units > text from layer "
        "| next word after speech / text prefix | spoken knowledge (same facts in text) |\n"
        "|---|---|---|---|---|---|---|"
    )
    rows = []
    for r in res["summary"]["table"]:
        peak = r["name"] == "control_planted_l3"
        b = (lambda s: f"**{s}**") if peak else (lambda s: s)
        cross = r["unit_mass_overtakes_text_at"]
        cur1 = b(f"{_f3(r['cur@1'])} ({r['cur@1_layer']})")
        cur5 = b(f"{_f3(r['cur@5'])} ({r['cur@5_layer']})")
        rows.append(
            f"| {ROLE.get(r['name'], r['name'])} | {cur1} "
            f"| {cur5} | {_f3(r['nxt@5'])} ({r['nxt@5_layer']}) "
            f"| {'–' if cross is None else cross} | {_f3(r['s2t_speech'])} / {_f3(r['s2t_text'])} "
            f"| {r['knowledge_speech']:.2f} ({r['knowledge_text']:.2f}) |"
        )
    return "\n".join([_baseline_line(res), "", head, *rows])


def organisms_table() -> str:
    res = _json(RESULTS)
    head = (
        "| organism | cur@1 (layer) | cur@5 (layer) | nxt@1 (layer) | nxt@5 (layer) | unit>text from layer "
        "| next word after speech / text prefix | transcription all (first word) "
        "| text-fit probe on speech (max) | spoken knowledge (text) |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {r['name']} | {_f3(r['cur@1'])} ({r['cur@1_layer']}) | {_f3(r['cur@5'])} ({r['cur@5_layer']}) "
        f"| {_f3(r['nxt@1'])} ({r['nxt@1_layer']}) | {_f3(r['nxt@5'])} ({r['nxt@5_layer']}) "
        f"| {'–' if r['unit_mass_overtakes_text_at'] is None else r['unit_mass_overtakes_text_at']} "
        f"| {_f3(r['s2t_speech'])} / {_f3(r['s2t_text'])} "
        f"| {_f3(r['transcription'])} ({_f3(r['transcription_first_word'])}) "
        f"| {_f3(r['probe_text_fit_on_speech_max'])} "
        f"| {_f3(r['knowledge_speech'])} ({_f3(r['knowledge_text'])}) |"
        for r in res["summary"]["table"]
    ]
    return "\n".join([_baseline_line(res), "", head, *rows])


def _text_initialised(orgs: dict, name: str) -> bool:
    seen = set()
    while name in orgs and name not in seen:  # follow the init chain to its root
        seen.add(name)
        init = orgs[name]["config"].get("init")
        if init == "text_lm":
            return True
        name = init
    return False


def other_mass() -> str:
    orgs = _json(RESULTS)["organisms"]
    order = [r["name"] for r in _json(RESULTS)["summary"]["table"]]
    n_rows = len(orgs[order[0]]["lens"]["speech"]["unit_mass"])
    head = "| organism | initialised from | mass per layer 0–6: units / words / **other** |\n|---|---|---|"
    rows, mid = [], []
    for name in order:
        sp = orgs[name]["lens"]["speech"]
        other = [1 - u - t for u, t in zip(sp["unit_mass"], sp["text_mass"], strict=True)]
        cells = " · ".join(
            f"{u:.2f}/{t:.2f}/**{o:.2f}**"
            for u, t, o in zip(sp["unit_mass"], sp["text_mass"], other, strict=True)
        )
        init = _text_initialised(orgs, name)
        rows.append(f"| {name} | {orgs[name]['config'].get('init')} | {cells} |")
        if init and name != "control_planted_l3":
            mid += other[2:4]
    summary = (
        f"At layers 2–3 the emergent text-initialised organisms (initialised from text_lm, directly "
        f"or through a continued run) put {_range(mid)} of the "
        f"probability at speech positions on ids that are neither units nor words (the "
        f"{n_rows - 1}-layer organisms' special tokens and markers)."
    )
    return "\n".join([head, *rows, "", summary])


def tuned_kl() -> str:
    lines, better = [], []
    for cfg_path in sorted(REPO.glob("organisms/*/tuned_lens/config.json")):
        if cfg_path.parts[-3] == "minisims":  # not an organism (scripts/minisims/README.md)
            continue
        tr = _json(cfg_path)["training"]
        logit, tuned = tr["heldout_kl_logit"][:-1], tr["heldout_kl_tuned"][:-1]
        better.append(all(t < lg for t, lg in zip(tuned, logit, strict=True)))
        if cfg_path.parts[-3] == "textinit_interleaved":
            lines.append(
                f"textinit_interleaved, layers 0–{len(logit) - 1}: "
                f"{'/'.join(f'{x:.2f}' for x in logit)} nats for the logit lens vs "
                f"{'/'.join(f'{x:.2f}' for x in tuned)} for the tuned lens"
            )
    return (
        f"Tuned lenses (shipped, `organisms/*/tuned_lens/config.json`, `training.heldout_kl_*`) "
        f"lower held-out KL to the final distribution at every layer but the last on "
        f"{sum(better)} of the {len(better)} organisms they were trained for (e.g. {lines[0]})."
    )


# ---------------------------------------------------------------- benchmarks/results/*.json


def _load(doc: dict) -> str:
    return f"load average {doc['load_average_start'][0]:.1f} → {doc['load_average_end'][0]:.1f}"


def _span(st: dict, fmt: str = "{:.2f}", unit: str = "") -> str:
    return f"{fmt.format(st['median'])}{unit} ({_range([st['min'], st['max']], fmt)})"


def _ratio_cell(st: dict) -> str:
    cell = _span(st, unit="x")
    if "flop_floor" in st and st["rounds_below_floor"]:
        n = len(st["values"])
        cell += f"; {st['rounds_below_floor']}/{n} rounds below floor"
    if st.get("median_below_floor"):
        cell = f"**{cell}: below the FLOP floor, a measurement error**"
    return cell


def lens_routes() -> str:
    doc = _json(BENCH / "lens_routes.json")
    head = (
        "| shape (layers) | seq | forward s | lens / fwd | naive / fwd | FLOP floor | lens / naive "
        "| lens extra over fwd, MB | naive extra over fwd, MB | lens / naive extra "
        "| load average (1 min) at row start → end |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for r in doc["rows"]:
        ra, over = r["ratios"], r["extra_over_forward_mb"]
        rows.append(
            f"| {r['label']} ({r['layers']}) | {r['seq']} | {_span(r['routes']['forward']['seconds'])} "
            f"| {_ratio_cell(ra['lens/forward'])} | {_ratio_cell(ra['naive/forward'])} "
            f"| {ra['lens/forward']['flop_floor']:.2f}x | {_ratio_cell(ra['lens/naive'])} "
            f"| {_span(over['lens'], '{:.0f}')} | {_span(over['naive'], '{:.0f}')} "
            f"| {over['lens']['median'] / over['naive']['median']:.2f} "
            f"| {r['load_average_start'][0]:.1f} → {r['load_average_end'][0]:.1f} |"
        )
    s = doc["settings"]
    m = doc["machine"]
    v = doc["versions"]
    note = (
        f"`{doc['command']}` → `benchmarks/results/lens_routes.json` ({doc['started'][:10]}; "
        f"{m['cpu_model']}, {m['cores']} cores shared with other jobs, {s['threads']} threads; torch "
        f"{v['torch']}, transformers {v['transformers']}, transformer-lens {v['transformer-lens']}, "
        f"commit {v['speech_lens_commit'][:7]}). Each row: one process, a warm-up call of each "
        f"route, then {s['rounds']} rounds of forward / lens / naive (order rotating); "
        f"median (min–max) over the rounds, ratios taken within a round. Absolute times are "
        f"noisy (other jobs; {_load(doc)} over the run); a median ratio below the FLOP floor is "
        f"marked as a measurement error."
    )
    if doc.get("stopped_early"):
        note += f" Not every row of the command was measured: {doc['stopped_early']}."
    return "\n".join([note, "", head, *rows])


def batched() -> str:
    doc = _json(BENCH / "batched.json")
    head = (
        "| subject | setting | utt/s (median) | s, median (min–max) | vs one by one | vs batch 8 |\n"
        "|---|---|---|---|---|---|"
    )
    rows = []
    for sub in doc["subjects"].values():
        name = f"{sub['name']}, {sub['n_utts']} utterances (~{sub['mean_len']:.0f} tokens)"
        for i, r in enumerate(sub["rows"]):
            label = r["label"].replace("speech prompts, ", "")
            if r["setting"] == "batch_auto":
                label += f" ({'/'.join(map(str, sorted(set(sub['auto_sizes']), reverse=True)))})"
            rows.append(
                f"| {name if i == 0 else ''} | {label} | {r['utt_per_s']:.1f} "
                f"| {_span(r['seconds'])} | {_span(r['vs_one_by_one'], unit='x')} "
                f"| {_span(r['vs_batch8'], unit='x')} |"
            )
    s = doc["settings"]
    note = (
        f"`{doc['command']}` → `benchmarks/results/batched.json` ({doc['started'][:10]}, "
        f"{s['threads']} thread(s), {s['rounds']} rounds after a warm-up, one process per "
        f"subject; {_load(doc)}; speed-ups within a round, median (min–max))."
    )
    if doc.get("stopped_early"):
        note += f" Not every subject was measured: {doc['stopped_early']}."
    return "\n".join([note, "", head, *rows])


def stride() -> str:
    doc = _json(BENCH / "stride_minisims.json")
    wall, cpu, ra = doc["seconds_per_utterance"], doc["cpu_seconds_per_utterance"], doc["ratios"]
    n_rows = doc["n_layers"] + 1
    head = (
        "| route | lens rows read | wall s / utterance | CPU s / utterance | stride 1 / this "
        "(wall) | this / forward (wall) |\n|---|---|---|---|---|---|"
    )
    rows = [
        f"| forward only | – | {_span(wall['forward'], '{:.3f}')} "
        f"| {_span(cpu['forward'], '{:.3f}')} | – | 1.00x |"
    ]
    for key, read in doc["rows"].items():
        speed = "1.00x" if key == "stride1" else _span(ra[f"stride1/{key}"], unit="x")
        listed = "" if len(read) == n_rows else ": " + ", ".join(map(str, read))
        rows.append(
            f"| `--layer-stride {key.removeprefix('stride')}` | {len(read)} of {n_rows}{listed} "
            f"| {_span(wall[key], '{:.3f}')} | {_span(cpu[key], '{:.3f}')} | {speed} "
            f"| {_span(ra[f'{key}/forward'], unit='x')} |"
        )
    s, d = doc["settings"], doc["dims"]
    units = doc["units_per_utt"]
    note = (
        f"`{doc['command']}` → `benchmarks/results/stride_minisims.json` ({doc['started'][:10]}; "
        f"random weights in mini-SIMS's shape: {doc['n_layers']} layers, d {d['hidden_size']}, "
        f"GQA {d['num_attention_heads']}/{d['num_key_value_heads']}, vocab {doc['vocab']:,}; "
        f"{doc['n_utts']} utterances of {s['words']} words, {_range(units, '{:d}')} unit "
        f"positions; the per-utterance path of `speech-lens lens` (batch 1, speech positions), "
        f"k=10; {s['threads']} thread(s), one process, a warm-up pass of each route, then "
        f"{s['rounds']} rounds in rotating order; median (min–max) over rounds, ratios within a "
        f"round; the cores are shared with other jobs ({_load(doc)}), so wall time runs above "
        f"CPU time)."
    )
    return "\n".join([note, "", head, *rows])


def demo_timing() -> str:
    doc = _json(BENCH / "demo_timing.json")
    d, dry = doc["demo"], doc["dry_run"]
    threads = doc["threads"]
    how = (
        f"with OMP_NUM_THREADS={threads}"
        if isinstance(threads, int)
        else "with torch's default threads"
    )
    return (
        f"Measured once on the 2-core machine shared with other jobs, {how} "
        f"(`{doc['command']}` → `benchmarks/results/demo_timing.json`, {doc['started'][:10]}): "
        f"`speech-lens demo --dry-run` estimated {dry['estimate_seconds'] / 60:.1f} min, then "
        f"`speech-lens demo` took {d['demo_json_seconds'] / 60:.1f} min by its own clock "
        f"({d['wall_seconds'] / 60:.1f} min wall; {_load(d)}), 150 held-out utterances per "
        f"organism (`--limit` to change). `make demo` also installs first (not timed here)."
    )


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def minisims() -> str:
    ms = REPO / "organisms" / "minisims"
    plain = _csv_rows(ms / "lens_v2" / "layers.csv")
    scr = {r["layer"]: r for r in _csv_rows(ms / "lens_v2_scrambled" / "layers.csv")}
    cfg = _json(ms / "lens_v2" / "metrics.json")["metrics"]
    gates = _json(ms / "gates_v2.json")
    with safe_open(str(ms / "delta.safetensors"), "pt") as f:  # the gate of the shipped delta
        trained = json.loads(f.metadata()["speech_lens.delta"])["training"]["tokens"]
    g = next(v for k, v in gates.items() if k.startswith("tokens_") and v["tokens"] == trained)

    def ci(r: dict[str, str], key: str) -> str:
        return f"{float(r[key]):.3f} [{float(r[key + '_lo']):.3f}, {float(r[key + '_hi']):.3f}]"

    head = (
        "| row | cur@5 [95% CI] | first unit | last unit | mismatched | prior | next@5 [95% CI] "
        "| next prior | next@5 scrambled | unit mass |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {r['layer']} | {ci(r, 'recall@5_current')} | {float(r['recall@5_first_unit']):.3f} "
        f"| {float(r['recall@5_last_unit']):.3f} | {float(r['recall@5_mismatched']):.3f} "
        f"| {float(r['recall@5_current_prior']):.3f} | {ci(r, 'recall@5_next')} "
        f"| {float(r['recall@5_next_prior']):.3f} | {float(scr[r['layer']]['recall@5_next']):.3f} "
        f"| {float(r['unit_mass']):.3f} |"
        for r in plain
    ]
    note = (
        f"`speech-lens lens organisms/minisims/delta.safetensors organisms/minisims/test_manifest.jsonl "
        f"--layer-stride 3 --k 10 --match first-spaced --out organisms/minisims/lens_v2` (and "
        f"`--scramble-words 1 --out organisms/minisims/lens_v2_scrambled`): speech-only prompts, "
        f"{cfg['n_utterances']} held-out clauses, {cfg['n_words']} spoken words, match rule "
        f"{cfg['match']}, text ids only, max-pooled per word; prior = the 5 text ids hitting the "
        f"most words of the other utterances. Gate at {g['tokens']:,} training tokens "
        f"(`organisms/minisims/gates_v2.json`): next word after a spoken prefix top-1 "
        f"{g['next_word_after_speech_prefix@1']:.3f} vs after the same prefix in text "
        f"{g['next_word_after_text_prefix@1']:.3f}."
    )
    lens = _json(ms / "tuned_lens" / "config.json")
    kl = lens["training"]["test_kl"]
    pairs = [
        f"{r}: {a:.1f} → {b:.2f}"
        for r, a, b in zip(kl["rows"], kl["logit"], kl["tuned"], strict=True)
        if r in lens["trained_layers"]
    ]
    tuned = (
        f"Tuned lens (`organisms/minisims/tuned_lens`, tuned-lens format, rows "
        f"{', '.join(map(str, lens['trained_layers']))} trained on {lens['tokens']:,} tokens of "
        f"training clauses, {lens['steps']} steps, `scripts/minisims/README.md`): held-out "
        f"KL(final ‖ lens) in nats/token on {kl['clauses']}, logit → tuned lens, row "
        + "; ".join(pairs)
        + "."
    )
    return "\n".join([note, "", head, *rows, "", tuned])


def u0_grid() -> str:
    """Issue 17's U0 organisms, one row per measured organism (``organisms/u0/results.json``)."""
    from speech_lens.runs.demo_u0 import U0Grid
    from speech_lens.runs.u0_markdown import grid_markdown

    return grid_markdown(U0Grid.under(REPO / "organisms"))


def u0_rows() -> str:
    """Per organism and lens row 1..L-1: the curves behind the U0 grid's verdicts."""
    from speech_lens.runs.demo_u0 import U0Grid
    from speech_lens.runs.u0_markdown import rows_markdown

    return rows_markdown(U0Grid.under(REPO / "organisms"))


BLOCKS: dict[str, tuple[str, Callable[[], str]]] = {
    "organism_results": ("README.md", readme_organisms),
    "tuned_kl": ("README.md", tuned_kl),
    "demo_timing": ("README.md", demo_timing),
    "lens_routes": ("README.md", lens_routes),
    "batched": ("README.md", batched),
    "stride": ("README.md", stride),
    "minisims": ("README.md", minisims),
    "u0_grid": ("README.md", u0_grid),
    "u0_rows": ("organisms/README.md", u0_rows),
    "organism_table": ("organisms/README.md", organisms_table),
    "other_mass": ("organisms/README.md", other_mass),
}


def render(text: str, name: str, body: str, path: str) -> str:
    pat = re.compile(
        rf"(<!-- readme_tables:{name} -->\n)(.*?)(<!-- /readme_tables:{name} -->)", re.DOTALL
    )
    if len(pat.findall(text)) != 1:
        raise SystemExit(f"{path}: expected one block <!-- readme_tables:{name} --> ... <!-- /readme_tables:{name} -->")  # fmt: skip
    return pat.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--check", action="store_true", help="fail if a README differs from the artifacts"
    )
    args = ap.parse_args(argv)
    stale = []
    for path in sorted({p for p, _ in BLOCKS.values()}):
        old = (REPO / path).read_text()
        new = old
        for name, (p, make) in BLOCKS.items():
            if p == path:
                new = render(new, name, make(), path)
        if new == old:
            continue
        if args.check:
            stale.append(path)
            sys.stdout.writelines(
                difflib.unified_diff(old.splitlines(True), new.splitlines(True), path, "from artifacts")
            )  # fmt: skip
        else:
            (REPO / path).write_text(new)
            print(f"rewrote {path}")
    if stale:
        print(f"\n{', '.join(stale)}: out of date; run scripts/readme_tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
