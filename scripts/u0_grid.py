"""Measure trained U0 organisms (scripts/organisms_u0.toml) and read them by the pre-registered rule.

    python scripts/u0_grid.py NAME [NAME ...] [--data runs/data_u0] [--runs runs/u0]

Per finished run: export (fp16) to RUNS/NAME/checkpoint; ``speech-lens lens`` on the held-out U0
test manifest at the run's unit noise, plain and with ``--scramble-words 1`` (k 10, match first,
prior fitted on ``organisms/u0/train_sample.jsonl``) -> ``organisms/u0/NAME/lens{,_scrambled}``;
with ``--tuned`` a tuned lens (``organisms/u0/NAME/tuned_lens``) and the lens through it;
gates, text probe and spoken knowledge (``evaluate_organisms.evaluate``); the E1-E3 reading
(``speech_lens.report.criteria``). Everything merges into ``organisms/u0/results.json``. Resumable:
a finished step is skipped when its output exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from evaluate_organisms import evaluate, manifests, merge, unit_rate

from speech_lens.organisms.train import export_run
from speech_lens.report import criteria

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "organisms"
GRID = OUT / "u0"


def speech_lens_cli(*args: str) -> None:
    """Run the installed ``speech-lens`` command (offline)."""
    cli = str(Path(sys.executable).with_name("speech-lens"))
    subprocess.run([cli, *args], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def lens(ckpt: Path, test: Path, out: Path, *extra: str, keep_words: bool = False) -> None:
    """``speech-lens lens`` into ``out`` unless done; keep layers.csv and metrics.json, and
    words.csv gzipped (a fifth of the size; report.grid reads either) if ``keep_words``."""
    if not (out / "layers.csv").exists():
        prior = ["--prior-manifest", str(GRID / "train_sample.jsonl")]
        opts = ["--out", str(out), "--k", "10", "--match", "first", *prior, "--no-progress"]
        speech_lens_cli("lens", str(ckpt), str(test), *opts, *extra)
    for extra_file in ("report.html", "partial.jsonl"):
        (out / extra_file).unlink(missing_ok=True)
    words = out / "words.csv"
    if words.exists() and keep_words:
        with words.open("rb") as src, gzip.open(words.with_suffix(".csv.gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    words.unlink(missing_ok=True)


def tuned(ckpt: Path, name: str, test: Path, train: Path, logit: list[criteria.Row]) -> dict:
    """Tuned lens on the organism's own training clauses (the organisms' recipe,
    scripts/train_organism_lenses.sh), then the lens through it and its E1 reading."""
    lens_dir = GRID / name / "tuned_lens"
    if not (lens_dir / "params.pt").exists():
        opts = ["--data-mode", "mix", "--steps", "40", "--tokens-per-step", "4096"]
        opts += ["--heldout", "0.1", "--save-dtype", "float16", "--no-progress"]
        speech_lens_cli("tuned-lens", "train", str(ckpt), str(train), "--out", str(lens_dir), *opts)
    lens(ckpt, test, GRID / name / "lens_tuned", "--lens", f"tuned:{lens_dir}")
    rows = criteria.read_layers(GRID / name / "lens_tuned" / "layers.csv")
    # E1 only (no scrambled control); phases (L_units) from the logit lens, see criteria.reading,
    # and the literal reading (the tuned lens's own unit mass) beside it
    return {
        **dataclasses.asdict(criteria.reading(rows, None, phases_from=logit)),
        "literal": dataclasses.asdict(criteria.reading(rows, None)),
    }


def measure(name: str, data: Path, runs: Path, with_tuned: bool = False) -> dict:
    run = runs / name
    ckpt = run / "checkpoint"
    if not (ckpt / "model.safetensors").exists():
        export_run(run, ckpt, data, unit_rate(run, OUT))
    config = json.loads((ckpt / "organism.json").read_text())["config"]
    test, train, _ = manifests(config, data, OUT)
    lens(ckpt, test, GRID / name / "lens", keep_words=True)
    lens(ckpt, test, GRID / name / "lens_scrambled", "--scramble-words", "1")
    res = evaluate(name, data, OUT, 800, checkpoint=ckpt)
    rows = criteria.read_layers(GRID / name / "lens" / "layers.csv")
    scrambled = criteria.read_layers(GRID / name / "lens_scrambled" / "layers.csv")
    res["reading"] = dataclasses.asdict(criteria.reading(rows, scrambled))
    res["lens_dir"] = str((GRID / name / "lens").relative_to(ROOT))
    if with_tuned:
        res["reading_tuned"] = tuned(ckpt, name, test, train, rows)
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="+")
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "data_u0")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "u0")
    ap.add_argument("--tuned", action="store_true", help="also train and read a tuned lens")
    a = ap.parse_args()
    torch.set_num_threads(1)
    for name in a.names:
        r = measure(name, a.data, a.runs, a.tuned)
        merge(GRID / "results.json", f"organisms.{name}", r)
        g, rd = r["gates"], r["reading"]
        print(
            f"{name}: s2t {g['next_word_after_speech_prefix']} / {g['next_word_after_text_prefix']}"
            f" | verdict {rd['verdict']} ({rd['e1_kind']}), L_units {rd['l_units']}, peak cur@5 "
            f"{rd['peak_current']:.3f} at row {rd['peak_row']} | knowledge {r['knowledge']}",
            flush=True,
        )
