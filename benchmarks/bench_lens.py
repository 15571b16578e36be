"""Streaming logit lens vs plain TransformerLens: wall time and peak extra memory, side by side.

    .venv/bin/python benchmarks/bench_lens.py [--llama-layers 4 --qwen-layers 4 --seqs 256 1024]

Models: random weights in real shapes, built once in SpiritLM / SIMS on-disk format by
``speech_lens.testing.build_family`` (so ``load_model`` reads them like real checkpoints):
Llama-2-7B width (d 4096, FFN 11008, 32 heads, vocab 32512) and a SIMS Qwen2.5-3B shape
(d 2048, FFN 11008, 16 / 2 heads, tied, vocab 152167), each with only a few layers so they fit
one CPU box. Every measurement runs in a fresh subprocess (the allocator keeps freed pages, so
one process per method keeps peaks honest):

* ``forward``: ``bridge(tokens)``, the plain forward pass (the baseline);
* ``lens``: ``speech_lens.logit_lens(model, tokens, k=10, targets="next")`` (all rows: top-k text
  and overall, unit / text / speech / marker mass, rank and log-prob of the next token);
* ``naive``: TransformerLens as documented: ``run_with_cache`` (residual hooks only, the cheapest
  cache for this) + ``cache.accumulated_resid(apply_ln=True)`` + ``@ W_U + b_U`` (the full
  ``[layers, pos, vocab]`` logits) + the same top-k.

Peak extra memory = peak RSS during the call minus RSS just before it (Linux ``VmHWM`` after a
reset through ``/proc/self/clear_refs``). The FLOP floor is (forward + n_layers unembeddings) /
forward, from the shapes.

Batched rows (``--batched``; ``--only-batched`` skips the table above): the word-level lens
(``word_lens``, k=10, every row) over a set of utterances, one by one against
``word_lens_batch`` in padded batches of 8 and of ``auto`` size (from ``--memory-budget``),
in utterances per second (best of ``--repeats`` rounds over all settings; "max/min" is the
spread over the rounds), all in one process per model after a warm-up; then what restricting
the lens saves at batch 8: ``positions="speech"`` (unit positions only) on speech-only and on
interleaved prompts, and a subset of 25% of the lens rows (the first quarter, where the forward
stops early, with and without that stop, and a quarter spread over the depth ending at the
output). Subjects: a shipped organism (``organisms/textinit_interleaved`` on the first
``--organism-utts`` utterances of ``organisms/test_manifest.jsonl``) and the Qwen2.5-3B shape
with ``--batch-qwen-layers`` layers on synthetic utterances.
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

SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(
        family="spiritlm",
        dims=dict(
            hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
            num_key_value_heads=32, max_position_embeddings=4096,
        ),
    ),
    "qwen2.5-3b": dict(
        family="sims-qwen",
        dims=dict(
            hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
            num_key_value_heads=2, max_position_embeddings=4096,
        ),
    ),
}  # fmt: skip


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from speech_lens import load_model, logit_lens

    model = load_model(spec["path"], **spec["kw"])
    lay = model.layout
    g = torch.Generator().manual_seed(0)
    n = spec["seq"]
    # a realistic speech prompt: marker then unit ids
    units = lay.unit_ids[torch.randint(0, lay.units.count, (n - 1,), generator=g)]
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

    fn = {"forward": forward, "lens": lens, "naive": naive}[spec["method"]]
    with torch.no_grad():
        # warm up kernels and lazy buffers on a short input (not measured)
        short = toks[:16].unsqueeze(0)
        bridge(short)
        logit_lens(model, toks[:16], k=10)
        _reset_peak()
        rss0 = _status_kb("VmRSS")
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        peak = _status_kb("VmHWM")
    return {"seconds": dt, "peak_extra_mb": (peak - rss0) / 1024, "rss0_mb": rss0 / 1024}


def _synthetic_utterances(model, n: int) -> list:
    """``n`` utterances of 3..8 words (0.3 s each) with random units at the family's rate."""
    import torch

    from speech_lens import Utterance, Word

    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "home"]
    rate = model.layout.units.frame_rate
    g = torch.Generator().manual_seed(0)
    out = []
    for j in range(n):
        n_words = 3 + j % 6
        picks = torch.randint(0, len(words), (n_words,), generator=g).tolist()
        ws = tuple(Word(words[p], 0.3 * i, 0.3 * (i + 1)) for i, p in enumerate(picks))
        units = torch.randint(
            0, model.layout.units.count, (round(0.3 * n_words * rate),), generator=g
        )
        out.append(Utterance(f"s{j}", ws, tuple(units.tolist()), None, rate))
    return out


def batched_worker(spec: dict) -> dict:
    """Throughput rows for one model: one process, warm-up first, then every setting."""
    import torch

    torch.set_num_threads(spec["threads"])
    from speech_lens import load_model
    from speech_lens.batching import plan_batches
    from speech_lens.data.encoded import SPEECH
    from speech_lens.data.manifest import read_manifest
    from speech_lens.data.prompts import encode_prompt
    from speech_lens.data.word_targets import word_targets
    from speech_lens.lens.logit import word_lens, word_lens_batch

    model = load_model(spec["path"], **spec["kw"])
    if spec.get("manifest"):
        utts = list(read_manifest(spec["manifest"], layout=model.layout))[: spec["n_utts"]]
    else:
        utts = _synthetic_utterances(model, spec["n_utts"])
    speech = [encode_prompt(model, u, mode="speech") for u in utts]
    inter = [encode_prompt(model, u, mode="interleaved", seed=i) for i, u in enumerate(utts)]
    targets = [word_targets(model, u) for u in utts]
    budget = spec["budget"]
    n_rows = model.n_layers + 1
    quarter = max(1, round(0.25 * n_rows))
    first = list(range(quarter))
    spread = sorted({round(n_rows - 1 - i * (n_rows - 1) / max(1, quarter - 1)) for i in range(quarter)}) if quarter > 1 else [n_rows - 1]  # fmt: skip

    def one_by_one(prompts, **kw):
        for p, t in zip(prompts, targets, strict=True):
            word_lens(model, p, t, k=10, **kw)

    def batched(prompts, size, **kw):
        for idx in plan_batches(model, [len(p) for p in prompts], size, memory_budget_gb=budget):
            word_lens_batch(model, [prompts[i] for i in idx], [targets[i] for i in idx], k=10, **kw)

    runs = [
        ("speech prompts, one by one", lambda: one_by_one(speech)),
        ("speech prompts, batch 8", lambda: batched(speech, 8)),
        ("speech prompts, batch auto", lambda: batched(speech, "auto")),
        ('speech prompts, batch 8, positions="speech"', lambda: batched(speech, 8, positions="speech")),
        ("interleaved prompts, batch 8", lambda: batched(inter, 8)),
        ('interleaved prompts, batch 8, positions="speech"', lambda: batched(inter, 8, positions="speech")),
        (f"speech prompts, batch 8, rows {first} (first 25%, stops early)", lambda: batched(speech, 8, layers=first)),
        (f"speech prompts, batch 8, rows {first}, no early stop", lambda: batched(speech, 8, layers=first, stop_early=False)),
        (f"speech prompts, batch 8, rows {spread} (25% spread)", lambda: batched(speech, 8, layers=spread)),
    ]  # fmt: skip
    auto_sizes = [len(b) for b in plan_batches(model, [len(p) for p in speech], "auto", memory_budget_gb=budget)]  # fmt: skip
    with torch.no_grad():
        word_lens(model, speech[0], targets[0], k=10)  # warm-up (not measured)
        word_lens_batch(model, speech[:2], targets[:2], k=10)
        # rounds over all settings, best of each: load from other jobs on the machine then
        # hits every setting alike instead of whichever ran during a burst
        times: list[list[float]] = [[] for _ in runs]
        for _ in range(spec["repeats"]):
            for (label, fn), ts in zip(runs, times, strict=True):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
                print(f"    {label}: {ts[-1]:.2f}s", file=sys.stderr, flush=True)
        out = [
            {"setting": label, "seconds": min(ts), "utt_per_s": len(utts) / min(ts),
             "spread": max(ts) / min(ts)}
            for (label, _), ts in zip(runs, times, strict=True)
        ]  # fmt: skip
    return {
        "rows": out,
        "n_utts": len(utts),
        "n_layers": model.n_layers,
        "mean_len": sum(len(p) for p in speech) / len(speech),
        "inter_speech_share": sum(len(p.positions_of(SPEECH)) for p in inter)
        / sum(len(p) for p in inter),
        "auto_sizes": auto_sizes,
    }


def run_batched(args: argparse.Namespace, root: Path) -> None:
    from speech_lens.testing.families import build_family

    repo = Path(__file__).resolve().parents[1]
    subjects = [
        ("organism textinit_interleaved", {"path": str(repo / "organisms" / "textinit_interleaved"), "kw": {},
         "manifest": str(repo / "organisms" / "test_manifest.jsonl"), "n_utts": args.organism_utts}),
    ]  # fmt: skip
    if args.batch_qwen_layers > 0:
        t0 = time.perf_counter()
        dims = dict(SHAPES["qwen2.5-3b"]["dims"])
        if args.smoke:
            dims.update(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2)  # fmt: skip
        path, kw = build_family(
            "sims-qwen", root / "qwen-batched", num_hidden_layers=args.batch_qwen_layers, **dims
        )
        print(f"built qwen2.5-3b shape ({args.batch_qwen_layers} layers) in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
        subjects.append(
            (f"qwen2.5-3b shape ({args.batch_qwen_layers} layers), synthetic",
             {"path": str(path), "kw": {k: str(v) for k, v in kw.items()}, "n_utts": args.qwen_utts}),
        )  # fmt: skip
    results = []
    for name, spec in subjects:
        spec = {**spec, "threads": args.threads, "budget": args.memory_budget, "batched": True,
                "repeats": args.repeats}  # fmt: skip
        print(f"  {name}", flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
        results.append((name, json.loads(out.stdout.strip().splitlines()[-1])))
    print()
    print(
        "| model | utterances (mean tokens) | setting | s | utt/s | vs one by one | vs batch 8 "
        "| max/min |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results:
        base = r["rows"][0]["seconds"]
        b8 = r["rows"][1]["seconds"]
        for row in r["rows"]:
            print(
                f"| {name} | {r['n_utts']} ({r['mean_len']:.0f}) | {row['setting']} | "
                f"{row['seconds']:.2f} | {row['utt_per_s']:.1f} | {base / row['seconds']:.2f}x | "
                f"{b8 / row['seconds']:.2f}x | {row['spread']:.2f} |"
            )
    for name, r in results:
        print(
            f"{name}: {r['n_layers']} layers; auto batch sizes {r['auto_sizes']} "
            f"(budget {args.memory_budget:g} GiB); unit positions are "
            f"{r['inter_speech_share']:.0%} of the interleaved prompts' positions"
        )


def _floor(shape: str, n_layers: int) -> float:
    d = SHAPES[shape]["dims"]
    h, f = d["hidden_size"], d["intermediate_size"]
    heads, kv = d["num_attention_heads"], d["num_key_value_heads"]
    vocab = 32512 if shape.startswith("llama") else 152167
    head_dim = h // heads
    per_layer = 2 * h * h + 2 * h * kv * head_dim + 3 * h * f  # q, o, k, v, gate/up/down
    unembed = h * vocab
    fwd = n_layers * per_layer + unembed
    return (fwd + n_layers * unembed) / fwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--llama-layers", type=int, default=4)
    ap.add_argument("--qwen-layers", type=int, default=4)
    ap.add_argument("--seqs", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", type=Path, help="where the random checkpoints go (default: temp)")
    ap.add_argument("--smoke", action="store_true", help="tiny widths, to check the script runs")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batched", action="store_true", help="also the batched throughput rows")
    ap.add_argument("--only-batched", action="store_true", help="only the batched rows")
    ap.add_argument("--organism-utts", type=int, default=96)
    ap.add_argument("--qwen-utts", type=int, default=8)
    ap.add_argument("--batch-qwen-layers", type=int, default=2, help="0: organism only")
    ap.add_argument("--memory-budget", type=float, default=4.0, help="GiB, for batch 'auto'")
    ap.add_argument("--repeats", type=int, default=3, help="batched rows: best of N rounds")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(batched_worker(spec) if spec.get("batched") else worker(spec)))
        return

    from speech_lens.testing.families import build_family

    root = args.root or Path(tempfile.mkdtemp(prefix="speech-lens-bench-"))
    if args.batched or args.only_batched:
        print("batched rows", flush=True)
        run_batched(args, root)
        if args.only_batched:
            return
    layers = {"llama2-7b": args.llama_layers, "qwen2.5-3b": args.qwen_layers}
    rows = []
    for shape, cfg in SHAPES.items():
        if shape not in args.shapes:
            continue
        t0 = time.perf_counter()
        dims = dict(cfg["dims"])
        if args.smoke:
            dims.update(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2)  # fmt: skip
        path, kw = build_family(
            cfg["family"], root / shape, num_hidden_layers=layers[shape], **dims
        )
        print(
            f"built {shape} ({layers[shape]} layers) in {time.perf_counter() - t0:.0f}s", flush=True
        )
        for seq in args.seqs:
            res = {}
            for method in ("forward", "lens", "naive"):
                spec = {"path": str(path), "kw": {k: str(v) for k, v in kw.items()},
                        "seq": seq, "method": method, "threads": args.threads}  # fmt: skip
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps(spec)],
                    capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                )  # fmt: skip
                if out.returncode != 0:
                    raise RuntimeError(f"{shape} seq {seq} {method} failed:\n{out.stderr[-3000:]}")
                res[method] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"  {shape} seq {seq} {method}: {res[method]}", flush=True)
            rows.append((shape, layers[shape], seq, res))

    print()
    print("| shape (layers) | seq | forward s | lens / fwd | naive / fwd | FLOP floor | "
          "fwd extra MB | lens extra MB | naive extra MB | lens / naive mem |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape, n_layers, seq, r in rows:
        f, ln, nv = r["forward"], r["lens"], r["naive"]
        print(
            f"| {shape} ({n_layers}) | {seq} | {f['seconds']:.2f} | "
            f"{ln['seconds'] / f['seconds']:.2f}x | {nv['seconds'] / f['seconds']:.2f}x | "
            f"{_floor(shape, n_layers):.2f}x | {f['peak_extra_mb']:.0f} | "
            f"{ln['peak_extra_mb']:.0f} | {nv['peak_extra_mb']:.0f} | "
            f"{ln['peak_extra_mb'] / nv['peak_extra_mb']:.3f} |"
        )
    print(
        "\nextra MB = peak RSS during the call minus RSS before it; the forward's own extra is "
        "inside lens and naive too.\nlens over the forward's extra: "
        + ", ".join(
            f"{s}/{q}: {r['lens']['peak_extra_mb'] - r['forward']['peak_extra_mb']:.0f} MB vs naive "
            f"{r['naive']['peak_extra_mb'] - r['forward']['peak_extra_mb']:.0f} MB"
            for s, _, q, r in rows
        )
    )


if __name__ == "__main__":
    main()
