"""A speech_lens manifest of mini-SIMS TRAINING clauses, for training its tuned lens.

  python scripts/minisims/tuned_manifest.py --n 2000 \
      --corpus runs/minisims/data/corpus.json --out runs/minisims/tuned_train.jsonl

Same record format as organisms/minisims/test_manifest.jsonl (deduplicated U0 units with run
lengths, word times on the 25 Hz grid, ``build_data.utterance_record``), split ``train``. Clauses
come from ``Corpus.train`` (the 2% held-out clauses are not in it) with the test manifest's length
range (3..12 words, as the organisms' clauses), drawn with a seeded RNG; a clause whose text is a
test clause's is refused, so the demo's held-out evaluation never sees a training clause.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from build_data import utterance_record
from common import ROOT, SHIPPED, sha256

from data import Corpus
from speech_lens.organisms import corpus as org_corpus

MIN_WORDS, MAX_WORDS = 3, 12  # the test clauses' range (scripts/build_corpus.py)


def training_records(c: Corpus, n: int, seed: int, test_texts: set[str]) -> list[dict]:
    """``n`` distinct training clauses of MIN_WORDS..MAX_WORDS words as manifest records."""
    index = {w: i for i, w in enumerate(c.types)}
    fits = [k for k, cl in enumerate(c.train) if MIN_WORDS <= len(cl) <= MAX_WORDS]
    order = random.Random(seed).sample(fits, len(fits))
    out: list[dict] = []
    seen: set[str] = set()
    for k in order:
        words = [c.types[t] for t in c.train[k]]
        text = " ".join(words).lower()
        if text in seen:  # a clause repeated in the books: once is enough
            continue
        if text in test_texts:
            raise RuntimeError(f"training clause {k} {text!r} is a held-out test clause")
        rec = utterance_record(c, f"train-{k:06d}", words, index)
        if rec is None:  # deduplication swallowed a word (build_data does the same)
            continue
        seen.add(text)
        out.append({**rec, "split": "train"})
        if len(out) == n:
            return out
    raise RuntimeError(f"only {len(out)} usable training clauses, {n} asked")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--corpus", type=Path, default=ROOT / "runs" / "minisims" / "data" / "corpus.json"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "minisims" / "tuned_train.jsonl")
    ap.add_argument("--n", type=int, default=2000, help="clauses to write")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    stats = json.loads((SHIPPED / "u0_units.json").read_text())
    if sha256(a.corpus) != stats["corpus_sha256"]:
        raise RuntimeError(f"{a.corpus} is not the corpus of {SHIPPED / 'u0_units.json'}")
    test = org_corpus.read_jsonl(SHIPPED / "test_manifest.jsonl")
    recs = training_records(Corpus.load(a.corpus), a.n, a.seed, {r["text"].lower() for r in test})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    org_corpus.write_jsonl(a.out, recs)
    n_units = sum(len(r["units"]) for r in recs)
    print(f"{a.out}: {len(recs)} training clauses, {n_units} units")


if __name__ == "__main__":
    main()
