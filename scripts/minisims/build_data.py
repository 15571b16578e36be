"""Step 2: U0 units + the interleaved training corpus + the held-out test manifest.

  python scripts/minisims/build_data.py            # runs/minisims/data/corpus.json (not in git)
                                                   # organisms/minisims/test_manifest.jsonl
                                                   # organisms/minisims/u0_units.json
Needs runs/deb (the extracted Debian r-cran-janeaustenr, as for the organisms) and espeakng-loader.
The test clauses are the organisms' 300 held-out clauses (organisms/test_manifest.jsonl), cased as
in Austen, so mini-SIMS and the organisms are measured on the same words.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, SHIPPED, load_base, sha256, write_json_atomic

from data import FRAME_RATE, N_UNITS, Corpus, build_corpus, cased_clauses
from speech_lens.organisms import corpus as org_corpus


def utterance_record(c: Corpus, uid: str, words: list[str], index: dict[str, int]) -> dict | None:
    """Manifest record: deduplicated U0 units with run lengths, word times on the 25 Hz grid.
    None if deduplication swallows a whole word (its one phoneme repeats the previous word's
    last), which would leave the word without units."""
    frames: list[int] = []
    spans = []
    for w in words:
        t = index[w]
        start = len(frames)
        for u, d in zip(c.units[t], c.durations[t], strict=True):
            frames += [u] * d
        spans.append((w, start / FRAME_RATE, len(frames) / FRAME_RATE))
    units, durs = [frames[0]], [1]
    for f in frames[1:]:
        if f == units[-1]:
            durs[-1] += 1
        else:
            units.append(f)
            durs.append(1)
    rec = org_corpus.manifest_record(uid, "test", spans, FRAME_RATE, units, durs, speaker="u0")
    try:
        org_corpus.word_units(rec)
    except ValueError:
        return None
    return rec


def test_manifest(c: Corpus, deb: Path, organisms_test: Path) -> list[dict]:
    clauses, held = cased_clauses(deb)
    cased: dict[str, list[str]] = {}
    for cl, h in zip(clauses, held, strict=True):
        if h:
            cased.setdefault(" ".join(cl).lower(), cl)
    index = {w: i for i, w in enumerate(c.types)}
    out = []
    for r in org_corpus.read_jsonl(organisms_test):
        words = cased.get(r["text"])
        if words is None:
            raise RuntimeError(f"{organisms_test}: {r['id']} {r['text']!r} not a held-out clause")
        rec = utterance_record(c, r["id"], words, index)
        if rec is not None:
            out.append(rec)
    return out


def unit_stats(c: Corpus) -> dict:
    homophones: dict[tuple[int, ...], set[str]] = {}
    for t, us in zip(c.types, c.units, strict=True):
        homophones.setdefault(tuple(us), set()).add(t.lower())
    return {
        "n_units_used": len(c.phonemes),
        "n_units_slots": N_UNITS,
        "phonemes": c.phonemes,
        "frame_rate": FRAME_RATE,
        "word_types_cased": len(c.types),
        "unit_strings": len(homophones),
        "word_types_lower": len({t.lower() for t in c.types}),
        "train_clauses": len(c.train),
        "train_words": sum(len(x) for x in c.train),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--deb", type=Path, default=ROOT / "runs" / "deb")
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "minisims" / "data")
    a = ap.parse_args()
    _, tok = load_base()
    c = build_corpus(a.deb, a.data / "corpus.json", tok)
    recs = test_manifest(c, a.deb, ROOT / "organisms" / "test_manifest.jsonl")
    SHIPPED.mkdir(parents=True, exist_ok=True)
    org_corpus.write_jsonl(SHIPPED / "test_manifest.jsonl", recs)
    stats = {**unit_stats(c), "test_utterances": len(recs)}
    # a resumed training run needs this exact stream (rebuilds are deterministic: checked)
    stats["corpus_sha256"] = sha256(a.data / "corpus.json")
    stats["test_words"] = sum(len(r["words"]) for r in recs)
    write_json_atomic(SHIPPED / "u0_units.json", stats)
    print(json.dumps({k: v for k, v in stats.items() if k != "phonemes"}))


if __name__ == "__main__":
    main()
