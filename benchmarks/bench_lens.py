"""Streaming logit lens vs plain TransformerLens: wall time and peak extra memory, side by side.

    .venv/bin/python benchmarks/bench_lens.py --shapes llama2-7b --seqs 1024 --threads 2 \
        --name lens_llama2-7b

writes ``benchmarks/results/<name>.json`` (atomically, after every row; a rerun with the same
name and settings keeps the rows already measured). ``scripts/readme_tables.py`` turns it into
the README's table.

Models: random weights in real shapes, built in SpiritLM / SIMS on-disk format by
``speech_lens.testing.build_family`` (so ``load_model`` reads them like real checkpoints):
Llama-2-7B width (d 4096, FFN 11008, 32 heads, vocab 32512) and a SIMS Qwen2.5-3B shape
(d 2048, FFN 11008, 16 / 2 heads, tied, vocab 152167), each with a few layers so they fit one
CPU box. Three routes on one prompt (a marker, then ``seq - 1`` random unit ids):

* ``forward``: ``bridge(tokens)``, the plain forward pass (the baseline);
* ``lens``: ``speech_lens.logit_lens(model, tokens, k=10, targets="next")`` (all rows: top-k text
  and overall, unit / text / speech / marker mass, rank and log-prob of the next token);
* ``naive``: TransformerLens as documented: ``run_with_cache`` (residual hooks only) +
  ``cache.accumulated_resid(apply_ln=True)`` + ``@ W_U + b_U`` (the full ``[layers, pos, vocab]``
  logits) + the same top-k.

Each row (shape, seq) runs in ONE process: one warm-up call of every route (not measured), then
``--rounds`` rounds, each calling forward, lens and naive once (the order rotates every round, so
no route always follows another). Ratios are taken within a round (lens / forward of the same
round) and reported as median and min-max over rounds. Memory: before each call freed heap pages
are returned to the OS (``malloc_trim``) and the peak RSS is reset (``/proc/self/clear_refs``);
"extra" = peak RSS during the call minus RSS just before it; lens and naive over the forward =
their extra minus the forward's extra in the same round.

FLOP floor: 1 + n_layers unembeddings / an upper bound of the forward's FLOPs (weights plus the
full seq x seq attention). Each route computes the forward and n_layers more unembeddings, so a
ratio below the floor means the forward ran slower per FLOP than those unembeddings in that round
(load from other jobs hitting the forward, or the forward's smaller matmuls running less
efficiently than one large one); a median below it is flagged in the artifact and the README as a
measurement error, not a result.
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

SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(
        family="spiritlm", label="llama2-7b width, vocab 32512",
        dims=dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096),
    ),
    "qwen2.5-3b": dict(
        family="sims-qwen", label="qwen2.5-3b shape, vocab 152167",
        dims=dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
                  num_key_value_heads=2, max_position_embeddings=4096),
    ),
}  # fmt: skip
SMOKE_DIMS = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
)
ROUTES = ("forward", "lens", "naive")


def _routes(model: Any, seq: int) -> dict[str, Any]:
    import torch

    from speech_lens import logit_lens

    lay = model.layout
    g = torch.Generator().manual_seed(0)
    units = lay.unit_ids[torch.randint(0, lay.units.count, (seq - 1,), generator=g)]
    toks = torch.cat([torch.tensor([next(iter(lay.marker_ids.values()))]), units])
    bridge = model.bridge
    W_U, b_U = bridge.W_U, bridge.b_U

    def forward() -> None:
        bridge(toks.unsqueeze(0))

    def lens() -> None:
        logit_lens(model, toks, k=10, targets="next")

    def naive() -> None:
        _, cache = bridge.run_with_cache(
            toks.unsqueeze(0), names_filter=lambda name: "resid" in name or "ln_final" in name
        )
        acc = cache.accumulated_resid(apply_ln=True)  # [layers + 1, 1, pos, d]
        logits = acc @ W_U + b_U  # [layers + 1, 1, pos, vocab]
        logits.log_softmax(-1).topk(10, dim=-1)

    return {"forward": forward, "lens": lens, "naive": naive}


def measure_call(fn: Any) -> tuple[float, float]:
    bench_meta.release_free_memory()
    bench_meta.reset_peak_rss()
    rss0 = bench_meta.rss_kb("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, (bench_meta.rss_kb("VmHWM") - rss0) / 1024


def worker(spec: dict) -> dict:
    """One row in this process: warm-up, then ``rounds`` rotating rounds of the three routes."""
    import torch

    torch.set_num_threads(spec["threads"])
    from speech_lens import load_model

    model = load_model(spec["path"], **spec["kw"])
    fns = _routes(model, spec["seq"])
    calls: list[dict[str, Any]] = []
    with torch.no_grad():
        for route in ROUTES:  # warm-up: kernels, lazy buffers, first-touch pages
            fns[route]()
        for r in range(spec["rounds"]):
            order = ROUTES[r % 3 :] + ROUTES[: r % 3]
            for route in order:
                seconds, extra = measure_call(fns[route])
                calls.append({"round": r, "route": route, "seconds": seconds, "extra_mb": extra})
                print(f"    round {r} {route}: {seconds:.2f}s {extra:.0f} MB", file=sys.stderr, flush=True)  # fmt: skip
    return {
        "calls": calls,
        "n_layers": model.n_layers,
        "vocab": int(model.bridge.W_U.shape[-1]),
        "threads_used": torch.get_num_threads(),
    }


def flop_floor(dims: dict[str, int], n_layers: int, vocab: int, seq: int) -> float:
    h, f = dims["hidden_size"], dims["intermediate_size"]
    heads, kv = dims["num_attention_heads"], dims["num_key_value_heads"]
    kv_width = h // heads * kv
    weights = 2 * h * h + 2 * h * kv_width + 3 * h * f  # q, o, k, v, gate/up/down
    attention = 2 * seq * h  # scores and mix over the full seq x seq (an upper bound)
    forward = 2 * (n_layers * (weights + attention) + h * vocab)  # FLOPs per position
    return 1 + n_layers * 2 * h * vocab / forward


def spread_stats(xs: list[float]) -> dict[str, Any]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "q1": q[0], "q3": q[2], "values": xs}  # fmt: skip


def summarise(calls: list[dict[str, Any]], floor: float) -> dict[str, Any]:
    """Per-route medians and spreads, within-round ratios, floor flags."""
    rounds = sorted({c["round"] for c in calls})
    by = {(c["round"], c["route"]): c for c in calls}
    routes = {
        route: {
            "seconds": spread_stats([by[r, route]["seconds"] for r in rounds]),
            "extra_mb": spread_stats([by[r, route]["extra_mb"] for r in rounds]),
        }
        for route in ROUTES
    }
    ratios: dict[str, Any] = {}
    for a, b in (("lens", "forward"), ("naive", "forward"), ("lens", "naive")):
        vals = [by[r, a]["seconds"] / by[r, b]["seconds"] for r in rounds]
        entry = spread_stats(vals)
        if b == "forward":
            entry["flop_floor"] = floor
            entry["rounds_below_floor"] = sum(v < floor for v in vals)
            entry["median_below_floor"] = entry["median"] < floor
        ratios[f"{a}/{b}"] = entry
    over = {
        route: spread_stats(
            [by[r, route]["extra_mb"] - by[r, "forward"]["extra_mb"] for r in rounds]
        )
        for route in ("lens", "naive")
    }
    flagged = [k for k, v in ratios.items() if v.get("median_below_floor")]
    return {"routes": routes, "ratios": ratios, "extra_over_forward_mb": over,
            "measurement_error": flagged}  # fmt: skip


def _row_key(row: dict[str, Any]) -> tuple:
    return (row["shape"], row["layers"], row["seq"])


def run_row(args: argparse.Namespace, shape: str, path: Path, kw: dict, seq: int) -> dict:
    dims = {**SHAPES[shape]["dims"], **(SMOKE_DIMS if args.smoke else {})}
    spec = {"path": str(path), "kw": {k: str(v) for k, v in kw.items()}, "seq": seq,
            "threads": args.threads, "rounds": args.rounds}  # fmt: skip
    started, load0, t0 = bench_meta.now(), bench_meta.load_average(), time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{shape} seq {seq} failed (worker exit {out.returncode})")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    floor = flop_floor(dims, res["n_layers"], res["vocab"], seq)
    return {
        "shape": shape, "label": SHAPES[shape]["label"], "layers": res["n_layers"], "seq": seq,
        "started": started,
        "vocab": res["vocab"], "dims": dims, "threads_used": res["threads_used"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "load_average_start": load0, "load_average_end": bench_meta.load_average(),
        **summarise(res["calls"], floor), "calls": res["calls"],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--name", default="lens_routes", help="benchmarks/results/<name>.json")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--seqs", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--llama-layers", type=int, default=4)
    ap.add_argument("--qwen-layers", type=int, default=4)
    bench_meta.add_run_args(ap, threads=2)
    args = ap.parse_args()
    if bench_meta.ran_as_worker(args, worker):
        return
    from speech_lens.testing import build_family

    out_path = args.out_dir / f"{args.name}.json"
    settings = {"threads": args.threads, "rounds": args.rounds, "k": 10, "smoke": args.smoke,
                "routes": list(ROUTES)}  # fmt: skip
    doc = {**bench_meta.run_header("bench_lens"), "settings": settings, "rows": []}
    if out_path.exists():
        old = json.loads(out_path.read_text())
        if old.get("settings") == settings:  # resume: keep rows measured with these settings
            doc["rows"] = old["rows"]
    done = {_row_key(r) for r in doc["rows"]}
    root = args.root or Path(tempfile.mkdtemp(prefix="speech-lens-bench-"))
    layers = {"llama2-7b": args.llama_layers, "qwen2.5-3b": args.qwen_layers}
    for shape in args.shapes:
        todo = [s for s in args.seqs if (shape, layers[shape], s) not in done]
        if not todo:
            continue
        dims = {**SHAPES[shape]["dims"], **(SMOKE_DIMS if args.smoke else {})}
        path, kw = build_family(SHAPES[shape]["family"], root / shape, num_hidden_layers=layers[shape], **dims)  # fmt: skip
        for seq in todo:
            print(f"{shape} ({layers[shape]} layers) seq {seq}", flush=True)
            doc["rows"].append(run_row(args, shape, path, kw, seq))
            bench_meta.write_json_atomic(out_path, bench_meta.finish(doc))
    bench_meta.write_json_atomic(out_path, bench_meta.finish(doc))
    print(f"wrote {out_path}")
    for row in doc["rows"]:
        r = row["ratios"]
        print(
            f"{row['shape']} ({row['layers']}) seq {row['seq']}: forward "
            f"{row['routes']['forward']['seconds']['median']:.2f}s, lens/fwd "
            f"{r['lens/forward']['median']:.2f}x, naive/fwd {r['naive/forward']['median']:.2f}x, "
            f"floor {r['lens/forward']['flop_floor']:.2f}x, flagged {row['measurement_error']}"
        )


if __name__ == "__main__":
    main()
