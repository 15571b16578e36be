"""Prompts: interleave an utterance's words as text, speech units or both, with a position table."""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from speech_lens.data.encoded import (
    BOS,
    MARKER,
    PROSODY,
    SPEECH,
    TEXT,
    EncodedPrompt,
    Mode,
    PromptError,
    SpanSampler,
    plain_token_ids,
)
from speech_lens.data.utterance import TIME_EPS, UnitRule, Utterance, assign_words
from speech_lens.data.word_targets import sample_speech_words, word_spans
from speech_lens.vocab import VocabLayout


@dataclass(frozen=True)
class _Seg:
    """One piece of the prompt string: an added token (known id) or one word's text."""

    kind: str
    text: str
    token_id: int | None = None  # None: text, tokenized with its neighbours
    word: int = -1
    unit: int = -1


def encode_prompt(
    model: Any,
    utterance: Utterance,
    *,
    mode: Mode = "speech",
    speech_words: set[int] | None = None,
    seed: int | None = None,
    span_sampler: SpanSampler = "poisson",
    unit_rule: UnitRule = "end",
    span_mean: float | None = None,
    speech_fraction: float = 0.3,
) -> EncodedPrompt:
    """Encode an utterance in the model family's exact prompt format, with its position table.

    ``model`` is a :class:`~speech_lens.SpeechLM` (anything with ``.tokenizer``, ``.layout`` and
    ``.spec``); the format comes from ``model.spec.prompt`` (markers, BOS rule), never from the
    family name.

    * ``mode="speech"``: every unit of the utterance (silence included), after the speech marker
      unless the family scores bare units (``speech_only_marker = false``, SIMS).
    * ``mode="text"``: the words as text after the text marker.
    * ``mode="interleaved"``: each word in one modality, switching at word boundaries; the speech
      words are ``speech_words`` (word indices) or sampled with ``span_sampler`` and ``seed``.
      A speech run of words ``a..b`` takes the units whose reference time (``unit_rule``) lies in
      ``(words[a].start, words[b].end]`` (slamkit's ``bisect`` recipe, see
      :func:`~speech_lens.data.assign_words`); units in silence before or after the run are
      dropped, silence between its words is kept. Markers open every run (and close it where the family has a close
      marker, SpeechGPT ``<eosp>``).

    Units are deduplicated when the family's spec says so. Prosody streams the model knows
    (SpiritLM Expressive pitch/style) are cut to each speech run's time window, deduplicated per
    stream as the spec says, and merged by timestamp (``frame / rate`` with the spec's rates,
    stable, ties coarser stream first: style -> pitch -> units), i.e. as SpiritLM's tokenizer
    writes the run's audio.

    The ids are the tokenizer's own ids for the concatenated prompt string (with BOS as the
    family adds it); text words are written so that each gets its in-sentence (leading-space)
    form. ``spans`` has one :class:`WordSpan` per word, in its modality: for a text word its
    tokens; for a spoken word the positions from its first to its last unit (prosody tokens in
    between carry the word's index; prosody tokens at word boundaries or in silence carry -1). Units in silence are in no span; a spoken word with no unit gets an empty
    span (``start == end`` at the place it would be).
    """
    tok, layout, spec = model.tokenizer, model.layout, model.spec
    ps = spec.prompt
    utterance.check_layout(layout)
    uid = utterance.id
    words = utterance.words
    n_words = len(words)
    if abs(utterance.frame_rate - layout.units.frame_rate) > 0.01 * layout.units.frame_rate:
        warnings.warn(
            f"utterance {uid!r}: frame_rate {utterance.frame_rate} Hz differs from the "
            f"{spec.name} units' {layout.units.frame_rate} Hz (units from another tokenizer?)",
            stacklevel=2,
        )

    # the unit sequence the model sees, with each unit's frames and word
    if layout.units.dedup:
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
            f"utterance {uid!r}: unit_rule must be 'end' or 'midpoint', got {unit_rule!r}"
        )
    unit_word = assign_words(times, words, unit_rule)

    # modality of every word
    if mode == "speech":
        modal = [SPEECH] * n_words
    elif mode == "text":
        modal = [TEXT] * n_words
    elif mode == "interleaved":
        if speech_words is None:
            rng = np.random.default_rng(seed)
            speech_words = sample_speech_words(
                n_words, span_sampler, rng, span_mean=span_mean, speech_fraction=speech_fraction
            )
        speech_words = {int(i) for i in speech_words}
        bad = sorted(i for i in speech_words if not 0 <= i < n_words)
        if bad:
            raise PromptError(
                f"utterance {uid!r}: field speech_words: indices {bad} outside 0..{n_words - 1}"
            )
        modal = [SPEECH if i in speech_words else TEXT for i in range(n_words)]
    else:
        raise PromptError(
            f"utterance {uid!r}: mode must be speech, text or interleaved, got {mode!r}"
        )

    runs: list[tuple[str, int, int]] = []  # (modality, first word, last word + 1)
    for i, m in enumerate(modal):
        if runs and runs[-1][0] == m:
            runs[-1] = (m, runs[-1][1], i + 1)
        else:
            runs.append((m, i, i + 1))

    marker_id = {t: layout.marker_ids[n] for n, t in layout.marker_tokens.items()}

    def added(text: str) -> _Seg:
        i = marker_id.get(text)
        if i is None:
            i = tok.convert_tokens_to_ids(text)
            if i is None or i == tok.unk_token_id:
                raise PromptError(
                    f"{spec.name}: prompt marker {text!r} is not a token of the tokenizer"
                )
        return _Seg(MARKER, text, int(i))

    segs: list[_Seg] = []
    anchor = [0] * n_words  # segment where a word's (possibly empty) span starts
    for m, a, b in runs:
        if m == SPEECH:
            marked = mode != "speech" or ps.speech_only_marker
            if marked and ps.speech_open:
                segs.append(added(ps.speech_open))
            if mode == "speech":
                k0, k1 = 0, len(units)
            else:
                k0, k1 = _run_units(times, words[a].start, words[b - 1].end, unit_rule)
            content = _speech_run(utterance, layout, units, frames, unit_word, k0, k1, a, b, mode)
            for i in range(a, b):  # a word without units sits after the run's earlier words
                before = [j for j, x in enumerate(content) if a <= x.word < i]
                anchor[i] = len(segs) + (before[-1] + 1 if before else 0)
            segs.extend(content)
            if marked and ps.speech_close:
                segs.append(added(ps.speech_close))
        else:
            if ps.text_open:
                segs.append(added(ps.text_open))
            ctx = segs[-1].text if segs else ""
            for i in range(a, b):
                w = words[i].text
                # every word in its in-sentence form: the first one after a marker may not need
                # the space (SentencePiece adds ▁ itself)
                bare_ok = i == a and _bare_is_in_sentence(tok, ctx, w)
                anchor[i] = len(segs)
                segs.append(_Seg(TEXT, w if bare_ok else " " + w, None, i))
            if ps.text_close:
                segs.append(added(ps.text_close))

    ids, seg_of = _tokenize_segments(tok, segs, uid)
    prompt_text = "".join(s.text for s in segs)
    prefix = _special_prefix(tok, prompt_text, ids, ps.bos)
    all_ids = prefix + ids
    kinds = [BOS] * len(prefix) + [segs[j].kind for j in seg_of]
    word_idx = [-1] * len(prefix) + [segs[j].word for j in seg_of]
    unit_idx = [-1] * len(prefix) + [segs[j].unit for j in seg_of]
    empty_at = [len(prefix) + bisect.bisect_left(seg_of, j) for j in anchor]
    spans = word_spans(words, modal, word_idx, empty_at)
    return EncodedPrompt(
        tokens=torch.tensor(all_ids, dtype=torch.long),
        kind=tuple(kinds),
        word_index=torch.tensor(word_idx, dtype=torch.long),
        unit_index=torch.tensor(unit_idx, dtype=torch.long),
        words=tuple(w.text for w in words),
        spans=spans,
        utterance_id=uid,
        family=spec.name,
        text=prompt_text,
        token_strings=tuple(str(t) for t in tok.convert_ids_to_tokens(all_ids)),
        mode=mode,
        modalities=tuple(modal),
        unit_rule=unit_rule,
    )


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
) -> list[_Seg]:
    """Units k0..k1-1 of a speech run (words a..b-1) merged with the prosody streams the model has."""
    ub = layout.units
    # (timestamp, rate for tie order, seg); units keep the word only if it is one of the run's
    items: list[tuple[float, float, _Seg]] = []
    if k1 <= k0:
        return []
    f0, f1 = frames[k0][0], frames[k1 - 1][1]
    for k in range(k0, k1):
        w = unit_word[k]
        if mode != "speech" and not a <= w < b:
            w = -1  # a boundary unit slamkit's bisect takes from a neighbouring text word
        seg = _Seg(SPEECH, ub.token(units[k]), ub.id_of(units[k]), w, k)
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
            seg = _Seg(PROSODY, blk.token(fr[j]), blk.id_of(fr[j]))
            items.append(((j - j0) / blk.frame_rate, blk.frame_rate, seg))
    # SpiritLM inserts style, pitch, then units and sorts stably by time: coarser stream first
    items.sort(key=lambda x: (x[0], x[1]))
    segs = [s for _, _, s in items]
    if len(segs) > k1 - k0:
        segs = _prosody_words(segs)
    return segs


def _prosody_words(segs: list[_Seg]) -> list[_Seg]:
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


def _tokenize_segments(tok: Any, segs: Sequence[_Seg], uid: str) -> tuple[list[int], list[int]]:
    """Ids of the concatenated prompt string and, per id, the index of the segment it came from.

    The whole string is tokenized once; text chunks (words between two added tokens) are then
    split into words by tokenizing growing prefixes of the chunk after the same preceding token
    and taking the common prefix with the chunk's ids. A token straddling two words goes to the
    earlier word.
    """
    full = plain_token_ids(tok, "".join(s.text for s in segs))
    ids: list[int] = []
    seg_of: list[int] = []
    j = 0
    while j < len(segs):
        s = segs[j]
        if s.token_id is not None:
            ids.append(s.token_id)
            seg_of.append(j)
            j += 1
            continue
        e = j
        while e < len(segs) and segs[e].token_id is None:
            e += 1
        ctx = segs[j - 1].text if j > 0 else ""
        base = plain_token_ids(tok, ctx)
        chunk = plain_token_ids(tok, ctx + "".join(x.text for x in segs[j:e]))
        if chunk[: len(base)] != base:
            raise PromptError(
                f"utterance {uid!r}: the tokenizer merges text into the token {ctx!r} before it"
            )
        chunk = chunk[len(base) :]
        done = 0
        for w in range(j, e):
            if w == e - 1:
                cut = len(chunk)
            else:
                pre = plain_token_ids(tok, ctx + "".join(x.text for x in segs[j : w + 1]))[
                    len(base) :
                ]
                cut = done
                while cut < min(len(pre), len(chunk)) and pre[cut] == chunk[cut]:
                    cut += 1
            ids.extend(chunk[done:cut])
            seg_of.extend([w] * (cut - done))
            done = cut
        j = e
    if ids != full:
        raise PromptError(
            f"utterance {uid!r}: segment-wise tokenization differs from the tokenizer on the whole "
            f"prompt (first difference at position "
            f"{next((i for i, (x, y) in enumerate(zip(ids, full, strict=False)) if x != y), min(len(ids), len(full)))})"
        )
    return ids, seg_of


def _special_prefix(tok: Any, text: str, ids: list[int], bos: bool | str) -> list[int]:
    """The ids the family puts before the prompt (BOS), per ``PromptSpec.bos``; EOS is dropped
    (SpiritLM adds none, slamkit's build_prompt strips it)."""
    if bos is False:
        return []
    with_special = list(tok(text, add_special_tokens=True)["input_ids"])
    n = len(ids)
    prefix: list[int] = []
    for i in range(len(with_special) - n + 1):
        if with_special[i : i + n] == ids:
            prefix = with_special[:i]
            break
    if bos is True and tok.bos_token_id is not None and tok.bos_token_id not in prefix:
        prefix = [int(tok.bos_token_id), *prefix]
    return prefix
