"""Frequency baseline for a ``speech-lens lens`` run on the mini-SIMS test manifest.

  python scripts/minisims/lens_baseline.py RUN_DIR [--limit 40] [--out JSON]

``speech-lens lens`` reports no chance level, and at this checkpoint the intermediate logit-lens
readouts are a near-constant list (``Ġthe Ġa , Ġthis ĠI`` at every position), so their Recall@k
must be read against a constant guess: k text tokens chosen greedily to hit the most words'
first tokens (``match first``: the first token of ``" word"`` or of ``"word"``, as speech_lens
scores it) in the test clauses NOT evaluated (index >= ``--limit``), scored on the evaluated clauses' current
words and next words (the word after each word of the same clause), like the run's Recall@k.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from common import SHIPPED, base_dir, write_json_atomic
from transformers import AutoTokenizer


def first_ids(tok: object, word: str) -> set[int]:
    """The ``first`` match candidates (speech_lens.data.word_targets.word_piece_ids, minus the
    lone-boundary rule, which no cased Austen word triggers: checked below)."""
    out = set()
    for text in (" " + word, word):
        ids = tok(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        assert tok.decode(ids[:1]).strip(), (word, ids)  # type: ignore[attr-defined]
        out.add(int(ids[0]))
    return out


def greedy_guess(words: list[set[int]], k: int) -> list[int]:
    """k tokens chosen greedily to hit the most reference words not hit yet (a word hits when
    either of its two candidates is listed, so ``Ġand`` and ``and`` are not both worth a slot)."""
    guess: list[int] = []
    left = list(words)
    for _ in range(k):
        counts = collections.Counter(i for w in left for i in w)
        best = min(counts, key=lambda i: (-counts[i], i))
        guess.append(best)
        left = [w for w in left if best not in w]
    return guess


def recall(targets: list[set[int]], guess: list[int], k: int) -> float:
    top = set(guess[:k])
    return sum(bool(t & top) for t in targets) / len(targets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run", type=Path, help="the lens run's --out dir (metrics.json)")
    ap.add_argument("--manifest", type=Path, default=SHIPPED / "test_manifest.jsonl")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(str(base_dir()))
    clauses = [[w[0] for w in json.loads(line)["words"]] for line in a.manifest.open()]
    held, ref = clauses[: a.limit], clauses[a.limit :]
    guess = greedy_guess([first_ids(tok, w) for c in ref for w in c], 10)
    current = [first_ids(tok, w) for c in held for w in c]
    nxt = [first_ids(tok, w) for c in held for w in c[1:]]
    metrics = json.loads((a.run / "metrics.json").read_text())["metrics"]
    assert (len(current), len(nxt)) == (metrics["n_words"], metrics["n_next_words"]), (
        len(current),
        len(nxt),
    )
    out = {
        "reference_clauses": len(ref),
        "guess_tokens": tok.convert_ids_to_tokens(guess),
        **{f"recall@{k}_current": recall(current, guess, k) for k in (1, 5, 10)},
        **{f"recall@{k}_next": recall(nxt, guess, k) for k in (1, 5, 10)},
        "n_words": len(current),
        "n_next_words": len(nxt),
    }
    print(json.dumps(out, indent=1))
    write_json_atomic(a.out or a.run / "frequency_baseline.json", out)


if __name__ == "__main__":
    main()
