"""Word-lens throughput: one by one vs padded batches, and what restricting the lens saves.

    .venv/bin/python benchmarks/bench_batched.py --threads 1 --qwen-utts 6 --name batched

writes ``benchmarks/results/<name>.json`` atomically (``scripts/readme_tables.py`` turns it into
the README's table). The word-level lens (``word_lens``, k=10, every row) over a set of
utterances, one by one against ``word_lens_batch`` in padded batches of 8 and of ``auto`` size
(from ``--memory-budget``); then at batch 8: ``positions="speech"`` (unit positions only) on
speech-only and on interleaved prompts, and a quarter of the lens rows (the first quarter, where
the forward stops early, with and without that stop, and a quarter spread over the depth ending
at the output). Subjects: a shipped organism (``organisms/textinit_interleaved`` on the first
``--organism-utts`` utterances of ``organisms/test_manifest.jsonl``) and the Qwen2.5-3B shape
with ``--qwen-layers`` layers on synthetic utterances.

Each subject runs in one process: a warm-up, then ``--rounds`` rounds over all settings (load
from other jobs then hits every setting alike). Per setting: median seconds and min-max over the
rounds; speed-ups are taken within a round and reported as median and min-max.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_meta

QWEN_DIMS = dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
                 num_key_value_heads=2, max_position_embeddings=4096)  # fmt: skip
SMOKE_DIMS = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
)


def synthetic_utterances(model: Any, n: int, n_words: int | None = None) -> list:
    """``n`` utterances of 3..8 words (or ``n_words`` each; 0.3 s a word) with random units at
    the family's rate."""
    import torch

    from speech_lens import Utterance, Word

    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "home"]
    rate = model.layout.units.frame_rate
    g = torch.Generator().manual_seed(0)
    out = []
    for j in range(n):
        m = n_words if n_words is not None else 3 + j % 6
        picks = torch.randint(0, len(words), (m,), generator=g).tolist()
        ws = tuple(Word(words[p], 0.3 * i, 0.3 * (i + 1)) for i, p in enumerate(picks))
        units = torch.randint(0, model.layout.units.count, (round(0.3 * m * rate),), generator=g)  # fmt: skip
        out.append(Utterance(f"s{j}", ws, tuple(units.tolist()), None, rate))
    return out


def _row_sets(n_layers: int) -> tuple[list[int], list[int]]:
    """The first quarter of the lens rows, and a quarter spread over the depth ending at the output."""
    n_rows = n_layers + 1
    quarter = max(1, round(0.25 * n_rows))
    if quarter == 1:
        return [0], [n_rows - 1]
    spread = sorted({round(n_rows - 1 - i * (n_rows - 1) / (quarter - 1)) for i in range(quarter)})
    return list(range(quarter)), spread


def _settings(model: Any, utts: list, budget: float) -> tuple[list[tuple[str, str, Any]], dict]:
    from speech_lens.batching import plan_batches
    from speech_lens.data.encoded import SPEECH
    from speech_lens.data.prompts import encode_prompt
    from speech_lens.data.word_targets import word_targets
    from speech_lens.lens.logit import word_lens, word_lens_batch

    speech = [encode_prompt(model, u, mode="speech") for u in utts]
    inter = [encode_prompt(model, u, mode="interleaved", seed=i) for i, u in enumerate(utts)]
    targets = [word_targets(model, u) for u in utts]
    first, spread = _row_sets(model.n_layers)

    def one_by_one(prompts):
        for p, t in zip(prompts, targets, strict=True):
            word_lens(model, p, t, k=10)

    def batched(prompts, size, **kw):
        for idx in plan_batches(model, [len(p) for p in prompts], size, memory_budget_gb=budget):
            word_lens_batch(model, [prompts[i] for i in idx], [targets[i] for i in idx], k=10, **kw)

    runs = [
        ("one_by_one", "speech prompts, one by one", lambda: one_by_one(speech)),
        ("batch8", "speech prompts, batch 8", lambda: batched(speech, 8)),
        ("batch_auto", "speech prompts, batch auto", lambda: batched(speech, "auto")),
        ("batch8_speech_pos", 'speech prompts, batch 8, positions="speech"', lambda: batched(speech, 8, positions="speech")),
        ("inter_batch8", "interleaved prompts, batch 8", lambda: batched(inter, 8)),
        ("inter_batch8_speech_pos", 'interleaved prompts, batch 8, positions="speech"', lambda: batched(inter, 8, positions="speech")),
        ("first_quarter", f"speech prompts, batch 8, rows {first} (first 25%, stops early)", lambda: batched(speech, 8, layers=first)),
        ("first_quarter_no_stop", f"speech prompts, batch 8, rows {first}, no early stop", lambda: batched(speech, 8, layers=first, stop_early=False)),
        ("spread_quarter", f"speech prompts, batch 8, rows {spread} (25% spread)", lambda: batched(speech, 8, layers=spread)),
    ]  # fmt: skip
    lengths = [len(p) for p in speech]
    info = {
        "n_utts": len(utts),
        "n_layers": model.n_layers,
        "mean_len": sum(len(p) for p in speech) / len(speech),
        "inter_speech_share": sum(len(p.positions_of(SPEECH)) for p in inter)
        / sum(len(p) for p in inter),
        "auto_sizes": [
            len(b) for b in plan_batches(model, lengths, "auto", memory_budget_gb=budget)
        ],
        "first_quarter_rows": first,
        "spread_quarter_rows": spread,
    }
    return runs, info


def worker(spec: dict) -> dict:
    """Throughput of one subject: one process, warm-up first, then rounds over every setting."""
    import torch

    torch.set_num_threads(spec["threads"])
    from speech_lens import load_model
    from speech_lens.data.manifest import read_manifest

    model = load_model(spec["path"], **spec["kw"])
    if spec.get("manifest"):
        utts = list(read_manifest(spec["manifest"], layout=model.layout))[: spec["n_utts"]]
    else:
        utts = synthetic_utterances(model, spec["n_utts"])
    runs, info = _settings(model, utts, spec["budget"])
    times: dict[str, list[float]] = {key: [] for key, _, _ in runs}
    with torch.no_grad():
        for _, _, fn in runs:  # warm-up (not measured)
            fn()
        for r in range(spec["rounds"]):
            for key, label, fn in runs:
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
                print(f"    round {r} {label}: {times[key][-1]:.2f}s", file=sys.stderr, flush=True)  # fmt: skip
    return {**info, "labels": {key: label for key, label, _ in runs}, "seconds": times}


def _stats(xs: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "values": xs}


def summarise(res: dict[str, Any]) -> list[dict[str, Any]]:
    secs = res["seconds"]
    rows = []
    for key, ts in secs.items():
        rows.append(
            {
                "setting": key,
                "label": res["labels"][key],
                "seconds": _stats(ts),
                "utt_per_s": res["n_utts"] / statistics.median(ts),
                "vs_one_by_one": _stats([a / b for a, b in zip(secs["one_by_one"], ts, strict=True)]),
                "vs_batch8": _stats([a / b for a, b in zip(secs["batch8"], ts, strict=True)]),
            }
        )  # fmt: skip
    return rows


def _subjects(args: argparse.Namespace, root: Path) -> list[tuple[str, str, dict]]:
    from speech_lens.testing import build_family

    orgs = bench_meta.REPO / "organisms"
    subjects = [
        ("organism", "organism textinit_interleaved",
         {"path": str(orgs / "textinit_interleaved"), "kw": {},
          "manifest": str(orgs / "test_manifest.jsonl"), "n_utts": args.organism_utts}),
    ]  # fmt: skip
    if args.qwen_layers > 0:
        dims = {**QWEN_DIMS, **(SMOKE_DIMS if args.smoke else {})}
        path, kw = build_family("sims-qwen", root / "qwen-batched", num_hidden_layers=args.qwen_layers, **dims)  # fmt: skip
        subjects.append(
            ("qwen", f"qwen2.5-3b shape ({args.qwen_layers} layers), synthetic",
             {"path": str(path), "kw": {k: str(v) for k, v in kw.items()}, "n_utts": args.qwen_utts}),
        )  # fmt: skip
    return subjects


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--name", default="batched", help="benchmarks/results/<name>.json")
    bench_meta.add_run_args(ap, threads=1)
    ap.add_argument("--organism-utts", type=int, default=96)
    ap.add_argument("--qwen-utts", type=int, default=6)
    ap.add_argument("--qwen-layers", type=int, default=2, help="0: organism only")
    ap.add_argument("--memory-budget", type=float, default=4.0, help="GiB, for batch 'auto'")
    args = ap.parse_args()
    if bench_meta.ran_as_worker(args, worker):
        return
    out_path = args.out_dir / f"{args.name}.json"
    settings = {"threads": args.threads, "rounds": args.rounds, "k": 10,
                "memory_budget_gb": args.memory_budget, "smoke": args.smoke}  # fmt: skip
    doc = {**bench_meta.run_header("bench_batched"), "settings": settings, "subjects": {}}
    root = args.root or Path(tempfile.mkdtemp(prefix="speech-lens-bench-"))
    for key, name, spec in _subjects(args, root):
        print(name, flush=True)
        spec = {**spec, "threads": args.threads, "budget": args.memory_budget, "rounds": args.rounds}  # fmt: skip
        load0, started = bench_meta.load_average(), bench_meta.now()
        out = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"{name} failed (worker exit {out.returncode})")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        doc["subjects"][key] = {
            "name": name, "started": started, "load_average_start": load0,
            "load_average_end": bench_meta.load_average(),
            **{k: v for k, v in res.items() if k not in ("labels", "seconds")},
            "rows": summarise(res),
        }  # fmt: skip
        bench_meta.write_json_atomic(out_path, bench_meta.finish(doc))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
