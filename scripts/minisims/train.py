"""Step 4: continued training of mini-SIMS on the interleaved U0 stream, resumable.

  python scripts/minisims/train.py bench                 # tokens/s: fp32 / bf16 x full / rows+LoRA
  python scripts/minisims/train.py run --out runs/minisims   # trains; resumes from OUT/state.pt

Only the trainable state is checkpointed (new rows, LoRA, AdamW moments, step, token count, RNG),
atomically (temp file + rename) every --ckpt-minutes, and at the gate milestones a copy goes to
OUT/milestones/ and the gates (gates.py) run on it, written to OUT/gates.json. Batches are a pure
function of (seed, step), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from common import ROOT, sha256, write_json_atomic
from model import build, load_trainable, trainable_state

from data import VOCAB, Corpus, batch


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    batch_size: int = 4
    seq_len: int = 256
    lora_rank: int = 4
    lr_rows: float = 2e-3
    lr_lora: float = 5e-4
    warmup_steps: int = 30
    total_tokens: int = 2_000_000
    bf16: bool = True
    init: str = "mean"
    milestones: tuple[int, ...] = (250_000, 500_000, 1_000_000, 2_000_000)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        return math.ceil(self.total_tokens / self.tokens_per_step)


def lr_scale(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine to 10% at total_steps (slamkit: cosine 5e-4 -> 5e-5)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    rows = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("vocab.new")]
    rest = [
        p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("vocab.new")
    ]
    groups = [{"params": rows, "lr": cfg.lr_rows, "base_lr": cfg.lr_rows}]
    if rest:
        groups.append({"params": rest, "lr": cfg.lr_lora, "base_lr": cfg.lr_lora})
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.0)


def step_loss(model: torch.nn.Module, ids: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, dict]:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        logits = model(input_ids=ids).logits
    tgt = ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, VOCAB), tgt.reshape(-1), reduction="none"
    ).view_as(tgt)
    unit = (tgt >= 49152) & (tgt < 49152 + 500)
    parts = {
        "loss_units": nll[unit].mean().item() if unit.any() else float("nan"),
        "loss_text": nll[~unit].mean().item() if (~unit).any() else float("nan"),
    }
    return nll.mean(), parts


def save_state(
    path: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    cfg: TrainConfig,
    extra: dict,
) -> None:
    tmp = path.with_suffix(".tmp")
    state = {
        "trainable": trainable_state(model),
        "optimizer": opt.state_dict(),
        "step": step,
        "tokens": step * cfg.tokens_per_step,
        "config": asdict(cfg),
        "torch_rng": torch.get_rng_state(),
        **extra,
    }
    torch.save(state, tmp)
    os.replace(tmp, path)


def light_state(src: Path, dst: Path) -> None:
    """``src`` without the AdamW moments (a third of the size with LoRA rank 16: what the
    repository keeps between sessions). Resuming from it restarts the moments, so the run is
    no longer bit-identical to an uninterrupted one; everything else (weights, step, RNG) is."""
    st = torch.load(src, weights_only=False)
    st["optimizer"] = None
    tmp = dst.with_suffix(".tmp")
    torch.save(st, tmp)
    os.replace(tmp, dst)


def claim_run_dir(out: Path) -> None:
    """Refuse a second trainer on the same state (it would overwrite the first one's
    checkpoints): OUT/train.pid names the live owner."""
    pid_file = out / "train.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().strip() or 0)
        alive = True
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, ValueError):
            alive = False
        if alive and pid != os.getpid():
            raise RuntimeError(f"{out}: process {pid} is already training here ({pid_file})")
    pid_file.write_text(f"{os.getpid()}\n")


def run(
    cfg: TrainConfig,
    out: Path,
    corpus_path: Path,
    ckpt_minutes: float,
    gates: bool,
    stop_after: int | None = None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    claim_run_dir(out)
    corpus = Corpus.load(corpus_path)
    corpus_sha = sha256(corpus_path)
    torch.manual_seed(cfg.seed)
    model, _ = build(cfg.seed, cfg.lora_rank, init=cfg.init, phonemes=corpus.phonemes)
    opt = optimizer(model, cfg)
    state_path = out / "state.pt"
    step = 0
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        saved = {"init": "mean", **st["config"]}  # states from before the init option
        saved["milestones"] = tuple(saved["milestones"])
        if saved != asdict(cfg):
            raise RuntimeError(f"{state_path}: saved with config {st['config']}, not {asdict(cfg)}")
        if st.get("corpus_sha256", corpus_sha) != corpus_sha:
            raise RuntimeError(f"{state_path}: trained on another corpus than {corpus_path}")
        load_trainable(model, st["trainable"])
        if st["optimizer"] is None:  # a light state (light_state): moments restart here
            print(f"{state_path}: no AdamW moments; they restart at step {st['step']}", flush=True)
        else:
            opt.load_state_dict(st["optimizer"])
        torch.set_rng_state(st["torch_rng"])
        step = st["step"]
        print(f"resumed at step {step} ({st['tokens']} tokens)", flush=True)
    last_ckpt = time.time()
    last = cfg.total_steps if stop_after is None else min(cfg.total_steps, step + stop_after)
    while step < last:
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_scale(cfg, step)
        ids = torch.from_numpy(batch(corpus, cfg.seed, step, cfg.batch_size, cfg.seq_len))
        c0 = time.process_time()
        loss, parts = step_loss(model, ids, cfg.bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        tokens = step * cfg.tokens_per_step
        rec = {
            "step": step,
            "tokens": tokens,
            "loss": round(loss.item(), 4),
            **{k: round(v, 4) for k, v in parts.items()},
            "lr_scale": round(lr_scale(cfg, step - 1), 4),
            "sec": round(time.time() - t0, 2),
            "cpu_sec": round(time.process_time() - c0, 2),
        }
        print(json.dumps(rec), flush=True)
        crossed = [m for m in cfg.milestones if tokens - cfg.tokens_per_step < m <= tokens]
        if crossed or time.time() - last_ckpt > ckpt_minutes * 60 or step == last:
            save_state(state_path, model, opt, step, cfg, {"corpus_sha256": corpus_sha})
            last_ckpt = time.time()
        for m in crossed:
            snap = out / "milestones" / f"tokens_{m}.pt"
            snap.parent.mkdir(exist_ok=True)
            shutil.copyfile(state_path, snap)
            if gates:  # a failing gate must not stop training: the snapshot can be rerun
                import gates as gate_mod

                try:
                    gate_mod.evaluate_into(model, out / "gates.json", f"tokens_{m}", step, tokens)
                except Exception as e:
                    print(f"gates at {m} tokens failed: {e!r}", flush=True)
                model.train()
    print("done" if step == cfg.total_steps else f"stopped at step {step}", flush=True)


def bench(corpus_path: Path, steps: int, out: Path) -> None:
    """Seconds per step of each training mode on the same batches (1 warm-up step not timed)."""
    corpus = Corpus.load(corpus_path)
    cfg = TrainConfig()
    results = {}
    for full in (False, True):
        for bf16 in (True, False):
            name = f"{'full' if full else 'rows+lora'}_{'bf16' if bf16 else 'fp32'}"
            model, _ = build(0, cfg.lora_rank, full=full)
            opt = (
                optimizer(model, cfg)
                if not full
                else torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            )
            times, cpu = [], []
            for s in range(steps + 1):
                ids = torch.from_numpy(batch(corpus, 0, s, cfg.batch_size, cfg.seq_len))
                t0, c0 = time.time(), time.process_time()
                loss, _ = step_loss(model, ids, bf16)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times.append(time.time() - t0)
                cpu.append(time.process_time() - c0)
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            sec, csec = sum(times[1:]) / steps, sum(cpu[1:]) / steps
            results[name] = {
                "sec_per_step": round(sec, 2),
                "tokens_per_s": round(cfg.tokens_per_step / sec, 1),
                "cpu_sec_per_step": round(csec, 2),
                "tokens_per_cpu_s": round(cfg.tokens_per_step / csec, 1),
                "trainable_params": n_train,
                "steps_timed": steps,
                "loss_last": round(loss.item(), 3),
            }
            print(name, results[name], flush=True)
            write_json_atomic(
                out,
                {
                    "threads": torch.get_num_threads(),
                    "batch": [cfg.batch_size, cfg.seq_len],
                    "load_avg_1min": os.getloadavg()[0],
                    "modes": results,
                },
            )
            del model, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=["run", "bench", "light"])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "minisims")
    ap.add_argument(
        "--corpus", type=Path, default=ROOT / "runs" / "minisims" / "data" / "corpus.json"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="bench: timed steps per mode")
    ap.add_argument("--total-tokens", type=int, default=TrainConfig.total_tokens)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--ckpt-minutes", type=float, default=10.0)
    ap.add_argument("--no-gates", action="store_true")
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    ap.add_argument("--init", choices=["mean", "graphemes"], default=TrainConfig.init)
    ap.add_argument("--lora-rank", type=int, default=TrainConfig.lora_rank)
    ap.add_argument("--lr-rows", type=float, default=TrainConfig.lr_rows)
    ap.add_argument("--lr-lora", type=float, default=TrainConfig.lr_lora)
    ap.add_argument("--to", type=Path, help="light: where to write the light state")
    ap.add_argument("--stop-after", type=int, help="run: stop (checkpointed) after N more steps")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.mode == "light":  # train.py light --out RUN_DIR --to FILE
        light_state(a.out / "state.pt", a.to)
        return
    if a.mode == "bench":
        bench(a.corpus, a.steps, ROOT / "organisms" / "minisims" / "bench.json")
    else:
        cfg = TrainConfig(
            total_tokens=a.total_tokens,
            bf16=not a.fp32,
            batch_size=a.batch_size,
            seq_len=a.seq_len,
            init=a.init,
            lora_rank=a.lora_rank,
            lr_rows=a.lr_rows,
            lr_lora=a.lr_lora,
        )
        run(cfg, a.out, a.corpus, a.ckpt_minutes, not a.no_gates, a.stop_after)


if __name__ == "__main__":
    main()
