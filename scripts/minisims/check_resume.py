"""Resume check: 3 uninterrupted steps vs 2 steps + stop + resume for 1 step, on a tiny batch.
The trainable state (new rows, LoRA) and the optimizer moments must be bit-identical, and
``data.batch`` must be a pure function of (seed, step).

  python scripts/minisims/check_resume.py      # exits non-zero on a mismatch
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import ROOT
from train import TrainConfig, run

from data import Corpus, batch

CORPUS = ROOT / "runs" / "minisims" / "data" / "corpus.json"


def main() -> None:
    torch.set_num_threads(1)
    c = Corpus.load(CORPUS)
    a, b = batch(c, 3, 17, 4, 64), batch(c, 3, 17, 4, 64)
    assert np.array_equal(a, b), "batch(seed, step) is not deterministic"
    assert not np.array_equal(a, batch(c, 3, 18, 4, 64)), "steps 17 and 18 gave the same batch"
    cfg = TrainConfig(batch_size=1, seq_len=32, total_tokens=32 * 3, warmup_steps=2)
    tmp = Path(tempfile.mkdtemp(prefix="minisims-resume-"))
    try:
        run(cfg, tmp / "straight", CORPUS, 60.0, gates=False)
        run(cfg, tmp / "resumed", CORPUS, 60.0, gates=False, stop_after=2)
        run(cfg, tmp / "resumed", CORPUS, 60.0, gates=False)
        s1 = torch.load(tmp / "straight" / "state.pt", weights_only=False)
        s2 = torch.load(tmp / "resumed" / "state.pt", weights_only=False)
        assert s1["step"] == s2["step"] == 3
        for k, v in s1["trainable"].items():
            assert torch.equal(v, s2["trainable"][k]), f"trainable {k} differs after resume"
        for k, st in s1["optimizer"]["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(st[name], s2["optimizer"]["state"][k][name]), f"adam {k} {name}"
        size = (tmp / "straight" / "state.pt").stat().st_size
        print(
            f"resume check passed: {len(s1['trainable'])} tensors identical; state {size / 1e6:.1f} MB"
        )
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
