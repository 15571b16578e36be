"""Train or resume one organism run: python scripts/train_organism.py NAME [NAME ...]."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from speech_lens.organisms.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="+")
    ap.add_argument("--config", default=str(ROOT / "scripts" / "organisms.toml"))
    ap.add_argument("--data", default=str(ROOT / "runs" / "data"))
    ap.add_argument("--runs", default=str(ROOT / "runs"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for name in a.names:
        train(TrainConfig.from_toml(a.config, name), a.data, a.runs)
        print(f"done: {name}", flush=True)
