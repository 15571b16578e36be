"""Prompt segments: the markers, unit runs and words of a prompt before tokenization, and which
words are spoken (per mode, or sampled for interleaved prompts)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from speech_lens.data.encoded import (
    MARKER,
    PROSODY,
    SPEECH,
    TEXT,
    PromptError,
    plain_token_ids,
)
from speech_lens.data.utterance import TIME_EPS, UnitRule, Utterance
from speech_lens.data.word_targets import sample_speech_words, span_settings
from speech_lens.vocab import VocabLayout


@dataclass(frozen=True)
class Segment:
    """One piece of the prompt string: an added token (known id) or one word's text."""

    kind: str
    text: str
    token_id: int | None = None  # None: text, tokenized with its neighbours
    word: int = -1
    unit: int = -1


def unit_times(
    utterance: Utterance, dedup: bool, unit_rule: UnitRule
) -> tuple[Sequence[int], list[tuple[int, int]], list[float]]:
    """The unit sequence the model sees, each unit's frames and its reference time (s)."""
    if dedup:
        du = utterance.dedup()
        units, frames = du.units, du.unit_frames()
    else:
        units = utterance.frames()
        frames = [(i, i + 1) for i in range(len(units))]
    fr = utterance.frame_rate
    if unit_rule == "end":
        times = [e / fr for _, e in frames]
    elif unit_rule == "midpoint":
        times = [(s + e) / 2 / fr for s, e in frames]
    else:
        raise PromptError(
            f"utterance {utterance.id!r}: unit_rule must be 'end' or 'midpoint', got {unit_rule!r}"
        )
    return units, list(frames), times


def word_modalities(
    uid: str,
    n_words: int,
    mode: str,
    speech_words: set[int] | None,
    seed: int | None,
    spans: tuple[str, float | None, float | None],
) -> list[str]:
    """The modality of every word: all speech, all text, or (interleaved) the given spoken words
    or those ``spans`` = (sampler, span_mean, speech_fraction) draws with ``seed``."""
    if mode == "speech":
        return [SPEECH] * n_words
    if mode == "text":
        return [TEXT] * n_words
    if mode != "interleaved":
        raise PromptError(
            f"utterance {uid!r}: mode must be speech, text or interleaved, got {mode!r}"
        )
    if speech_words is None:
        rng = np.random.default_rng(seed)
        sampler, span_mean, speech_fraction = spans
        params = span_settings(sampler, span_mean, speech_fraction)
        speech_words = sample_speech_words(n_words, sampler, rng, **params)
    chosen = {int(i) for i in speech_words}
    bad = sorted(i for i in chosen if not 0 <= i < n_words)
    if bad:
        raise PromptError(
            f"utterance {uid!r}: field speech_words: indices {bad} outside 0..{n_words - 1}"
        )
    return [SPEECH if i in chosen else TEXT for i in range(n_words)]


def modality_runs(modal: Sequence[str]) -> list[tuple[str, int, int]]:
    """Consecutive words of one modality: (modality, first word, last word + 1)."""
    runs: list[tuple[str, int, int]] = []
    for i, m in enumerate(modal):
        if runs and runs[-1][0] == m:
            runs[-1] = (m, runs[-1][1], i + 1)
        else:
            runs.append((m, i, i + 1))
    return runs


@dataclass(frozen=True)
class PromptWriter:
    """The segments of one prompt (markers, unit runs, words) before tokenization."""

    model: Any
    utterance: Utterance
    mode: str
    units: Sequence[int]
    frames: Sequence[tuple[int, int]]
    times: Sequence[float]
    unit_word: Sequence[int]

    def marker(self, text: str) -> Segment:
        """A marker token of the family's prompt format, by its string."""
        layout, tok = self.model.layout, self.model.tokenizer
        marker_id = {t: layout.marker_ids[n] for n, t in layout.marker_tokens.items()}
        i = marker_id.get(text)
        if i is None:
            i = tok.convert_tokens_to_ids(text)
            if i is None or i == tok.unk_token_id:
                raise PromptError(
                    f"{self.model.spec.name}: prompt marker {text!r} is not a token of the tokenizer"
                )
        return Segment(MARKER, text, int(i))

    def segments(
        self, runs: Sequence[tuple[str, int, int]], unit_rule: UnitRule
    ) -> tuple[list[Segment], list[int]]:
        """All segments, and per word the segment where its (possibly empty) span starts."""
        segs: list[Segment] = []
        anchor = [0] * len(self.utterance.words)
        for m, a, b in runs:
            if m == SPEECH:
                self.speech_run(segs, anchor, a, b, unit_rule)
            else:
                self.text_run(segs, anchor, a, b)
        return segs, anchor

    def speech_run(
        self, segs: list[Segment], anchor: list[int], a: int, b: int, unit_rule: UnitRule
    ) -> None:
        """Words ``a..b-1`` spoken: their units, between the speech markers."""
        ps, words, utt = self.model.spec.prompt, self.utterance.words, self.utterance
        marked = self.mode != "speech" or ps.speech_only_marker
        if marked and ps.speech_open:
            segs.append(self.marker(ps.speech_open))
        if self.mode == "speech":
            k0, k1 = 0, len(self.units)
        else:
            k0, k1 = _run_units(self.times, words[a].start, words[b - 1].end, unit_rule)
        content = _speech_run(
            utt, self.model.layout, self.units, self.frames, self.unit_word, k0, k1, a, b, self.mode
        )
        for i in range(a, b):  # a word without units sits after the run's earlier words
            before = [j for j, x in enumerate(content) if a <= x.word < i]
            anchor[i] = len(segs) + (before[-1] + 1 if before else 0)
        segs.extend(content)
        if marked and ps.speech_close:
            segs.append(self.marker(ps.speech_close))

    def text_run(self, segs: list[Segment], anchor: list[int], a: int, b: int) -> None:
        """Words ``a..b-1`` written as text, after the text marker."""
        ps, words, tok = self.model.spec.prompt, self.utterance.words, self.model.tokenizer
        if ps.text_open:
            segs.append(self.marker(ps.text_open))
        ctx = segs[-1].text if segs else ""
        for i in range(a, b):
            w = words[i].text
            # every word in its in-sentence form: the first one after a marker may not need
            # the space (SentencePiece adds ▁ itself)
            bare_ok = i == a and _bare_is_in_sentence(tok, ctx, w)
            anchor[i] = len(segs)
            segs.append(Segment(TEXT, w if bare_ok else " " + w, None, i))
        if ps.text_close:
            segs.append(self.marker(ps.text_close))


def _run_units(times: Sequence[float], start: float, end: float, rule: str) -> tuple[int, int]:
    """Units ``k0..k1-1`` of a speech run from ``start`` to ``end`` (s): those whose reference time
    falls in the run's interval under the same convention as :func:`assign_words` (slamkit's
    ``bisect_left(unit_time, start) .. bisect_right(unit_time, end)``)."""
    if rule == "end":
        return bisect.bisect_right(times, start + TIME_EPS), bisect.bisect_right(
            times, end + TIME_EPS
        )
    return bisect.bisect_left(times, start - TIME_EPS), bisect.bisect_left(times, end - TIME_EPS)


def _speech_run(
    utt: Utterance,
    layout: VocabLayout,
    units: Sequence[int],
    frames: Sequence[tuple[int, int]],
    unit_word: Sequence[int],
    k0: int,
    k1: int,
    a: int,
    b: int,
    mode: str,
) -> list[Segment]:
    """Units k0..k1-1 of a speech run (words a..b-1) merged with the prosody streams the model has."""
    ub = layout.units
    # (timestamp, rate for tie order, seg); units keep the word only if it is one of the run's
    items: list[tuple[float, float, Segment]] = []
    if k1 <= k0:
        return []
    f0, f1 = frames[k0][0], frames[k1 - 1][1]
    for k in range(k0, k1):
        w = unit_word[k]
        if mode != "speech" and not a <= w < b:
            w = -1  # a boundary unit slamkit's bisect takes from a neighbouring text word
        seg = Segment(SPEECH, ub.token(units[k]), ub.id_of(units[k]), w, k)
        items.append(((frames[k][0] - f0) / ub.frame_rate, ub.frame_rate, seg))
    t0, t1 = f0 / utt.frame_rate, f1 / utt.frame_rate
    for name, stream in utt.streams().items():
        if name not in layout.prosody:
            continue  # a stream this model has no tokens for
        blk = layout.prosody[name]
        fr = stream.frames()
        r = stream.frame_rate
        j0 = math.floor(t0 * r + TIME_EPS)
        j1 = min(len(fr), max(j0 + 1, math.ceil(t1 * r - TIME_EPS)))
        prev = None
        for j in range(j0, j1):
            if blk.dedup and fr[j] == prev:
                continue
            prev = fr[j]
            seg = Segment(PROSODY, blk.token(fr[j]), blk.id_of(fr[j]))
            items.append(((j - j0) / blk.frame_rate, blk.frame_rate, seg))
    # SpiritLM inserts style, pitch, then units and sorts stably by time: coarser stream first
    items.sort(key=lambda x: (x[0], x[1]))
    segs = [s for _, _, s in items]
    if len(segs) > k1 - k0:
        segs = _prosody_words(segs)
    return segs


def _prosody_words(segs: list[Segment]) -> list[Segment]:
    """A prosody token between two units of the same word belongs to that word; else to none."""
    out = list(segs)
    prev_w = [-1] * len(segs)
    w = -1
    for i, s in enumerate(segs):
        if s.kind == SPEECH:
            w = s.word
        prev_w[i] = w
    nxt = -1
    for i in range(len(segs) - 1, -1, -1):
        s = segs[i]
        if s.kind == SPEECH:
            nxt = s.word
        elif prev_w[i] == nxt and nxt >= 0:
            out[i] = replace(s, word=nxt)
    return out


def _bare_is_in_sentence(tok: Any, ctx: str, word: str) -> bool:
    """Does ``word`` written right after ``ctx`` (an added token or the prompt start) already get
    its in-sentence tokens (those of ``" " + word``)? True for SentencePiece tokenizers, which add
    ``▁`` after an added token; False for byte-level BPE (Qwen, Llama-3), which need the space."""
    base = plain_token_ids(tok, ctx)
    bare = plain_token_ids(tok, ctx + word)[len(base) :]
    return bare == plain_token_ids(tok, " " + word)
