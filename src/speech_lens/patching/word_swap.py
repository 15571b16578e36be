"""Word-swap patching: splice another utterance's word in and patch it back."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from speech_lens.data.encoded import EncodedPrompt
from speech_lens.data.prompts import encode_prompt
from speech_lens.data.utterance import Utterance, Word
from speech_lens.models.load import SpeechLM
from speech_lens.patching.hooks import SourceRun, resolve_layer_sets
from speech_lens.patching.metrics import word_logit_diff
from speech_lens.patching.pairs import run_pairs, spoken_word_ok
from speech_lens.patching.positions import PatchingError, Rule, map_words, word_span
from speech_lens.patching.result import PatchResult
from speech_lens.patching.sweep import Plan, plan_sweep, source_hook_names


def splice_word(utterance: Utterance, word: int, donor: Utterance, donor_word: int) -> Utterance:
    """``utterance`` with the audio units of word ``word`` replaced by those of ``donor``'s word
    ``donor_word`` (frame level; later word times shift; prosody streams are dropped because
    they cannot be spliced consistently)."""

    fr = utterance.frame_rate
    if abs(donor.frame_rate - fr) > 1e-6:
        raise PatchingError(
            f"cannot splice {donor.id!r} ({donor.frame_rate} Hz) into {utterance.id!r} ({fr} Hz)"
        )
    for u, i in ((utterance, word), (donor, donor_word)):
        if not 0 <= i < len(u.words):
            raise PatchingError(f"utterance {u.id!r} has no word {i} (0..{len(u.words) - 1})")
    frames, dframes = list(utterance.frames()), list(donor.frames())
    w, d = utterance.words[word], donor.words[donor_word]
    a, b = round(w.start * fr), round(w.end * fr)
    c, e = round(d.start * fr), round(d.end * fr)
    shift = (e - c) - (b - a)
    new_words = list(utterance.words[:word])
    new_words.append(Word(d.text, a / fr, (a + e - c) / fr))
    new_words += [
        Word(x.text, x.start + shift / fr, x.end + shift / fr) for x in utterance.words[word + 1 :]
    ]
    return Utterance(
        id=f"{utterance.id}[{word}:{w.text}->{d.text}]",
        words=tuple(new_words),
        units=tuple(frames[:a] + dframes[c:e] + frames[b:]),
        durations=None,
        frame_rate=fr,
        speaker=utterance.speaker,
    )


def word_swap(
    model: SpeechLM,
    clean: Utterance,
    corrupt: Utterance,
    word: int,
    *,
    mode: str = "denoise",
    component: str = "resid_pre",
    rule: Rule | str = "last",
    layers: int | Iterable[int | Iterable[int]] | None = None,
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    progress: bool = False,
) -> PatchResult:
    """Two spoken utterances that differ in word ``word`` (e.g. from :func:`splice_word`).

    ``mode="denoise"`` patches the clean run into the corrupted one, ``"noise"`` the corrupted
    into the clean one; every word is patched on its own (layer x word sweep). The metric is
    logit(clean word) - logit(swapped word) (text tokens) at the swapped word's last position of
    the patched run: which word does the model take itself to be hearing. ``batch_size`` (int
    or ``"auto"``): patched runs (layer x word) per forward.
    """
    (res,) = word_swap_many(
        model,
        [(clean, corrupt)],
        word,
        modes=(mode,),
        component=component,
        rule=rule,
        layers=layers,
        batch_size=batch_size,
        memory_budget_gb=memory_budget_gb,
        progress=progress,
    )
    return res[0]


def word_swap_many(
    model: SpeechLM,
    items: Sequence[tuple[Utterance, Utterance]],
    word: int,
    *,
    modes: Sequence[str],
    component: str,
    rule: Rule | str,
    layers: int | Iterable[int | Iterable[int]] | None,
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    padding_side: str = "right",
    progress: bool = False,
) -> list[list[PatchResult]]:
    """:func:`word_swap` in each of ``modes`` for every (clean, corrupt) pair, ``batch_size``
    pairs per padded forward."""

    for mode in modes:
        if mode not in ("denoise", "noise"):
            raise PatchingError(f"mode must be 'denoise' or 'noise', not {mode!r}")
    for clean, corrupt in items:
        if clean.words[word].text == corrupt.words[word].text:
            raise PatchingError(
                f"word {word} is {clean.words[word].text!r} in both utterances: nothing was swapped"
            )
    layer_sets = resolve_layer_sets(model, layers)
    pairs = [
        (encode_prompt(model, c, mode="speech"), encode_prompt(model, x, mode="speech"))
        for c, x in items
    ]

    make_plans = WordSwapPlans(model, items, pairs, word, modes, component, rule, layer_sets)
    names = source_hook_names(model, component, layer_sets, None)
    return run_pairs(
        model,
        pairs,
        make_plans,
        # the clean run is the denoising source, the corrupted one the noising source
        source_names=names if "denoise" in modes else set(),
        target_names=names if "noise" in modes else set(),
        batch_size=batch_size,
        memory_budget_gb=memory_budget_gb,
        padding_side=padding_side,
        progress=progress,
        desc="word-swap",
    )


def swap_donor(utts: Sequence[Utterance], k: int, word: int) -> tuple[Utterance, int] | None:
    """A word from another utterance with a different text, for swapping into ``utts[k]``."""
    target = utts[k].words[word].text
    for j in [*range(k + 1, len(utts)), *range(k)]:
        ws = utts[j].words
        for i in sorted(range(len(ws)), key=lambda i: abs(i - word)):
            if ws[i].text != target:
                return utts[j], i
    return None


@dataclass(frozen=True)
class WordSwapPlans:
    """``make_plans`` for :func:`run_pairs`: the swapped word patched in each of ``modes``."""

    model: SpeechLM
    items: Sequence[tuple[Utterance, Utterance]]  # (clean, corrupt)
    pairs: list[tuple[EncodedPrompt, EncodedPrompt]]  # their speech prompts
    word: int
    modes: Sequence[str]
    component: str
    rule: Rule | str
    layer_sets: list[tuple[int, ...]]

    def __call__(self, i: int, clean_run: SourceRun, corrupt_run: SourceRun) -> list[Plan]:
        (clean, corrupt), (pc, px) = self.items[i], self.pairs[i]
        word = self.word
        common = [
            w
            for w in range(min(len(clean.words), len(corrupt.words)))
            if spoken_word_ok(pc, w) and spoken_word_ok(px, w)
        ]
        if word not in common:
            word_span(pc, word, None), word_span(px, word, None)  # raises with the reason
        plans = []
        for mode in self.modes:
            runs = (pc, px, clean_run, corrupt_run), (px, pc, corrupt_run, clean_run)
            source, target, source_run, target_run = runs[mode != "denoise"]
            extra = {
                "experiment": f"word-swap-{mode}",
                "utterance": clean.id,
                "word_index": str(word),
                "word": clean.words[word].text,
                "swap": corrupt.words[word].text,
            }
            plans.append(self.plan(source, target, common, source_run, target_run, extra))
        return plans

    def plan(
        self,
        source: EncodedPrompt,
        target: EncodedPrompt,
        common: list[int],
        source_run: SourceRun,
        target_run: SourceRun,
        extra: dict[str, str],
    ) -> Plan:
        """Every common word patched from ``source`` into ``target``, read as the logit
        difference between the clean and the swapped word at the swapped word."""
        model, word, good, bad = self.model, self.word, extra["word"], extra["swap"]
        return plan_sweep(
            model,
            source,
            target,
            map_words(source, target, common, rule=self.rule),
            word_logit_diff(model, target, word, good, bad),
            component=self.component,
            layers=self.layer_sets,
            positions="group",
            heads=None,
            source_metric=word_logit_diff(model, source, word, good, bad),
            source_run=source_run,
            target_run=target_run,
            extra=extra,
        )
