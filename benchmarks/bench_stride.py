"""The word lens at a layer stride on a mini-SIMS-shaped model: seconds per utterance, 1 thread.

    .venv/bin/python benchmarks/bench_stride.py --threads 1 --name stride_minisims

writes ``benchmarks/results/<name>.json`` atomically. Subject: random weights in mini-SIMS's
shape (SmolLM2-135M: 30 layers, d 576, FFN 1536, GQA 9 / 3 heads, tied; + 502 unit / marker
rows = vocab 49,654) in slamkit's ``UnitLM`` layout on a 49,152-id byte-level BPE base tokenizer
(``speech_lens.testing``), loaded by ``load_model`` like the real checkpoint. Timing does not
depend on the weights. Data: ``--utts`` synthetic utterances of ``--words`` words (0.3 s each,
random units at the family's 25 Hz: 60 unit positions at 8 words; ``bench_batched``'s maker).

Routes, each a pass over every utterance one by one as ``speech-lens lens`` runs it (batch size 1,
``positions="speech"``, k=10: ``runs.lens.lens_batch`` + ``utterance_record``):

* ``stride1`` (every row: 31), ``stride3`` (11 rows), ``stride5`` (7 rows): ``--layer-stride``
  (``lens.rows.layer_stride``: rows 0, s, 2s, ... and always the output row 30);
* ``forward``: the plain ``bridge(tokens)`` of the same prompts (the floor no stride goes below).

One process: a warm-up pass of every route (not measured), then ``--rounds`` rounds, each running
every route once in a rotating order (load from other jobs then hits every route alike).
Reported per route: wall and CPU seconds per utterance (median and min-max over rounds; CPU
time, this process's own, is less inflated by other jobs on the shared cores than wall time);
ratios of wall time stride1 / strideN and strideN / forward taken within a round. The load
average is recorded at the start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_meta
from bench_batched import synthetic_utterances
from bench_lens import measure_call, spread_stats

MINISIMS_DIMS = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3,
                     max_position_embeddings=8192)  # fmt: skip
SMOKE_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
BASE_TOKENS = 49152  # len(SmolLM2 tokenizer): <Un0> gets this id
STRIDES = (1, 3, 5)
ROUTES = ("forward", *(f"stride{s}" for s in STRIDES))


def build_subject(root: Path, smoke: bool) -> tuple[Path, Path]:
    """The mini-SIMS-shaped checkpoint (random weights) and its base tokenizer directory."""
    from speech_lens.testing.families import build_sims
    from speech_lens.testing.tokenizers import small_base_tokenizer

    tok = root / "base-tokenizer"
    if not (tok / "tokenizer.json").exists():
        small_base_tokenizer(tok, BASE_TOKENS, bos=True)
    dims = {**MINISIMS_DIMS, **(SMOKE_DIMS if smoke else {})}
    path = root / ("minisims-shape-smoke" if smoke else "minisims-shape")
    if not (path / "config.json").exists():
        build_sims(path, tok, base="llama", base_name="HuggingFaceTB/SmolLM2-135M-Instruct",
                   sharded=False, **dims)  # fmt: skip
    return path, tok


def _routes(model: Any, utts: list, cfgs: dict[str, Any]) -> dict[str, Any]:
    from speech_lens.lens.records import utterance_record
    from speech_lens.runs.lens import lens_batch
    from speech_lens.runs.lens_settings import encode_for_lens

    cfg0 = next(iter(cfgs.values()))
    prompts = [encode_for_lens(model, u, cfg0) for u in utts]  # word targets: in lens_batch

    def lens(cfg: Any) -> Any:
        def run() -> None:
            for p, u in zip(prompts, utts, strict=True):
                (res,) = lens_batch(model, [p], [u], cfg, None)
                utterance_record(res, p, model.layout)

        return run

    def forward() -> None:
        for p in prompts:
            model.bridge(p.tokens.unsqueeze(0))

    return {"forward": forward, **{key: lens(cfg) for key, cfg in cfgs.items()}}


def worker(spec: dict) -> dict:
    """All routes in this process: a warm-up pass each, then rotating rounds."""
    import torch

    torch.set_num_threads(spec["threads"])
    from speech_lens import load_model
    from speech_lens.data.encoded import SPEECH
    from speech_lens.lens.rows import layer_stride
    from speech_lens.runs.lens_settings import LensRunConfig, encode_for_lens

    model = load_model(spec["path"], base_tokenizer=spec["base_tokenizer"])
    utts = synthetic_utterances(model, spec["n_utts"], n_words=spec["n_words"])
    n_rows = model.n_layers + 1
    rows = {f"stride{s}": layer_stride(n_rows, s) for s in STRIDES}
    cfgs = {
        key: LensRunConfig(checkpoint=spec["path"], data="synthetic", family=model.spec.name,
                           layers=None if len(r) == n_rows else r)
        for key, r in rows.items()
    }  # fmt: skip
    fns = _routes(model, utts, cfgs)
    prompts = [encode_for_lens(model, u, cfgs["stride1"]) for u in utts]
    calls: list[dict[str, Any]] = []
    with torch.no_grad():
        for route in ROUTES:  # warm-up: kernels, lazy buffers, first-touch pages
            fns[route]()
        for r in range(spec["rounds"]):
            order = ROUTES[r % len(ROUTES) :] + ROUTES[: r % len(ROUTES)]
            for route in order:
                cpu0 = time.process_time()  # this process's CPU time: less load-bound than wall
                seconds, extra = measure_call(fns[route])
                cpu = time.process_time() - cpu0
                calls.append({"round": r, "route": route, "seconds": seconds, "cpu_seconds": cpu,
                              "extra_mb": extra})  # fmt: skip
                print(f"    round {r} {route}: {seconds:.2f}s wall, {cpu:.2f}s CPU", file=sys.stderr, flush=True)  # fmt: skip
    return {
        "calls": calls,
        "rows": {k: list(v) for k, v in rows.items()},
        "n_layers": model.n_layers,
        "vocab": int(model.layout.vocab_size),
        "n_utts": len(utts),
        "tokens_per_utt": [len(p.tokens) for p in prompts],
        "units_per_utt": [len(p.positions_of(SPEECH)) for p in prompts],
        "threads_used": torch.get_num_threads(),
    }


def summarise(calls: list[dict[str, Any]], n_utts: int) -> dict[str, Any]:
    """Wall and CPU seconds per utterance per route; within-round ratios of wall time."""
    rounds = sorted({c["round"] for c in calls})
    by = {(c["round"], c["route"]): c["seconds"] for c in calls}
    cpu = {(c["round"], c["route"]): c["cpu_seconds"] for c in calls}
    per_utt = {route: spread_stats([by[r, route] / n_utts for r in rounds]) for route in ROUTES}
    cpu_utt = {route: spread_stats([cpu[r, route] / n_utts for r in rounds]) for route in ROUTES}
    ratios = {}
    for s in STRIDES[1:]:
        ratios[f"stride1/stride{s}"] = spread_stats(
            [by[r, "stride1"] / by[r, f"stride{s}"] for r in rounds]
        )
    for s in STRIDES:
        ratios[f"stride{s}/forward"] = spread_stats(
            [by[r, f"stride{s}"] / by[r, "forward"] for r in rounds]
        )
    return {"seconds_per_utterance": per_utt, "cpu_seconds_per_utterance": cpu_utt,
            "ratios": ratios}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--name", default="stride_minisims", help="benchmarks/results/<name>.json")
    bench_meta.add_run_args(ap, threads=1)
    ap.add_argument("--utts", type=int, default=20)
    ap.add_argument("--words", type=int, default=8, help="words per utterance (0.3 s each)")
    args = ap.parse_args()
    if bench_meta.ran_as_worker(args, worker):
        return
    root = args.root or Path(tempfile.mkdtemp(prefix="speech-lens-bench-"))
    path, tok = build_subject(root, args.smoke)
    settings = {"threads": args.threads, "rounds": args.rounds, "utts": args.utts,
                "words": args.words, "k": 10, "batch_size": 1, "positions": "speech",
                "smoke": args.smoke, "routes": list(ROUTES)}  # fmt: skip
    doc = {**bench_meta.run_header("bench_stride"), "settings": settings,
           "dims": {**MINISIMS_DIMS, **(SMOKE_DIMS if args.smoke else {})}}  # fmt: skip
    spec = {"path": str(path), "base_tokenizer": str(tok), "n_utts": args.utts,
            "n_words": args.words, "threads": args.threads, "rounds": args.rounds}  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                         stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"worker exit {out.returncode}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    doc.update({k: v for k, v in res.items() if k != "calls"})
    doc["wall_seconds"] = round(time.perf_counter() - t0, 1)
    doc.update(summarise(res["calls"], res["n_utts"]))
    doc["calls"] = res["calls"]
    out_path = args.out_dir / f"{args.name}.json"
    bench_meta.write_json_atomic(out_path, bench_meta.finish(doc))
    print(f"wrote {out_path}")
    for route, st in doc["seconds_per_utterance"].items():
        c = doc["cpu_seconds_per_utterance"][route]
        print(f"{route}: {st['median']:.3f} s/utt wall (min {st['min']:.3f}, max {st['max']:.3f}), {c['median']:.3f} s/utt CPU")  # fmt: skip
    for name, st in doc["ratios"].items():
        print(f"{name}: {st['median']:.2f}x (min {st['min']:.2f}, max {st['max']:.2f})")


if __name__ == "__main__":
    main()
