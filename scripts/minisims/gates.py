"""Step 5: the gates of mini-SIMS on the held-out U0 test manifest.

  python scripts/minisims/gates.py runs/minisims/milestones/tokens_250000.pt   # -> OUT/gates.json

* next word after a spoken prefix (``<speech>`` units of words 1..j ``<text>``) vs after the same
  prefix in text (``<text>`` " w1 ... wj"): top-1 / top-5 of the first BPE token of " w_{j+1}",
  ranked among the base text ids only (0..49151), for every j >= 1 of the 300 test clauses;
* teacher-forced transcription: ``<speech>`` units of the whole clause ``<text>`` " w1 ... wn",
  first-token accuracy of every word (a format never trained: the slamkit mix has no parallel data);
* the unit->word classifier of the organisms issue: edit-distance nearest neighbour from a test
  word's U0 string to the training words' strings (a property of the units, not of the model).
Results are merged into the JSON file atomically under the checkpoint's key.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from common import N_BASE_TOKENS, ROOT, SHIPPED, write_json_atomic

from data import SPEECH_ID, TEXT_ID, Corpus, dedup
from speech_lens.organisms.corpus import read_jsonl, word_units
from speech_lens.organisms.unit_classifiers import edit_distance


def test_items(c: Corpus, manifest: Path) -> list[tuple[list[list[int]], list[list[int]]]]:
    """Per test clause: (BPE ids of each " word", U0 token ids of each word from the manifest)."""
    index = {w: i for i, w in enumerate(c.types)}
    out = []
    for r in read_jsonl(manifest):
        words, units = word_units(r)
        out.append(
            (
                [c.text_ids[index[w]] for w in words],
                [[N_BASE_TOKENS + u for u in us] for us in units],
            )
        )
    return out


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), n), dtype=torch.long)  # right padding: never attended to
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in seqs])


@torch.no_grad()
def scored(
    model: Any,
    seqs: list[list[int]],
    reads: list[list[tuple[int, int]]],
    bf16: bool,
    batch: int = 32,
    candidates: torch.Tensor | None = None,
) -> tuple[list[int], list[float]]:
    """For each (position, target token) in reads: rank of the target among text ids (or among
    the ``candidates`` mask over text ids) at that position, and its log-probability over the
    full vocabulary."""
    mask = torch.ones(N_BASE_TOKENS, dtype=torch.bool) if candidates is None else candidates
    ranks: list[int] = []
    logps: list[float] = []
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for b in range(0, len(seqs), batch):
        ids, _ = _pad(seqs[b : b + batch])
        with ctx:
            lg = model(input_ids=ids).logits.float()
        for i, rd in enumerate(reads[b : b + batch]):
            pos = torch.tensor([p for p, _ in rd])
            tgt = torch.tensor([t for _, t in rd])
            row = lg[i, pos]
            text = row[:, :N_BASE_TOKENS]
            ranks += (((text > text.gather(1, tgt[:, None])) & mask).sum(1) + 1).tolist()
            logps += row.log_softmax(-1).gather(1, tgt[:, None]).squeeze(1).tolist()
    return ranks, logps


def text_sequences(items: list, start: int) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """start token then " w1 w2 ..."; reads = (last position before each word j >= 1, its first
    token) plus every token of the word (for word log-probabilities)."""
    seqs, reads = [], []
    for words, _ in items:
        s, rd = [start], []
        for j, w in enumerate(words):
            if j >= 1:
                rd += [(len(s) - 1 + k, t) for k, t in enumerate(w)]
            s += w
        seqs.append(s)
        reads.append(rd)
    return seqs, reads


def next_word(model: Any, items: list, bf16: bool) -> dict[str, float]:
    sp_seqs, sp_reads = [], []
    for words, units in items:
        for j in range(1, len(words)):
            s = [
                SPEECH_ID,
                *[
                    N_BASE_TOKENS + u
                    for u in dedup([x - N_BASE_TOKENS for us in units[:j] for x in us])
                ],
                TEXT_ID,
            ]
            sp_seqs.append(s)
            sp_reads.append([(len(s) - 1, words[j][0])])
    sr, _ = scored(model, sp_seqs, sp_reads, bf16)
    tr, _ = _text_first_ranks(model, items, TEXT_ID, bf16)
    tx_seqs = []
    tx_reads = []
    for words, units in items:
        s = [
            SPEECH_ID,
            *[N_BASE_TOKENS + u for u in dedup([x - N_BASE_TOKENS for us in units for x in us])],
            TEXT_ID,
        ]
        rd = [(len(s) - 1 + sum(len(w) for w in words[:j]), words[j][0]) for j in range(len(words))]
        tx_seqs.append(s + [t for w in words for t in w])
        tx_reads.append(rd)
    xr, _ = scored(model, tx_seqs, tx_reads, bf16)
    return {
        "next_word_after_speech_prefix@1": _mean([r <= 1 for r in sr]),
        "next_word_after_speech_prefix@5": _mean([r <= 5 for r in sr]),
        "next_word_after_text_prefix@1": _mean([r <= 1 for r in tr]),
        "next_word_after_text_prefix@5": _mean([r <= 5 for r in tr]),
        "speech_over_text@1": round(
            _mean([r <= 1 for r in sr]) / max(1e-9, _mean([r <= 1 for r in tr])), 4
        ),
        "transcription_first_token@1": _mean([r <= 1 for r in xr]),
        "n_next_word": len(sr),
        "n_transcribed_words": len(xr),
    }


def _text_first_ranks(
    model: Any, items: list, start: int, bf16: bool
) -> tuple[list[int], list[float]]:
    seqs, reads = text_sequences(items, start)
    firsts = []
    for words, _ in items:
        mask: list[bool] = []
        for w in words[1:]:
            mask += [True] + [False] * (len(w) - 1)
        firsts.append(mask)
    ranks, logps = scored(model, seqs, reads, bf16)
    flat = [m for ms in firsts for m in ms]
    return [r for r, m in zip(ranks, flat, strict=True) if m], logps


def _mean(xs: list) -> float:
    return round(sum(xs) / max(1, len(xs)), 4)


def unit_classifier(c: Corpus, manifest: Path) -> dict[str, float]:
    """Edit-distance 1-NN from each test word's U0 string to the unit strings of the training
    word tokens (label = the string's most frequent lower-cased training word)."""
    counts: dict[tuple[int, ...], Counter] = {}
    for cl in c.train:
        for t in cl:
            counts.setdefault(tuple(dedup(c.units[t])), Counter())[c.types[t].lower()] += 1
    label = {s: cnt.most_common(1)[0][0] for s, cnt in counts.items()}
    hits = []
    for r in read_jsonl(manifest):
        words, units = word_units(r)
        for w, us in zip(words, units, strict=True):
            s = tuple(us)
            if s not in label:  # nearest string (candidates within 2 units of length)
                near = [x for x in label if abs(len(x) - len(s)) <= 2] or list(label)
                s = min(near, key=lambda x: edit_distance(s, x))
            hits.append(label[s] == w.lower())
    return {
        "unit_word_1nn_acc": _mean(hits),
        "n_words": len(hits),
        "train_unit_strings": len(label),
    }


def evaluate_into(
    model: Any,
    path: Path,
    key: str,
    step: int,
    tokens: int,
    bf16: bool = True,
    corpus_path: Path = ROOT / "runs" / "minisims" / "data" / "corpus.json",
) -> dict:
    model.eval()
    c = Corpus.load(corpus_path)
    manifest = SHIPPED / "test_manifest.jsonl"
    res = {
        "step": step,
        "tokens": tokens,
        "bf16_autocast": bf16,
        **next_word(model, test_items(c, manifest), bf16),
    }
    old = json.loads(path.read_text()) if path.exists() else {}
    if "unit_classifier" not in old:
        old["unit_classifier"] = unit_classifier(c, manifest)
    old[key] = res
    write_json_atomic(path, old)
    print(key, json.dumps(res), flush=True)
    return res


def main() -> None:
    from model import build, load_trainable

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("checkpoint", type=Path, help="a state.pt / milestone of train.py, or 'base'")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "minisims" / "gates.json")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if str(a.checkpoint) == "base":
        model, _ = build(0, 4)
        evaluate_into(model, a.out, "tokens_0", 0, 0)
        return
    st = torch.load(a.checkpoint, weights_only=False)
    model, _ = build(st["config"]["seed"], st["config"]["lora_rank"])
    load_trainable(model, st["trainable"])
    evaluate_into(model, a.out, a.checkpoint.stem, st["step"], st["tokens"], st["config"]["bf16"])


if __name__ == "__main__":
    main()
