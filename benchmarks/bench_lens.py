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

SHAPES = {
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
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from speech_lens.testing import build_family

    root = args.root or Path(tempfile.mkdtemp(prefix="speech-lens-bench-"))
    layers = {"llama2-7b": args.llama_layers, "qwen2.5-3b": args.qwen_layers}
    rows = []
    for shape, cfg in SHAPES.items():
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
