"""Cross-modal patching: text -> speech and speech -> text of the same utterance."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from speech_lens.data.encoded import EncodedPrompt
from speech_lens.data.prompts import encode_prompt

if TYPE_CHECKING:
    from speech_lens.data.utterance import Utterance
    from speech_lens.models.load import SpeechLM
from speech_lens.patching.hooks import SourceRun, resolve_layer_sets
from speech_lens.patching.metrics import lens_point
from speech_lens.patching.pairs import next_word_metric, run_pairs, spoken_word_ok
from speech_lens.patching.positions import PatchingError, Rule, map_words, word_span
from speech_lens.patching.result import PatchResult
from speech_lens.patching.sweep import Plan, plan_sweep, source_hook_names


def cross_modal(
    model: SpeechLM,
    utterance: Utterance,
    *,
    direction: str = "text-to-speech",
    words: Iterable[int] | None = None,
    component: str = "resid_pre",
    rule: Rule | str = "last",
    layers: int | Iterable[int | Iterable[int]] | None = None,
    read_layer: int | None = None,
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    progress: bool = False,
) -> list[PatchResult]:
    """The same utterance as text and as speech; for each word w (that has a next word), patch
    w's positions from one run into the other, one layer (set) at a time, and read the log-prob
    of the *next* word's text token at w's last position of the patched run.

    ``direction="text-to-speech"``: source = text run, target = speech run (does the speech run's
    next-word prediction follow the text run's?); ``"speech-to-text"`` the reverse. Each result
    is a layer curve (``positions="all"``) with ``baseline`` (unpatched target) and
    ``source_value`` (the source run's own next-word log-prob at w). ``read_layer`` reads the
    log-prob with the logit lens at that row (``resid_pre``; ``n_layers`` = output) of the
    patched run instead of from the output logits: a speech run's output must predict a unit
    or a marker next, while the paper's next-word signal lives in the middle layers.
    ``batch_size`` (int or ``"auto"``): patched runs (word x layer) per forward.
    """
    (res,) = cross_modal_many(
        model,
        [utterance],
        direction=direction,
        words=words,
        component=component,
        rule=rule,
        layers=layers,
        read_layer=read_layer,
        batch_size=batch_size,
        memory_budget_gb=memory_budget_gb,
        progress=progress,
    )
    return res


def cross_modal_many(
    model: SpeechLM,
    utterances: Sequence[Utterance],
    *,
    direction: str,
    words: Iterable[int] | None,
    component: str,
    rule: Rule | str,
    layers: int | Iterable[int | Iterable[int]] | None,
    read_layer: int | None,
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    padding_side: str = "right",
    progress: bool = False,
) -> list[list[PatchResult]]:
    """:func:`cross_modal` for every utterance, ``batch_size`` utterances per padded forward."""

    if direction not in ("text-to-speech", "speech-to-text"):
        raise PatchingError(
            f"direction must be text-to-speech or speech-to-text, not {direction!r}"
        )
    layer_sets = resolve_layer_sets(
        model, layers
    )  # a list: an iterator would be used up by one word
    chosen = None if words is None else [int(w) for w in words]
    pairs = []
    for u in utterances:
        text = encode_prompt(model, u, mode="text")
        speech = encode_prompt(model, u, mode="speech")
        pairs.append((text, speech) if direction == "text-to-speech" else (speech, text))
    lens = set() if read_layer is None else {lens_point(model, read_layer)}
    make_plans = CrossModalPlans(
        model, utterances, pairs, direction, chosen, component, rule, layer_sets, read_layer
    )
    return run_pairs(
        model,
        pairs,
        make_plans,
        source_names=source_hook_names(model, component, layer_sets, None) | lens,
        target_names=lens,
        batch_size=batch_size,
        memory_budget_gb=memory_budget_gb,
        padding_side=padding_side,
        progress=progress,
        desc=direction,
    )


@dataclass(frozen=True)
class CrossModalPlans:
    """``make_plans`` for :func:`run_pairs`: one sweep plan per patched word of utterance ``i``."""

    model: SpeechLM
    utterances: Sequence[Utterance]
    pairs: list[tuple[EncodedPrompt, EncodedPrompt]]  # (source, target) per utterance
    direction: str
    chosen: list[int] | None  # None: every word that has a next word and units of its own
    component: str
    rule: Rule | str
    layer_sets: list[tuple[int, ...]]
    read_layer: int | None

    def __call__(self, i: int, source_run: SourceRun, target_run: SourceRun) -> list[Plan]:
        utt, (source, target) = self.utterances[i], self.pairs[i]
        n = len(utt.words)
        plans = []
        for w in list(range(n - 1)) if self.chosen is None else self.chosen:
            if not 0 <= w < n - 1:
                raise PatchingError(
                    f"utterance {utt.id!r}: word {w} has no next word (words 0..{n - 2})"
                )
            if not (spoken_word_ok(source, w) and spoken_word_ok(target, w)):
                if self.chosen is None:
                    continue  # a spoken word with no unit of its own: nothing to patch
                word_span(source, w, None), word_span(target, w, None)  # raises with the reason
            plans.append(self.plan(utt, w, source, target, source_run, target_run))
        return plans

    def plan(
        self,
        utt: Utterance,
        w: int,
        source: EncodedPrompt,
        target: EncodedPrompt,
        source_run: SourceRun,
        target_run: SourceRun,
    ) -> Plan:
        """Word ``w`` patched from ``source`` into ``target``, read at its next word."""
        extra = {
            "experiment": self.direction,
            "utterance": utt.id,
            "word_index": str(w),
            "word": utt.words[w].text,
            "next_word": utt.words[w + 1].text,
        }
        model, read_layer = self.model, self.read_layer
        return plan_sweep(
            model,
            source,
            target,
            map_words(source, target, [w], rule=self.rule),
            next_word_metric(model, target, w, read_layer),
            component=self.component,
            layers=self.layer_sets,
            positions="all",
            heads=None,
            source_metric=next_word_metric(model, source, w, read_layer),
            source_run=source_run,
            target_run=target_run,
            extra=extra,
        )
