"""A slamkit ``UnitLM`` folder read with transformers alone (no speech_lens): the reference that
parity tests compare the library's bridge against."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def plain_hf(path: Path) -> torch.nn.Module:
    """The checkpoint read with transformers alone: strip ``lm.``, size the base config to the
    stored rows, eager attention."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(json.loads((path / "config.json").read_text())["base_config"])
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update({k.removeprefix("lm."): v for k, v in load_file(str(f)).items()})
    base["vocab_size"] = state["model.embed_tokens.weight"].shape[0]
    cfg = AutoConfig.for_model(base.pop("model_type"), **base)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    model.tie_weights()
    return model.eval()
