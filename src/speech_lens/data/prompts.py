"""Prompt encoders: utterances -> each family's exact token sequence + a position table.

``encode_prompt`` writes an :class:`~speech_lens.data.Utterance` as speech-only, text-only or
interleaved prompt in the family's marker convention (read from the adapter spec's
``PromptSpec``), returns the tokenizer's ids and, for every position, its kind, word and unit;
``word_targets`` gives each word's text tokens for lens metrics.
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from speech_lens.data.encoded import (
    BOS,
    EncodedPrompt,
    Mode,
    PromptError,
    SpanSampler,
    plain_token_ids,
)
from speech_lens.data.segments import (
    PromptWriter,
    Segment,
    modality_runs,
    unit_times,
    word_modalities,
)
from speech_lens.data.utterance import UnitRule, Utterance, assign_words
from speech_lens.data.word_targets import word_spans


def encode_prompt(
    model: Any,
    utterance: Utterance,
    *,
    mode: Mode = "speech",
    speech_words: set[int] | None = None,
    seed: int | None = None,
    span_sampler: SpanSampler | None = None,
    unit_rule: UnitRule = "end",
    span_mean: float | None = None,
    speech_fraction: float | None = None,
) -> EncodedPrompt:
    """Encode an utterance in the model family's exact prompt format, with its position table.

    ``model`` is a :class:`~speech_lens.SpeechLM` (anything with ``.tokenizer``, ``.layout`` and
    ``.spec``); the format comes from ``model.spec.prompt`` (markers, BOS rule), never from the
    family name.

    * ``mode="speech"``: every unit of the utterance (silence included), after the speech marker
      unless the family scores bare units (``speech_only_marker = false``, SIMS).
    * ``mode="text"``: the words as text after the text marker.
    * ``mode="interleaved"``: each word in one modality, switching at word boundaries; the speech
      words are ``speech_words`` (word indices) or sampled with ``span_sampler`` (default: the
      family's own, ``spec.prompt.span_sampler``) and ``seed``.
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

    units, frames, times = unit_times(utterance, layout.units.dedup, unit_rule)
    unit_word = assign_words(times, words, unit_rule)

    span_params = (span_sampler or spec.prompt.span_sampler, span_mean, speech_fraction)
    modal = word_modalities(uid, n_words, mode, speech_words, seed, span_params)

    runs = modality_runs(modal)
    writer = PromptWriter(model, utterance, mode, units, frames, times, unit_word)
    segs, anchor = writer.segments(runs, unit_rule)

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


def _tokenize_segments(tok: Any, segs: Sequence[Segment], uid: str) -> tuple[list[int], list[int]]:
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
