"""Add corpus stats, the frequency baseline and the cross-organism summary to organisms/results.json
and print the README results table (markdown).

  python scripts/summarize_organisms.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from evaluate_organisms import merge  # noqa: E402

from speech_lens.organisms import gates  # noqa: E402
from speech_lens.organisms.checkpoint import OrganismVocab  # noqa: E402
from speech_lens.organisms.corpus import read_jsonl  # noqa: E402

ORDER = [
    "text_lm",
    "textinit_interleaved",
    "textinit_interleaved_x2",
    "textinit_interleaved_x3",
    "textinit_interleaved_1word",
    "textinit_speechonly",
    "random_interleaved",
    "random_speechonly",
    "control_planted_l3",
]


def peak(xs: list[float], skip0: bool = True) -> tuple[float, int]:
    start = 1 if skip0 else 0
    i = int(np.argmax(xs[start:])) + start
    return xs[i], i


def crossover(unit: list[float], text: list[float]) -> int | None:
    for i, (u, t) in enumerate(zip(unit, text, strict=True)):
        if i > 0 and u > t:
            return i
    return None


def main() -> None:
    out = ROOT / "organisms"
    data = ROOT / "runs" / "data"
    vocab = OrganismVocab.from_json(json.loads((data / "vocab.json").read_text()))
    train = gates.utterances(list(read_jsonl(data / "manifest_train.jsonl")), vocab)
    test = gates.utterances(list(read_jsonl(out / "test_manifest.jsonl")), vocab)
    merge(out / "results.json", "frequency_baseline", gates.frequency_baseline(train, test))
    merge(out / "results.json", "corpus", json.loads((data / "unit_stats.json").read_text()))
    res = json.loads((out / "results.json").read_text())
    orgs = res["organisms"]
    rows, xs, ys, ss = [], [], [], []
    for name in [n for n in ORDER if n in orgs]:
        o = orgs[name]
        sp = o["lens"]["speech"]
        c1, l1 = peak(sp["cur@1"])
        c5, l5 = peak(sp["cur@5"])
        n1, ln1 = peak(sp["nxt@1"])
        n5, ln5 = peak(sp["nxt@5"])
        g = o["gates"]
        probe = max(g["probe"]["text_fit_on_speech"])
        rows.append(
            {
                "name": name,
                "label": o["label"],
                "cur@1": c1,
                "cur@1_layer": l1,
                "cur@5": c5,
                "cur@5_layer": l5,
                "nxt@1": n1,
                "nxt@1_layer": ln1,
                "nxt@5": n5,
                "nxt@5_layer": ln5,
                "unit_mass_overtakes_text_at": crossover(sp["unit_mass"], sp["text_mass"]),
                "s2t_speech": g["next_word_after_speech_prefix"],
                "s2t_text": g["next_word_after_text_prefix"],
                "transcription": g["transcription_word_acc"],
                "transcription_first_word": g["transcription_first_word_acc"],
                "probe_text_fit_on_speech_max": probe,
                "knowledge_speech": o["knowledge"]["speech_acc"],
                "knowledge_text": o["knowledge"]["text_acc"],
            }
        )
        if name not in ("text_lm", "control_planted_l3"):  # emergent organisms only
            xs.append(c5)
            ss.append(g["next_word_after_speech_prefix"])
            ys.append(o["knowledge"]["speech_acc"])
    summary: dict = {"table": rows}
    if len(xs) >= 3:
        summary["correlation_knowledge_vs_peak_cur5"] = round(float(np.corrcoef(xs, ys)[0, 1]), 3)
        summary["correlation_knowledge_vs_s2t_speech"] = round(float(np.corrcoef(ss, ys)[0, 1]), 3)
        summary["correlation_n"] = len(xs)
    merge(out / "results.json", "summary", summary)
    fb = res.get("frequency_baseline") or gates.frequency_baseline(train, test)
    print(
        f"frequency baseline: cur@1 {fb['cur@1']:.3f} cur@5 {fb['cur@5']:.3f} "
        f"nxt@1 {fb['nxt@1']:.3f} nxt@5 {fb['nxt@5']:.3f}"
    )
    print(
        "| organism | cur@1 (layer) | cur@5 (layer) | nxt@1 (layer) | nxt@5 (layer) | unit>text from layer "
        "| next word after speech / text prefix | transcription all (first word) | text-fit probe on speech (max) "
        "| spoken knowledge (text) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['cur@1']:.3f} ({r['cur@1_layer']}) | {r['cur@5']:.3f} ({r['cur@5_layer']}) "
            f"| {r['nxt@1']:.3f} ({r['nxt@1_layer']}) | {r['nxt@5']:.3f} ({r['nxt@5_layer']}) "
            f"| {r['unit_mass_overtakes_text_at']} | {r['s2t_speech']:.3f} / {r['s2t_text']:.3f} "
            f"| {r['transcription']:.3f} ({r['transcription_first_word']:.3f}) | {r['probe_text_fit_on_speech_max']:.3f} "
            f"| {r['knowledge_speech']:.3f} ({r['knowledge_text']:.3f}) |"
        )
    for k, v in summary.items():
        if k != "table":
            print(k, v)


if __name__ == "__main__":
    main()
