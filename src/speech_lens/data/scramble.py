"""Scrambled word order: the control in which each word keeps its units but loses its context.

:func:`scramble_words` shuffles the words of an utterance (seeded, per utterance) and moves each
word's units and alignment with it, so every word sounds as before but follows other words. A
lens that reads the word it hears keeps its current-word Recall@k; next-word Recall@k, which
needs the sentence, should fall toward the frequency prior (issue 17 §1).

The units of a word are those whose end time falls in its ``(start, end]`` (the rule the lens
run encodes with, :func:`~speech_lens.data.utterance.assign_words`); units in silence stay in
their places between the word slots (before the first slot, between slots, after the last), and
a word with no unit moves as an empty slot. Units move in the utterance's own form: a
deduplicated utterance moves its deduplicated units with their run lengths (stored forms are
kept as they are), a frame-level one moves frames, which a family that deduplicates then merges
where two equal units meet at a new word boundary, as it would in spliced audio. Word times
shift with their units; a word's end is cut back to its last unit's end (it may have reached
into the unit after it, which is now another word's) and a word with no unit becomes the
zero-length word at its slot. Prosody streams (pitch / style) are refused: their frames are not
cut at word boundaries.

The order is a uniformly drawn permutation other than the identity (an utterance of one word
stays as it is), from ``seed`` and the utterance id alone (``scramble_order``): the same
utterance scrambles alike in every run, whatever the other utterances or ``--limit``.
"""

from __future__ import annotations

import bisect
import zlib
from dataclasses import replace
from itertools import accumulate

import numpy as np

from speech_lens.data.utterance import TIME_EPS, DataError, Utterance, Word


def scramble_order(utterance_id: str, n_words: int, seed: int) -> tuple[int, ...]:
    """The original word indices in their scrambled order: a uniform permutation other than the
    identity (for two or more words), drawn from ``seed`` and ``crc32(utterance_id)``."""
    rng = np.random.default_rng([int(seed), zlib.crc32(utterance_id.encode("utf-8"))])
    identity = tuple(range(n_words))
    if n_words < 2:
        return identity
    while True:
        order = tuple(int(i) for i in rng.permutation(n_words))
        if order != identity:
            return order


def word_unit_slots(utt: Utterance) -> list[tuple[int, int]]:
    """``(first, end)`` unit indices of each word's units in the utterance's own form (units
    whose end time falls in the word's ``(start, end]``); ``first == end`` for a word with none."""
    fr = utt.frame_rate
    durs = utt.durations if utt.durations is not None else (1,) * len(utt.units)
    times = [f / fr for f in accumulate(durs)]
    slots, prev = [], 0
    for w in utt.words:
        a = max(prev, bisect.bisect_right(times, w.start + TIME_EPS))
        b = max(a, bisect.bisect_right(times, w.end + TIME_EPS))
        slots.append((a, b))
        prev = b
    return slots


def scramble_words(utterance: Utterance, seed: int) -> Utterance:
    """The utterance with its words in ``scramble_order`` and their units moved with them."""
    utt = utterance
    if utt.streams():
        raise DataError(
            utt.id,
            next(iter(utt.streams())),
            "scrambled word order moves the speech units only; prosody streams (pitch, style) "
            "are not cut at word boundaries: scramble a manifest without them",
        )
    order = scramble_order(utt.id, len(utt.words), seed)
    fr = utt.frame_rate
    durs = utt.durations if utt.durations is not None else (1,) * len(utt.units)
    frame_at = [0, *accumulate(durs)]  # unit i spans frames frame_at[i]..frame_at[i + 1]
    slots = word_unit_slots(utt)
    # the silence between slots stays in place: before slot 0, between slots, after the last
    gaps = [(0, slots[0][0])]
    gaps += [(slots[j - 1][1], slots[j][0]) for j in range(1, len(slots))]
    gaps.append((slots[-1][1], len(utt.units)))
    pieces: list[int] = []  # unit indices in their new order
    words: list[Word] = []
    frame = 0  # frames laid down so far
    for n, j in enumerate(order):
        pieces.extend(range(*gaps[n]))
        frame += frame_at[gaps[n][1]] - frame_at[gaps[n][0]]
        a, b = slots[j]
        pieces.extend(range(a, b))
        w, t0, t1 = utt.words[j], frame / fr, (frame + frame_at[b] - frame_at[a]) / fr
        if a == b:  # no unit: the zero-length word at its slot
            words.append(Word(w.text, t0, t0))
            continue
        delta = t0 - frame_at[a] / fr
        start = max(w.start + delta, t0)
        words.append(Word(w.text, start, max(start, min(w.end + delta, t1))))
        frame += frame_at[b] - frame_at[a]
    pieces.extend(range(*gaps[-1]))
    return replace(
        utt,
        words=tuple(words),
        units=tuple(utt.units[i] for i in pieces),
        durations=None if utt.durations is None else tuple(durs[i] for i in pieces),
        text=" ".join(w.text for w in words),
    )
