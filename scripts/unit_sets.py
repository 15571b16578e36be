"""Gate G1 per unit set: can a word be recognised from its units at all? (issue 17 §1-2)

  python scripts/unit_sets.py --data runs/data_v2        # -> organisms/unit_sets.json

U0 (espeak-ng phonemes, ``organisms/u0_lexicon.json``) at unit noise p (``u0.UnitNoise``). Each
word occurrence is its own rendition: the training strings are the noisy units of every word of
the organisms' spoken training sentences (``speech_train`` + ``fillers`` of the data folder's
text.json, utterance ids ``train-NNNNN`` as in the training manifest), the test strings the noisy
units of the 1,698 words of the 300 held-out clauses (``organisms/test_manifest.jsonl``, its
utterance ids), drawn with the same (seed, utterance, occurrence) keys a U0 organism sees. Two
classifiers (``unit_classifiers.py``): edit-distance 1-NN and bag-of-bigrams naive Bayes. Cells
(p, seed) already in the output are kept (re-run to resume); the file is written atomically.

  python scripts/unit_sets.py --manifest-set U-real --train-manifest runs/data_ureal/manifest_train.jsonl \
      --test organisms/ureal/test_manifest.jsonl --n-units 256 --info runs/data_ureal/ureal_info.json

Units read from manifests (``corpus.word_units``): the same classifiers trained on the word
occurrences of a training manifest, tested on a held-out manifest; stored under
``manifest_unit_sets`` of the output (the U0 cells and other sets are kept).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

from speech_lens.files import atomic_write_text
from speech_lens.organisms import u0
from speech_lens.organisms.corpus import read_jsonl, word_units
from speech_lens.organisms.unit_classifiers import BigramBayes, Example, NearestString, accuracy

ROOT = Path(__file__).resolve().parents[1]
WHAT = (
    "Unit->word classification of U0 (espeak-ng phonemes, organisms/u0_lexicon.json) at unit "
    "noise p. Every word occurrence is its own noisy rendition. Train: every word occurrence of "
    "the spoken training sentences (speech_train + fillers of the data folder's text.json, "
    "utterance ids train-NNNNN), no subsampling. Test: the 1,698 words of the 300 held-out "
    "clauses (organisms/test_manifest.jsonl, its utterance ids). Noise keys (seed, utterance, "
    "occurrence) are those a U0 organism's data would use, so train and test renditions differ."
)
NOISE = (
    "speech_lens.organisms.u0.UnitNoise: per original unit, substitute by another unit of its "
    "phonetic class with probability p, else delete with p/4; after it insert with p/4 a unit of "
    "its class (not itself); then merge repeats; a word left empty keeps its first unit."
)
CLASSIFIERS = {
    "nearest_string": "exact edit-distance 1-NN over distinct training strings; the strings at "
    "the minimal distance vote with their training token counts",
    "bigram_bayes": "multinomial naive Bayes over unit bigrams with word-boundary symbols, "
    "add-one smoothing, training word frequencies as prior",
}


def renditions(
    sentences: list[tuple[str, list[str]]], lex: dict[str, list[int]], noise: u0.UnitNoise
) -> tuple[list[Example], Counter[str]]:
    """(noisy unit string, word) per word occurrence, and the summed edit counts."""
    out: list[Example] = []
    edits: Counter[str] = Counter()
    for uid, words in sentences:
        for j, w in enumerate(words):
            if w not in lex:
                raise KeyError(f"utterance {uid}: word {w!r} is not in the U0 lexicon")
            raw, e = noise.edit(lex[w], uid, j)
            edits.update({k: v for k, v in e.__dict__.items()})
            out.append((tuple(u0.dedup(raw)), w))
    return out, edits


def classify(tr: list[Example], te: list[Example], n_units: int) -> dict:
    """G1's two unit->word classifiers fitted on ``tr`` and scored on ``te``."""
    nn = NearestString.fit(tr)
    nb = BigramBayes.fit(tr, n_units)
    seen = {s for s, _ in tr}
    return {
        "nearest_string_acc": round(accuracy(nn.predict, te), 4),
        "bigram_bayes_acc": round(accuracy(nb.predict, te), 4),
        "n_test_words": len(te),
        "n_train_words": len(tr),
        "train_strings": len(seen),
        "test_strings_seen_in_train": round(sum(s in seen for s, _ in te) / len(te), 4),
    }


def cell(train: list, test: list, lex: dict, p: float, seed: int) -> dict:
    t0 = time.time()
    noise = u0.UnitNoise(p, seed)
    tr, edits = renditions(train, lex, noise)
    te, _ = renditions(test, lex, noise)
    n = max(1, edits["units"])
    return {
        "p": p,
        "seed": seed,
        **classify(tr, te, len(u0.U0_PHONEMES)),
        "train_edit_rates": {
            k: round(edits[k] / n, 4) for k in ("substituted", "deleted", "inserted", "restored")
        },
        "seconds": round(time.time() - t0, 1),
    }


def manifest_examples(path: Path) -> list[Example]:
    out: list[Example] = []
    for rec in read_jsonl(path):
        words, per_word = word_units(rec)
        out += [(tuple(us), w) for w, us in zip(words, per_word, strict=True)]
    return out


def manifest_cell(train_path: Path, test_path: Path, n_units: int) -> dict:
    t0 = time.time()
    tr, te = manifest_examples(train_path), manifest_examples(test_path)
    return {
        **classify(tr, te, n_units),
        "units_per_word_train": round(sum(len(s) for s, _ in tr) / len(tr), 3),
        "seconds": round(time.time() - t0, 1),
    }


def write_atomic(path: Path, res: dict) -> None:
    atomic_write_text(path, json.dumps(res, indent=1, ensure_ascii=False) + "\n")


def relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main_manifest(a: argparse.Namespace) -> None:
    if a.train_manifest is None or a.n_units is None:
        raise SystemExit("--manifest-set needs --train-manifest and --n-units")
    res = json.loads(a.out.read_text()) if a.out.exists() else {}
    before = res.get("manifest_unit_sets", {}).get(a.manifest_set, {})
    entry = {
        "what": a.what or before.get("what"),  # a re-run keeps the description
        "train_manifest": relative(a.train_manifest),
        "test_manifest": relative(a.test),
        "n_units": a.n_units,
        **manifest_cell(a.train_manifest, a.test, a.n_units),
        "command": "python scripts/unit_sets.py " + shlex.join(sys.argv[1:]),
    }
    if a.info is not None:
        entry["build"] = json.loads(a.info.read_text())
    res.setdefault("manifest_unit_sets", {})[a.manifest_set] = entry
    print(json.dumps({k: v for k, v in entry.items() if k != "build"}), flush=True)
    write_atomic(a.out, res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "data_v2")
    ap.add_argument("--lexicon", type=Path, default=ROOT / "organisms" / "u0_lexicon.json")
    ap.add_argument("--test", type=Path, default=ROOT / "organisms" / "test_manifest.jsonl")
    ap.add_argument("--p", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.35, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, default=ROOT / "organisms" / "unit_sets.json")
    ap.add_argument("--manifest-set", help="name of a unit set read from manifests (see above)")
    ap.add_argument("--train-manifest", type=Path, help="--manifest-set: training manifest")
    ap.add_argument("--n-units", type=int, help="--manifest-set: number of unit ids")
    ap.add_argument("--info", type=Path, help="--manifest-set: JSON stored as the set's 'build'")
    ap.add_argument("--what", help="--manifest-set: what the unit set is (stored as 'what')")
    a = ap.parse_args()
    if a.manifest_set:
        main_manifest(a)
        return
    lex = u0.load_lexicon(a.lexicon)
    meta = json.loads((a.data / "text.json").read_text())
    spoken = meta["speech_train"] + meta["fillers"]
    train = [(f"train-{i:05d}", s.split()) for i, s in enumerate(spoken)]
    test = [(r["id"], r["text"].split()) for r in read_jsonl(a.test)]
    old = json.loads(a.out.read_text()) if a.out.exists() else {}
    done = {(c["p"], c["seed"]): c for c in old.get("cells", [])}
    res = {
        "unit_set": "U0",
        "what": WHAT,
        "noise": NOISE,
        "classifiers": CLASSIFIERS,
        "phoneme_classes": {k: " ".join(v) for k, v in u0.PHONEME_CLASSES.items()},
        "lexicon": str(a.lexicon.relative_to(ROOT))
        if a.lexicon.is_relative_to(ROOT)
        else str(a.lexicon),
        "test_manifest": a.test.name,
        "world_version": meta.get("world_version", 1),
        "train_sentences": len(train),
        "test_utterances": len(test),
        "command": "python scripts/unit_sets.py " + shlex.join(sys.argv[1:]),
        "cells": [],
        "manifest_unit_sets": old.get("manifest_unit_sets", {}),
    }
    for p in a.p:
        for seed in a.seeds:
            c = done.get((p, seed)) or cell(train, test, lex, p, seed)
            res["cells"].append(c)
            print(json.dumps(c), flush=True)
            res["summary"] = summary(res["cells"])
            write_atomic(a.out, res)


def summary(cells: list[dict]) -> list[dict]:
    """Per p: both accuracies averaged over the seeds (and their range)."""
    out = []
    for p in sorted({c["p"] for c in cells}):
        cs = [c for c in cells if c["p"] == p]
        row: dict = {
            "p": p,
            "seeds": [c["seed"] for c in cs],
            "n_test_words": cs[0]["n_test_words"],
        }
        for k in ("nearest_string_acc", "bigram_bayes_acc"):
            xs = [c[k] for c in cs]
            row[k] = round(sum(xs) / len(xs), 4)
            row[k + "_range"] = [min(xs), max(xs)]
        out.append(row)
    return out


if __name__ == "__main__":
    main()
