"""Cheap gate on a run in progress: python scripts/quick_gate.py RUN [N_UTTS] (reads runs/RUN/state.pt)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from speech_lens.organisms import gates
from speech_lens.organisms.checkpoint import OrganismVocab, llama_config
from speech_lens.organisms.corpus import read_jsonl

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    name, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100
    data = ROOT / "runs" / "data"
    vocab = OrganismVocab.from_json(json.loads((data / "vocab.json").read_text()))
    st = torch.load(ROOT / "runs" / name / "state.pt", map_location="cpu", weights_only=False)
    c = st["config"]
    model = LlamaForCausalLM(
        llama_config(vocab, c["d_model"], c["n_layers"], c["n_heads"], c["d_ff"])
    )
    model.load_state_dict(st["model"])
    model.eval()
    test = gates.utterances(list(read_jsonl(ROOT / "organisms" / "test_manifest.jsonl"))[:n], vocab)
    print(name, "step", st["step"], gates.s2t_gate(model, test, vocab))
    for k, v in gates.lens_tables(model, test, vocab, "speech").items():
        print(" ", k, v)
