"""Measurements of an organism (plain HF forward passes; no TransformerLens needed).

* lens: logit lens per layer (``lm_head(final_norm(h_l))``; the last row is the model's logits) at
  speech positions. Current word = the word being spoken, logits max-pooled over its unit
  positions, ranked among word ids only. Next word: read at the word's last unit (``nxt``) and
  max-pooled over the word's units (``nxt_pool``). Unit / text mass: full-softmax probability on
  unit ids / word ids, averaged over unit positions.
* gates: next word after a spoken prefix vs the same prefix in text (``s2t``); teacher-forced
  transcription after a whole spoken clause (a format never trained); a text-space ridge probe
  (fit on TEXT positions, current word) applied at each spoken word's last unit.
* knowledge: see ``knowledge.py``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from speech_lens.organisms.checkpoint import OrganismVocab
from speech_lens.organisms.corpus import word_units


@dataclass(frozen=True)
class Utt:
    words: list[int]  # word ids
    units: list[list[int]]  # unit token ids per word


def utterances(records: list[dict[str, Any]], vocab: OrganismVocab) -> list[Utt]:
    out = []
    for r in records:
        ws, per = word_units(r)
        out.append(
            Utt([vocab.word_id(w) for w in ws], [[vocab.unit_id(u) for u in us] for us in per])
        )
    return out


def _pad(seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    lengths = torch.tensor([len(s) for s in seqs])
    return ids, lengths


@torch.no_grad()
def layer_logits(model: Any, ids: Tensor) -> Float[Tensor, "layer batch pos vocab"]:
    """Logit lens at every layer: rows 0..L-1 read resid_pre of block l through the final norm
    and unembedding; row L is the model's own logits (HF's last hidden state is post-norm)."""
    out = model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    rows = [model.lm_head(model.model.norm(h)) for h in hs[:-1]]
    rows.append(out.logits)
    return torch.stack(rows)


def _ranks(scores: Tensor, target: Tensor) -> Tensor:
    """1-based rank of target among the columns of scores [n, V]."""
    t = scores.gather(1, target[:, None])
    return (scores > t).sum(1) + 1


def speech_sequence(u: Utt, vocab: OrganismVocab) -> tuple[list[int], list[tuple[int, int]]]:
    toks = [1, vocab.speech_id]
    spans = []
    for us in u.units:
        spans.append((len(toks), len(toks) + len(us)))
        toks += us
    return toks, spans


def interleaved_sequence(
    u: Utt, vocab: OrganismVocab, rng: np.random.Generator
) -> tuple[list[int], list[tuple[int, int] | None]]:
    """Alternating 1-2 word spans (as in training); spans for speech words, None for text words."""
    toks = [1]
    spans: list[tuple[int, int] | None] = []
    speech = bool(rng.integers(2))
    i = 0
    while i < len(u.words):
        n = 1 + int(rng.random() < 0.3)
        toks.append(vocab.speech_id if speech else vocab.text_id)
        for j in range(i, min(i + n, len(u.words))):
            if speech:
                spans.append((len(toks), len(toks) + len(u.units[j])))
                toks += u.units[j]
            else:
                spans.append(None)
                toks.append(u.words[j])
        i += n
        speech = not speech
    return toks, spans


@torch.no_grad()
def lens_tables(
    model: Any, utts: list[Utt], vocab: OrganismVocab, mode: str, batch: int = 32, seed: int = 0
) -> dict[str, list[float]]:
    """Per-layer lens metrics at speech positions (mode 'speech' or 'interleaved') or at text
    positions (mode 'text': current = the input token, next = the following word)."""
    rng = np.random.default_rng(seed)
    w0, w1 = vocab.first_word, vocab.text_id  # word ids [w0, w1)
    u0 = vocab.first_unit
    acc: dict[str, list[Tensor]] = {k: [] for k in ("cur1", "cur5", "nxt1", "nxt5", "np1", "np5")}
    masses: list[Tensor] = []
    tmasses: list[Tensor] = []
    for b in range(0, len(utts), batch):
        chunk = utts[b : b + batch]
        seqs: list[list[int]] = []
        all_spans: list[list[tuple[int, int] | None]] = []
        for u in chunk:
            sp: list[tuple[int, int] | None]
            if mode == "speech":
                s, sp0 = speech_sequence(u, vocab)
                sp = list(sp0)
            elif mode == "interleaved":
                s, sp = interleaved_sequence(u, vocab, rng)
            elif mode == "text":
                s = [1, vocab.text_id, *u.words]
                sp = [(2 + i, 3 + i) for i in range(len(u.words))]
            else:
                raise ValueError(f"unknown lens mode {mode!r}")
            seqs.append(s)
            all_spans.append(sp)
        ids, _ = _pad(seqs)
        lg = layer_logits(model, ids)  # [L+1, B, P, V]
        lp = lg.log_softmax(-1)
        rows: dict[str, list[Tensor]] = {k: [] for k in acc}
        for bi, (u, sp) in enumerate(zip(chunk, all_spans, strict=True)):
            for j, span in enumerate(sp):
                if span is None:
                    continue
                a, e = span
                words_l = lg[:, bi, a:e, w0:w1]  # [L+1, n, W]
                pooled = words_l.max(1).values
                cur = torch.full((lg.shape[0],), u.words[j] - w0)
                rc = _ranks(pooled, cur)
                rows["cur1"].append(rc <= 1)
                rows["cur5"].append(rc <= 5)
                if j + 1 < len(u.words):
                    nxt = torch.full((lg.shape[0],), u.words[j + 1] - w0)
                    rn = _ranks(words_l[:, -1], nxt)
                    rows["nxt1"].append(rn <= 1)
                    rows["nxt5"].append(rn <= 5)
                    rp = _ranks(pooled, nxt)
                    rows["np1"].append(rp <= 1)
                    rows["np5"].append(rp <= 5)
                if mode != "text":
                    p = lp[:, bi, a:e].exp()
                    masses.append(p[..., u0:].sum(-1).mean(1))
                    tmasses.append(p[..., w0:w1].sum(-1).mean(1))
        for k in acc:
            if rows[k]:
                acc[k].append(torch.stack(rows[k]).float())
    out = {
        "cur@1": "cur1",
        "cur@5": "cur5",
        "nxt@1": "nxt1",
        "nxt@5": "nxt5",
        "nxt_pool@1": "np1",
        "nxt_pool@5": "np5",
    }
    res = {name: torch.cat(acc[k]).mean(0).tolist() for name, k in out.items()}
    res["n_words"] = [float(torch.cat(acc["cur1"]).shape[0])]
    if masses:
        res["unit_mass"] = torch.stack(masses).mean(0).tolist()
        res["text_mass"] = torch.stack(tmasses).mean(0).tolist()
    return {k: [round(float(x), 4) for x in v] for k, v in res.items()}


def frequency_baseline(train: list[Utt], test: list[Utt]) -> dict[str, float]:
    """Always rank words by training frequency: the prior a lens could reach with no evidence."""
    order = [w for w, _ in Counter(w for u in train for w in u.words).most_common()]
    rank = {w: i + 1 for i, w in enumerate(order)}
    cur = [rank.get(w, 10**9) for u in test for w in u.words]
    nxt = [rank.get(w, 10**9) for u in test for w in u.words[1:]]
    return {
        "cur@1": float(np.mean([r <= 1 for r in cur])),
        "cur@5": float(np.mean([r <= 5 for r in cur])),
        "nxt@1": float(np.mean([r <= 1 for r in nxt])),
        "nxt@5": float(np.mean([r <= 5 for r in nxt])),
    }


@torch.no_grad()
def s2t_gate(
    model: Any, utts: list[Utt], vocab: OrganismVocab, batch: int = 64
) -> dict[str, float]:
    """Next-word accuracy (argmax over word ids) after a spoken vs a written prefix of >= 1 word,
    and teacher-forced transcription accuracy after the whole spoken clause."""
    w0, w1 = vocab.first_word, vocab.text_id
    sp_seqs, targets = [], []
    for u in utts:
        for j in range(1, len(u.words)):
            s = [1, vocab.speech_id] + [x for us in u.units[:j] for x in us] + [vocab.text_id]
            sp_seqs.append(s)
            targets.append(u.words[j])
    hits = []
    for b in range(0, len(sp_seqs), batch):
        ids, lens = _pad(sp_seqs[b : b + batch])
        lg = model(input_ids=ids).logits
        last = lg[torch.arange(len(lens)), lens - 1, w0:w1].argmax(-1) + w0
        hits.append(last == torch.tensor(targets[b : b + batch]))
    speech_acc = torch.cat(hits).float().mean().item()
    t_hits, tr_hits, tr_first = [], [], []
    for b in range(0, len(utts), batch):
        chunk = utts[b : b + batch]
        ids, lens = _pad([[1, vocab.text_id, *u.words] for u in chunk])
        lg = model(input_ids=ids).logits[..., w0:w1].argmax(-1) + w0
        for i, u in enumerate(chunk):
            pred = lg[i, 2 : 2 + len(u.words) - 1]
            t_hits.append(pred == torch.tensor(u.words[1:]))
        tseqs = []
        for u in chunk:
            s, _ = speech_sequence(u, vocab)
            tseqs.append([*s, vocab.text_id, *u.words])
        ids, lens = _pad(tseqs)
        lg = model(input_ids=ids).logits[..., w0:w1].argmax(-1) + w0
        for i, u in enumerate(chunk):
            start = int(lens[i]) - len(u.words) - 1  # the [Text] position predicts word 0
            pred = lg[i, start : start + len(u.words)]
            ok = pred == torch.tensor(u.words)
            tr_hits.append(ok)
            tr_first.append(ok[:1])
    return {
        "next_word_after_speech_prefix": round(speech_acc, 4),
        "next_word_after_text_prefix": round(torch.cat(t_hits).float().mean().item(), 4),
        "transcription_word_acc": round(torch.cat(tr_hits).float().mean().item(), 4),
        "transcription_first_word_acc": round(torch.cat(tr_first).float().mean().item(), 4),
        "n_next_word": len(targets),
    }


@torch.no_grad()
def _states(model: Any, seqs: list[list[int]], batch: int = 64) -> list[Tensor]:
    """hidden states [L+1, len, d] per sequence (row L is post final norm)."""
    out = []
    for b in range(0, len(seqs), batch):
        ids, lens = _pad(seqs[b : b + batch])
        hs = torch.stack(model(input_ids=ids, output_hidden_states=True).hidden_states)
        out += [hs[:, i, : int(lens[i])] for i in range(len(lens))]
    return out


def text_probe(
    model: Any, train: list[Utt], test: list[Utt], vocab: OrganismVocab, lam: float = 10.0
) -> dict[str, list[float]]:
    """Ridge probe for the current word fit on TEXT positions of training clauses, then applied
    unchanged at the last unit of each spoken word of the test clauses (and at their text
    positions, the ceiling)."""
    w0, nw = vocab.first_word, len(vocab.words)
    tr_states = _states(model, [[1, vocab.text_id, *u.words] for u in train])
    xs = torch.cat([h[:, 2:] for h in tr_states], 1)  # [L+1, N, d]
    ys = torch.cat([torch.tensor(u.words) - w0 for u in train])
    te_text = _states(model, [[1, vocab.text_id, *u.words] for u in test])
    xt = torch.cat([h[:, 2:] for h in te_text], 1)
    yt = torch.cat([torch.tensor(u.words) - w0 for u in test])
    sp_seqs, last_pos = [], []
    for u in test:
        s, spans = speech_sequence(u, vocab)
        sp_seqs.append(s)
        last_pos.append([e - 1 for _, e in spans])
    te_sp = _states(model, sp_seqs)
    xsp = torch.cat([h[:, p] for h, p in zip(te_sp, last_pos, strict=True)], 1)
    on_text, on_speech = [], []
    for layer in range(xs.shape[0]):
        x = xs[layer].double()
        mu = x.mean(0)
        xc = torch.cat([x - mu, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        y = torch.nn.functional.one_hot(ys, nw).double()
        w = torch.linalg.solve(xc.T @ xc + lam * torch.eye(xc.shape[1], dtype=x.dtype), xc.T @ y)

        def acc(z: Tensor, t: Tensor, w: Tensor = w, mu: Tensor = mu) -> float:
            zc = torch.cat([z.double() - mu, torch.ones(len(z), 1, dtype=torch.double)], 1)
            return round(((zc @ w).argmax(1) == t).float().mean().item(), 4)

        on_text.append(acc(xt[layer], yt))
        on_speech.append(acc(xsp[layer], yt))
    return {"text_fit_on_text": on_text, "text_fit_on_speech": on_speech}


@torch.no_grad()
def spoken_knowledge(
    model: Any, items: list[dict[str, Any]], vocab: OrganismVocab
) -> dict[str, Any]:
    """Spoken prompt, then the summed log-probability of the correct vs the counterfactual
    spoken completion (units); and the same comparison in text (one word token each)."""
    by_fact: dict[int, dict[str, dict[str, Any]]] = {}
    for it in items:
        by_fact.setdefault(int(it["fact"]), {})[it["role"]] = it
    correct_sp, correct_tx = [], []
    for pair in by_fact.values():
        scores = {}
        for role, it in pair.items():
            ws, per = word_units(it)
            k = int(it["prompt_words"])
            prompt = [vocab.unit_id(x) for us in per[:k] for x in us]
            comp = [vocab.unit_id(x) for us in per[k:] for x in us]
            ids = torch.tensor([[1, vocab.speech_id, *prompt, *comp]])
            lp = model(input_ids=ids).logits.log_softmax(-1)[0]
            start = 2 + len(prompt)
            tgt = torch.tensor(comp)
            scores[role] = (
                lp[start - 1 : start - 1 + len(comp)].gather(1, tgt[:, None]).sum().item()
            )
            tids = torch.tensor([[1, vocab.text_id, *[vocab.word_id(w) for w in ws[:k]]]])
            tl = model(input_ids=tids).logits.log_softmax(-1)[0, -1]
            scores["text_" + role] = tl[vocab.word_id(ws[k])].item()
        correct_sp.append(scores["answer"] > scores["counterfactual"])
        correct_tx.append(scores["text_answer"] > scores["text_counterfactual"])
    return {
        "speech_acc": round(float(np.mean(correct_sp)), 4),
        "text_acc": round(float(np.mean(correct_tx)), 4),
        "n_facts": len(correct_sp),
        # per fact (in fact order), for CIs and correlations over items
        "speech_correct": [int(c) for c in correct_sp],
        "text_correct": [int(c) for c in correct_tx],
    }
