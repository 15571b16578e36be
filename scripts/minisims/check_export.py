"""Export check: a training state -> delta (fp16) -> rebuilt UnitLM folder -> loaded back.

  python scripts/minisims/check_export.py runs/minisims/state.pt

1. the merged plain LlamaForCausalLM (LoRA merged, rows concatenated) reproduces the PEFT training
   model's fp32 logits (tight tolerance: only the order of float sums differs);
2. the UnitLM folder written from the fp16 delta, read back by stripping ``lm.`` and rebuilding
   the nested ``base_config`` with 49,654 rows, reproduces the model rebuilt from the delta;
3. speech_lens.load_model (family sims, --base-tokenizer = the cached SmolLM2 folder) loads the
   folder and its bridge's logits equal the plain HF forward.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from common import base_dir
from export import delta_from_state, model_from_delta
from model import build, load_trainable, merged_lm, save_unitlm
from safetensors.torch import load_file

from data import VOCAB, Corpus, batch
from speech_lens.models.delta import write_unit_delta


def read_unitlm(d: Path) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "speech_language_model" and cfg["vocab_size"] == VOCAB
    # eager attention, as training (common.load_base) and speech_lens use: sdpa differs ~1e-4
    base = LlamaConfig(**{**cfg["base_config"], "vocab_size": cfg["vocab_size"]})
    base._attn_implementation = "eager"
    lm = LlamaForCausalLM(base)
    state = load_file(str(d / "model.safetensors"))
    assert all(k.startswith("lm.") for k in state), "weights must carry the lm. prefix"
    assert "lm.lm_head.weight" not in state, "tied: no separate lm_head"
    missing, unexpected = lm.load_state_dict({k[3:]: v for k, v in state.items()}, strict=False)
    assert not unexpected and missing == ["lm_head.weight"], (missing, unexpected)
    lm.tie_weights()
    return lm.eval()


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    st = torch.load(sys.argv[1], weights_only=False)
    c = Corpus.load(Path("runs/minisims/data/corpus.json"))
    ids = torch.from_numpy(batch(c, 123, 0, 2, 64))
    model, vocab = build(st["config"]["seed"], st["config"]["lora_rank"])
    load_trainable(model, st["trainable"])
    model.eval()
    ref = model(input_ids=ids).logits
    merged = merged_lm(model, vocab)
    torch.testing.assert_close(merged(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
    print("1. merged == PEFT model: ok")
    tmp = Path(tempfile.mkdtemp(prefix="minisims-export-"))
    write_unit_delta(tmp / "delta.safetensors", delta_from_state(st))
    size = (tmp / "delta.safetensors").stat().st_size
    rebuilt, rv = model_from_delta(tmp / "delta.safetensors")
    rebuilt.eval()
    want = rebuilt(input_ids=ids).logits
    save_unitlm(merged_lm(rebuilt, rv), tmp / "unitlm")
    lm = read_unitlm(tmp / "unitlm")
    got = lm(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    drift = (want - ref).abs().max().item()
    print(
        f"2. UnitLM from the fp16 delta ({size / 1e6:.2f} MB) == delta model: ok; fp16 drift {drift:.3g}"
    )
    import speech_lens

    slm = speech_lens.load_model(tmp / "unitlm", family="sims", base_tokenizer=base_dir())
    bridge = slm.bridge(ids, return_type="logits")
    torch.testing.assert_close(bridge, got, rtol=1e-5, atol=1e-5)
    print("3. speech_lens.load_model (sims, base tokenizer = SmolLM2): logits == plain HF: ok")
    print(json.dumps({"delta_bytes": size, "max_abs_fp16_drift": drift}))


if __name__ == "__main__":
    main()
