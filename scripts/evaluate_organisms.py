"""Measure shipped organisms and merge the numbers into organisms/results.json.

  python scripts/evaluate_organisms.py NAME [NAME ...]   # organisms/NAME must exist (exported)
Also: python scripts/evaluate_organisms.py --export NAME  (runs/NAME/state.pt -> organisms/NAME)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import time
from pathlib import Path

import torch

from speech_lens.files import atomic_write_text
from speech_lens.organisms import gates
from speech_lens.organisms.checkpoint import OrganismVocab
from speech_lens.organisms.corpus import read_jsonl
from speech_lens.organisms.train import export_run
from speech_lens.organisms.u0 import U0_FRAME_RATE

ROOT = Path(__file__).resolve().parents[1]
LABELS = {
    "text_lm": "stage 1 only: text-pretrained LM that never saw speech (reference)",
    "textinit_interleaved": "emergent: text-LM init x interleaved data",
    "textinit_speechonly": "emergent ablation: text-LM init x speech-only data",
    "random_interleaved": "emergent ablation: random init x interleaved data",
    "random_speechonly": "emergent ablation: random init x speech-only data",
    "textinit_interleaved_x2": "emergent: text-LM init x interleaved data, stage 2 continued (2x tokens)",
    "textinit_interleaved_x3": "emergent: text-LM init x interleaved data, stage 2 continued (3x tokens)",
    "textinit_interleaved_1word": "emergent: text-LM init x interleaved data, then 500 steps of one-word alternation (0.8 interleaved)",
    "control_planted_l3": "POSITIVE CONTROL (planted by an auxiliary loss at layer 3; not a replication)",
    "control_rotated_l3": "ROTATED CONTROL (planted at layer 3 through a fixed random rotation Q: lm_head(norm(Q h_3)); not a replication)",
}


def load(dir_: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(dir_), dtype=torch.float32)
    return m.eval()


def merge(path: Path, key: str, value: object) -> None:
    """Set ``key`` in the JSON file at ``path``; read-modify-write under an exclusive lock, so
    evaluations running in parallel do not drop each other's entries."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        res = json.loads(path.read_text()) if path.exists() else {}
        res.setdefault("organisms", {})
        if key.startswith("organisms."):
            res["organisms"][key.split(".", 1)[1]] = value
        else:
            res[key] = value
        atomic_write_text(path, json.dumps(res, indent=1))


def manifests(config: dict, data: Path, out: Path) -> tuple[Path, Path, Path]:
    """(test, probe-training, spoken-knowledge) manifests of an organism: its unit source's
    (U0 at the run's unit noise: ``organisms/u0/*_p{p}.jsonl``) or the Piper/k-means ones."""
    if config.get("units", "manifest") == "u0":
        tag = f"p{float(config.get('unit_noise', 0.0)):g}"
        return (
            out / "u0" / f"test_manifest_{tag}.jsonl",
            data / f"manifest_train_{tag}.jsonl",
            out / "u0" / f"knowledge_manifest_{tag}.jsonl",
        )
    return (
        out / "test_manifest.jsonl",
        data / "manifest_train.jsonl",
        out / "knowledge_manifest.jsonl",
    )


def evaluate(
    name: str, data: Path, out: Path, n_probe: int, checkpoint: Path | None = None
) -> dict:
    """Lens tables, gates, probe and spoken knowledge of ``out/name`` (or ``checkpoint``)."""
    vocab = OrganismVocab.from_json(json.loads((data / "vocab.json").read_text()))
    d = checkpoint or out / name
    meta = json.loads((d / "organism.json").read_text())
    test_path, train_path, items_path = manifests(meta["config"], data, out)
    test = gates.utterances(list(read_jsonl(test_path)), vocab)
    train_recs = []
    for i, r in enumerate(read_jsonl(train_path)):
        if i >= n_probe:
            break
        train_recs.append(r)
    train = gates.utterances(train_recs, vocab)
    items = list(read_jsonl(items_path))
    model = load(d)
    t0 = time.time()
    res = {
        "label": LABELS.get(name, name),
        "checkpoint": str(d.relative_to(ROOT)) if d.is_relative_to(ROOT) else str(d),
        "test_manifest": str(test_path.relative_to(ROOT)),
        "config": meta["config"],
        "training": {k: meta[k] for k in ("steps", "tokens", "wall_seconds", "final_loss_ema")},
        "lens": {
            "speech": gates.lens_tables(model, test, vocab, "speech"),
            "interleaved": gates.lens_tables(model, test, vocab, "interleaved"),
            "text": gates.lens_tables(model, test, vocab, "text"),
        },
        "gates": {
            **gates.s2t_gate(model, test, vocab),
            "probe": gates.text_probe(model, train, test, vocab),
        },
        "knowledge": gates.spoken_knowledge(model, items, vocab),
    }
    res["eval_seconds"] = round(time.time() - t0, 1)
    return res


def unit_rate(run: Path, out: Path) -> float:
    """Frames per second of a run's units (U0: one frame per unit at ``U0_FRAME_RATE``)."""
    config = json.loads((run / "config.json").read_text())
    if config.get("units", "manifest") == "u0":
        return U0_FRAME_RATE
    return float(json.loads((out / "unit_tokenizer.json").read_text())["features"]["rate"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="+")
    ap.add_argument("--export", action="store_true")
    ap.add_argument("--data", default=str(ROOT / "runs" / "data"))
    ap.add_argument("--runs", default=str(ROOT / "runs"))
    ap.add_argument("--out", default=str(ROOT / "organisms"))
    ap.add_argument("--n-probe", type=int, default=800)
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    for name in a.names:
        if a.export:
            export_run(Path(a.runs) / name, out / name, a.data, unit_rate(Path(a.runs) / name, out))
            print("exported", name, flush=True)
            continue
        r = evaluate(name, Path(a.data), out, a.n_probe)
        merge(out / "results.json", f"organisms.{name}", r)
        print(name, json.dumps({k: r[k] for k in ("gates", "knowledge")})[:600], flush=True)
