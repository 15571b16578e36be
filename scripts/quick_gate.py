"""Cheap gate on a run in progress (reads RUNS/RUN/state.pt; test manifest as evaluate_organisms):

python scripts/quick_gate.py RUN [--n 100] [--data runs/data] [--runs runs] [--lens]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from evaluate_organisms import manifests

from speech_lens.organisms import gates
from speech_lens.organisms.checkpoint import OrganismVocab, llama_config
from speech_lens.organisms.corpus import read_jsonl

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    from transformers import LlamaForCausalLM

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("name")
    ap.add_argument("--n", type=int, default=100, help="test utterances")
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "data")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--lens", action="store_true", help="also the logit-lens tables (speech)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    vocab = OrganismVocab.from_json(json.loads((a.data / "vocab.json").read_text()))
    st = torch.load(a.runs / a.name / "state.pt", map_location="cpu", weights_only=False)
    c = st["config"]
    model = LlamaForCausalLM(
        llama_config(vocab, c["d_model"], c["n_layers"], c["n_heads"], c["d_ff"])
    )
    model.load_state_dict(st["model"])
    model.eval()
    test_path = manifests(c, a.data, ROOT / "organisms")[0]
    test = gates.utterances(list(read_jsonl(test_path))[: a.n], vocab)
    gate = gates.s2t_gate(model, test, vocab)
    print(json.dumps({"run": a.name, "step": st["step"], "tokens": st["tokens"], **gate}))
    if a.lens:
        for k, v in gates.lens_tables(model, test, vocab, "speech").items():
            print(" ", k, v)
