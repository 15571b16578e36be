"""speech_lens on the rebuilt mini-SIMS: its logits equal a plain HF forward of the same folder.

  python scripts/minisims/export.py organisms/minisims/checkpoint/state.pt --unitlm /tmp/x/unitlm
  python scripts/minisims/check_library.py /tmp/x/unitlm [--state STATE.pt] [--out JSON]

1. ``speech_lens.load_model(DIR, family="sims", base_tokenizer=<SmolLM2 fp32 cache>)`` loads the
   UnitLM folder; the rebuilt tokenizer puts ``<Un0>`` at len(SmolLM2 tokenizer) = 49,152 and the
   markers at +500/+501, as training did.
2. For the first ``--n`` held-out utterances, the library's speech / text / interleaved prompts:
   the speech prompt's ids equal the manifest's units + 49,152 (no marker: SIMS scores bare
   units), and the bridge's fp32 logits equal those of a LlamaForCausalLM built here from
   config.json's ``base_config`` and the ``lm.``-stripped safetensors (torch assert_close).
3. With ``--state``: the same against the PEFT training model (LoRA unmerged, new rows separate),
   i.e. the exported folder is the trained model (a looser tolerance: LoRA merge reorders sums).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from check_export import read_unitlm
from common import N_BASE_TOKENS, SHIPPED, base_dir, write_json_atomic
from model import build, load_trainable

import speech_lens

TIGHT = {"rtol": 1e-5, "atol": 1e-5}  # same weights, same fp32 ops: only kernel sum order differs
# merged W + BA vs W x + B(A x): fp32 sums reordered in 210 LoRA layers, logits up to ~37
MERGED = {"rtol": 1e-4, "atol": 5e-4}


def compare(got: torch.Tensor, want: torch.Tensor, tol: dict[str, float]) -> dict[str, Any]:
    torch.testing.assert_close(got, want, **tol)
    return {
        "max_abs_diff": float((got - want).abs().max()),
        "top1_agree": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
        "tolerance": tol,
    }


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("unitlm", type=Path, help="UnitLM folder written by export.py --unitlm")
    ap.add_argument("--state", type=Path, help="also compare with this train.py state (PEFT)")
    ap.add_argument("--manifest", type=Path, default=SHIPPED / "test_manifest.jsonl")
    ap.add_argument("--n", type=int, default=4, help="utterances")
    ap.add_argument("--out", type=Path, default=SHIPPED / "library_check.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    slm = speech_lens.load_model(a.unitlm, family="sims", base_tokenizer=base_dir())
    lay = slm.layout
    assert lay.units.first_id == N_BASE_TOKENS, lay.units
    assert lay.marker_ids == {"speech": N_BASE_TOKENS + 500, "text": N_BASE_TOKENS + 501}
    plain = read_unitlm(a.unitlm)
    peft = None
    if a.state:
        st = torch.load(a.state, weights_only=False)
        peft, _ = build(st["config"]["seed"], st["config"]["lora_rank"])
        load_trainable(peft, st["trainable"])
        peft.eval()
    utts = list(speech_lens.read_manifest(a.manifest, layout=lay))[: a.n]
    rows = []
    for u in utts:
        for mode in ("speech", "text", "interleaved"):
            p = speech_lens.encode_prompt(slm, u, mode=mode, seed=0)
            ids = p.tokens[None]
            if mode == "speech":
                want_ids = [N_BASE_TOKENS + int(k) for k in u.units]
                assert p.tokens.tolist() == want_ids, (u.id, p.tokens.tolist()[:8], want_ids[:8])
            got = slm.bridge(ids, return_type="logits")
            row = {"utterance": u.id, "mode": mode, "n_tokens": int(ids.shape[1])}
            row["vs_plain_hf"] = compare(got, plain(input_ids=ids).logits, TIGHT)
            if peft is not None:
                row["vs_peft_state"] = compare(got, peft(input_ids=ids).logits, MERGED)
            rows.append(row)
            print(json.dumps(row))
    report = {
        "unitlm": str(a.unitlm),
        "state": str(a.state) if a.state else None,
        "model": slm.describe(),
        "units_first_id": lay.units.first_id,
        "marker_ids": lay.marker_ids,
        "control_ids": lay.control_ids,
        "prompts": rows,
        "all_close": True,  # every assert_close above passed (a failure raises before this)
    }
    write_json_atomic(a.out, report)
    print(f"{len(rows)} prompts: bridge == plain HF forward; wrote {a.out}")


if __name__ == "__main__":
    main()
