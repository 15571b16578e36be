"""One organism training step (forward + backward + AdamW), fp32 vs bf16 autocast, 1 thread.

    .venv/bin/python benchmarks/bench_organism_step.py --threads 1

writes ``benchmarks/results/organism_step.json`` atomically. Subject: the organisms' Llama in two
shapes (issue 17's d 256 x 8 layers and the shipped d 128 x 6), a U0 vocabulary (936 words +
59 units), random tokens, batch 16 x 128 as in ``scripts/organisms.toml``. Timing does not depend
on the data. Routes per shape: ``fp32`` and ``bf16`` (``torch.autocast("cpu", bfloat16)`` around
the forward and the loss; weights and AdamW stay fp32, as ``TrainConfig.autocast_bf16`` trains).
One process: a warm-up of every route, then ``--rounds`` rounds running every route for
``--steps`` steps in a rotating order; reported per route: seconds per step (median, min-max over
rounds) and tokens per second; the bf16 / fp32 speed-up is taken within each round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import bench_meta
import torch

from speech_lens.organisms.checkpoint import OrganismVocab, llama_config
from speech_lens.organisms.train import TrainConfig, losses

SHAPES = {"d256_l8": (256, 8, 4, 768), "d128_l6": (128, 6, 4, 384)}


def make(shape: str, vocab: OrganismVocab) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from transformers import LlamaForCausalLM

    d, n_layers, heads, ff = SHAPES[shape]
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(vocab, d, n_layers, heads, ff))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def steps(model: torch.nn.Module, opt: torch.optim.Optimizer, bf16: bool, n: int) -> float:
    cfg = TrainConfig(name="bench", autocast_bf16=bf16)
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, model.config.vocab_size, (16, 128), generator=g)
    cur = torch.full_like(toks, -100)
    t0 = time.perf_counter()
    for _ in range(n):
        loss, _ = losses(model, toks, cur, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    bench_meta.add_run_args(ap, threads=1)
    ap.add_argument("--steps", type=int, default=4, help="steps per route per round")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    doc = bench_meta.run_header("organism_step")
    vocab = OrganismVocab(tuple(f"w{i}" for i in range(936)), 59)
    shapes = ["d128_l6"] if a.smoke else list(SHAPES)
    models = {s: make(s, vocab) for s in shapes}
    routes = [(s, bf16) for s in shapes for bf16 in (False, True)]
    for s, bf16 in routes:  # warm-up
        steps(*models[s], bf16, 2)
    times: dict[str, list[float]] = {f"{s}/{'bf16' if b else 'fp32'}": [] for s, b in routes}
    for r in range(a.rounds):
        for s, bf16 in routes[r % len(routes) :] + routes[: r % len(routes)]:
            times[f"{s}/{'bf16' if bf16 else 'fp32'}"].append(steps(*models[s], bf16, a.steps))
    out = {}
    for key, ts in times.items():
        med = statistics.median(ts)
        out[key] = {
            "s_per_step": [round(x, 4) for x in ts],
            "median": round(med, 4),
            "min": round(min(ts), 4),
            "max": round(max(ts), 4),
            "tokens_per_s": round(16 * 128 / med),
        }
    for s in shapes:
        ratio = [a_ / b for a_, b in zip(times[f"{s}/fp32"], times[f"{s}/bf16"], strict=True)]
        out[f"{s}/speedup_bf16"] = {
            "per_round": [round(x, 3) for x in ratio],
            "median": round(statistics.median(ratio), 3),
        }
    doc.update(
        threads=a.threads,
        rounds=a.rounds,
        steps_per_round=a.steps,
        params={s: sum(p.numel() for p in models[s][0].parameters()) for s in shapes},
        routes=out,
    )
    bench_meta.write_json_atomic(a.out_dir / "organism_step.json", bench_meta.finish(doc))
    print({k: v["median"] for k, v in out.items()})


if __name__ == "__main__":
    main()
