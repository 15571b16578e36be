"""Word targets: which spoken words to read out, sampled per family."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from speech_lens.data.encoded import SpanSampler, WordSpan, WordTarget, plain_token_ids
from speech_lens.data.utterance import Utterance, Word
from speech_lens.options import SPAN_DEFAULTS, SPAN_SAMPLERS


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


def span_settings(
    sampler: str, span_mean: float | None = None, speech_fraction: float | None = None
) -> dict[str, float | None]:
    """``sampler``'s parameters with its defaults filled in (``SPAN_DEFAULTS``), as a run
    records them; refuses an unknown sampler and a parameter the sampler does not use."""
    if sampler not in SPAN_DEFAULTS:
        raise ValueError(f"span_sampler must be one of {SPAN_SAMPLERS}, got {sampler!r}")
    out = dict(SPAN_DEFAULTS[sampler])
    if span_mean is not None:
        out["span_mean"] = float(span_mean)
    if speech_fraction is not None:
        if out["speech_fraction"] is None:
            raise ValueError(f"span_sampler {sampler!r} takes no speech_fraction (poisson does)")
        out["speech_fraction"] = float(speech_fraction)
    return out


def sample_speech_words(
    n_words: int,
    sampler: SpanSampler | str,
    rng: np.random.Generator,
    *,
    span_mean: float | None = None,
    speech_fraction: float | None = None,
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
        total = math.ceil(n_words * (0.3 if speech_fraction is None else speech_fraction))
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


# recorded in run settings: how a word's sub-tokens are chosen (see word_piece_ids)
WORD_PIECE_RULE = "skip-lone-boundary-piece"


def word_piece_ids(tok: Any, text: str) -> tuple[int, ...]:
    """The ids of ``text`` (no special tokens) without a lone leading word-boundary piece.

    A word with no ``▁word`` / ``Ġword`` piece is written as the boundary piece alone followed by
    the word's pieces: SentencePiece Llama-2 writes every number and most rare words so
    (``" 1990"`` -> ``▁ 1 9 9 0``), byte-level BPE (Qwen2) writes numbers so (``Ġ 1 9 9 0``).
    That piece (it decodes to whitespace only) is among the most frequent ids of the vocabulary
    and says nothing about the word, so it is never a word's first sub-token
    (``WORD_PIECE_RULE``); a word that is nothing else keeps it.
    """
    ids = plain_token_ids(tok, text)
    while len(ids) > 1 and not tok.decode(ids[:1]).strip():
        ids = ids[1:]
    return tuple(int(i) for i in ids)


def bare_form_is_spaced(tok: Any) -> bool:
    """Whether the tokenizer writes a bare word as its spaced form (SentencePiece's dummy prefix:
    Llama-2 families), so that ``first`` offers one candidate per word there and two on
    byte-level BPE (SIMS). Probed on ``"the"`` and ``"a"``: equal forms for both."""
    return all(word_piece_ids(tok, w) == word_piece_ids(tok, " " + w) for w in ("the", "a"))


def word_targets(model: Any, words: Iterable[str | Word] | Utterance) -> list[WordTarget]:
    """Each word's text tokens: ``spaced`` = tokens of ``" " + word``, ``bare`` = tokens of
    ``word`` (no special tokens), both by :func:`word_piece_ids`. SentencePiece tokenizers
    (Llama-2: SpiritLM, SpeechGPT) add a ``▁`` dummy prefix, so there both forms are usually the
    same ids."""
    tok = getattr(model, "tokenizer", model)
    seq = words.words if isinstance(words, Utterance) else words
    out = []
    for w in seq:
        text = (w.text if isinstance(w, Word) else str(w)).strip()
        if not text:
            raise ValueError("word_targets: empty word")
        out.append(WordTarget(text, word_piece_ids(tok, " " + text), word_piece_ids(tok, text)))
    return out
