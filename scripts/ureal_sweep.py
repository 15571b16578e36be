"""Gate G1 of U-real variants from the pooled whisper features of a ``build_corpus.py ureal``
folder, without writing manifests (exploration; the shipped set is the one the stage builds).

  python scripts/ureal_sweep.py --clips runs/data_ureal --renditions 12 --k 256 500 --cmvn
  python scripts/ureal_sweep.py --clips runs/data_ureal --renditions 12 --use 2 5 8

Training strings: every word occurrence of the spoken training sentences, each a random training
rendition (``random.Random(7)``, as the manifests draw them); test: the held-out rendition of the
words of the 300 held-out clauses. Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
from build_ureal import Renditions, load_pooled, word_strings

from speech_lens.organisms import ureal
from speech_lens.organisms.unit_classifiers import BigramBayes, NearestString, accuracy


def variant(table: dict, meta: dict, train_r: list[int], test_r: int, k: int, cmvn: bool) -> dict:
    t0 = time.time()
    x = np.concatenate([v for (_, r), v in table.items() if r in set(train_r)])
    mean, std = (x.mean(0), x.std(0) + 1e-6) if cmvn else (0.0, 1.0)
    tab = {key: (v - mean) / std for key, v in table.items()}
    strings = word_strings(tab, ureal.Codebook.fit((x - mean) / std, k, seed=0))
    rng = random.Random(7)
    spoken = [s.split() for s in meta["speech_train"] + meta["fillers"]]
    tr = [(tuple(strings[(w, rng.choice(train_r))][0]), w) for s in spoken for w in s]
    te = [(tuple(strings[(w, test_r)][0]), w) for s in meta["speech_test"] for w in s.split()]
    return {
        "train_renditions": train_r,
        "k": k,
        "cmvn": cmvn,
        "nearest_string_acc": round(accuracy(NearestString.fit(tr).predict, te), 4),
        "bigram_bayes_acc": round(accuracy(BigramBayes.fit(tr, k).predict, te), 4),
        "test_units_per_word": round(float(np.mean([len(s) for s, _ in te])), 2),
        "seconds": round(time.time() - t0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clips", type=Path, default=Path("runs/data_ureal"))
    ap.add_argument("--renditions", type=int, default=12, help="Piper renditions (last held out)")
    ap.add_argument("--espeak", type=int, default=0)
    ap.add_argument("--k", type=int, nargs="+", default=[256])
    ap.add_argument("--cmvn", action="store_true", help="standardise features before k-means")
    ap.add_argument("--use", type=int, nargs="*", help="only the first N training renditions")
    a = ap.parse_args()
    rends = Renditions(a.renditions, a.espeak)
    meta = json.loads((a.clips / "text.json").read_text())
    words = json.loads((a.clips / "vocab.json").read_text())["words"]
    table = load_pooled(a.clips, words, rends)
    for n in a.use or [len(rends.train)]:
        for k in a.k:
            print(json.dumps(variant(table, meta, rends.train[:n], rends.test, k, a.cmvn)))


if __name__ == "__main__":
    main()
