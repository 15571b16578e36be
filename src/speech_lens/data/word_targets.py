"""Word targets: which spoken words to read out, sampled per family."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from speech_lens.data.encoded import SpanSampler, WordSpan, WordTarget, plain_token_ids
from speech_lens.data.utterance import Utterance, Word


def word_spans(
    words: Sequence[Word], modal: Sequence[str], word_idx: Sequence[int], empty_at: Sequence[int]
) -> tuple[WordSpan, ...]:
    """One span per word: its positions, or an empty span where it would be."""
    pos: dict[int, list[int]] = {}
    for p, w in enumerate(word_idx):
        if w >= 0:
            pos.setdefault(w, []).append(p)
    spans = []
    for i, word in enumerate(words):
        ps = pos.get(i)
        s, e = (ps[0], ps[-1] + 1) if ps else (empty_at[i], empty_at[i])
        spans.append(WordSpan(i, word.text, modal[i], s, e))
    return tuple(spans)


# --------------------------------------------------------------------------------------------
# Span samplers
# --------------------------------------------------------------------------------------------


def sample_speech_words(
    n_words: int,
    sampler: SpanSampler,
    rng: np.random.Generator,
    *,
    span_mean: float | None = None,
    speech_fraction: float = 0.3,
) -> set[int]:
    """Which words are spoken in an interleaved prompt.

    * ``poisson`` (slamkit ``select_spans_poisson``, SIMS training): non-overlapping spans of
      Poisson(``span_mean``=10) words at random starts until at least ``speech_fraction`` (0.3) of
      the words are speech.
    * ``spiritlm``: alternating text/speech spans of 1 + Poisson(``span_mean``-1, default 4) words,
      first modality a coin flip (SpiritLM switches modality at word boundaries; its exact span
      distribution is not released).
    * ``alternate``: deterministic, spans of ``span_mean`` (default 1) words, speech first.
    """
    if n_words == 0:
        return set()
    if sampler == "poisson":
        lam = 10.0 if span_mean is None else span_mean
        total = math.ceil(n_words * speech_fraction)
        mask = [False] * n_words
        eligible = set(range(n_words))
        chosen = 0
        for _ in range(100 * n_words + 1000):  # slamkit loops unbounded; bound it
            if chosen >= total or not eligible:
                break
            s = int(rng.choice(sorted(eligible)))
            e = min(s + int(rng.poisson(lam)), n_words)
            if any(mask[s:e]):
                continue
            for i in range(s, e):
                mask[i] = True
                eligible.discard(i)
            chosen += e - s
            if e < n_words:
                eligible.discard(e)
        return {i for i, m in enumerate(mask) if m}
    if sampler == "spiritlm":
        lam = 5.0 if span_mean is None else span_mean
        speech = bool(rng.integers(2))
        out: set[int] = set()
        i = 0
        while i < n_words:
            n = 1 + int(rng.poisson(max(lam - 1, 0.0)))
            if speech:
                out.update(range(i, min(i + n, n_words)))
            i += n
            speech = not speech
        return out
    if sampler == "alternate":
        k = max(1, round(1 if span_mean is None else span_mean))
        return {i for i in range(n_words) if (i // k) % 2 == 0}
    raise ValueError(f"span_sampler must be poisson, spiritlm or alternate, got {sampler!r}")


# --------------------------------------------------------------------------------------------
# Text targets
# --------------------------------------------------------------------------------------------


def word_targets(model: Any, words: Iterable[str | Word] | Utterance) -> list[WordTarget]:
    """Each word's text tokens: ``spaced`` = tokens of ``" " + word``, ``bare`` = tokens of
    ``word`` (no special tokens). SentencePiece tokenizers (Llama-2: SpiritLM, SpeechGPT) add a
    ``▁`` dummy prefix, so there both forms are usually the same ids."""
    tok = getattr(model, "tokenizer", model)
    seq = words.words if isinstance(words, Utterance) else words
    out = []
    for w in seq:
        text = (w.text if isinstance(w, Word) else str(w)).strip()
        if not text:
            raise ValueError("word_targets: empty word")
        out.append(
            WordTarget(
                text, tuple(plain_token_ids(tok, " " + text)), tuple(plain_token_ids(tok, text))
            )
        )
    return out
