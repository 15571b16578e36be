"""Position maps: which source positions feed which target positions, by a stated rule."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch

from speech_lens.data.encoded import BOS, MARKER, PROSODY, SPEECH, TEXT, EncodedPrompt

if TYPE_CHECKING:
    from speech_lens.models.load import SpeechLM


Rule = Literal["last", "mean", "each"]
RULES: tuple[str, ...] = ("last", "mean", "each")


class PatchingError(ValueError):
    """A position map, prompt pair or patching request that does not fit; the message says why."""


# ---------------------------------------------------------------------------------------------
# Position maps
# ---------------------------------------------------------------------------------------------


def prompt_digest(prompt: EncodedPrompt) -> str:
    """Short fingerprint of a prompt's tokens: a map is only applied to the prompts it was built on."""
    data = prompt.tokens.detach().cpu().to(torch.int64).numpy().tobytes()
    return hashlib.sha1(data).hexdigest()[:12]


def _describe(prompt: EncodedPrompt) -> str:
    kinds = sorted({k for k in prompt.kind if k in (TEXT, SPEECH)})
    return f"{prompt.utterance_id!r} ({'+'.join(kinds) or 'no words'}, {len(prompt)} positions)"


@dataclass(frozen=True)
class MapGroup:
    """One aligned unit of a map: source span positions -> target span positions."""

    label: str
    source: tuple[int, ...]
    target: tuple[int, ...]


@dataclass(frozen=True)
class PositionMap:
    """Which source positions are written to which target positions, under a stated ``rule``.

    ``groups`` are aligned spans (usually one word each); :attr:`pairs` expands them by the rule
    into ``(target position, source positions averaged into it)``. ``source_id``/``target_id``
    and the digests name the prompts the map was built from; applying it to other prompts is
    refused.
    """

    groups: tuple[MapGroup, ...]
    rule: str
    source_id: str
    target_id: str
    source_len: int
    target_len: int
    source_digest: str = ""
    target_digest: str = ""
    family: str = ""

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise PatchingError(f"unknown rule {self.rule!r}; one of {RULES}")
        if not self.groups:
            raise PatchingError(
                f"empty position map from {self.source_id!r} to {self.target_id!r}: nothing to patch"
            )
        seen: dict[int, str] = {}
        for g in self.groups:
            if not g.source or not g.target:
                raise PatchingError(f"map group {g.label!r} has an empty source or target span")
            for side, positions, n, pid in (
                ("source", g.source, self.source_len, self.source_id),
                ("target", g.target, self.target_len, self.target_id),
            ):
                bad = [p for p in positions if not 0 <= p < n]
                if bad:
                    raise PatchingError(
                        f"map group {g.label!r}: {side} position {bad[0]} is outside prompt "
                        f"{pid!r} (positions 0..{n - 1})"
                    )
            if self.rule == "each" and len(g.source) != len(g.target):
                raise PatchingError(
                    f"rule 'each' needs equal span lengths, but group {g.label!r} maps "
                    f"{len(g.source)} source positions to {len(g.target)} target positions; "
                    f"use rule='last' or rule='mean'"
                )
            for t, _ in self._expand(g):
                if t in seen:
                    raise PatchingError(
                        f"target position {t} of {self.target_id!r} is written by two map groups "
                        f"({seen[t]!r} and {g.label!r})"
                    )
                seen[t] = g.label

    def _expand(self, g: MapGroup) -> list[tuple[int, tuple[int, ...]]]:
        if self.rule == "last":
            return [(g.target[-1], (g.source[-1],))]
        if self.rule == "mean":
            return [(t, g.source) for t in g.target]
        return [(t, (s,)) for s, t in zip(g.source, g.target, strict=True)]

    @property
    def pairs(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """``(target position, source positions)``: the target gets the mean of the sources."""
        return tuple(p for g in self.groups for p in self._expand(g))

    @property
    def target_positions(self) -> tuple[int, ...]:
        return tuple(t for t, _ in self.pairs)

    def __len__(self) -> int:
        return len(self.groups)

    def subsets(self, by: str) -> list[tuple[str, PositionMap]]:
        """Split into one map per group (``by="group"``) or per patched target position
        (``by="pair"``), each labelled; ``by="all"`` is the map itself."""
        if by == "all":
            return [("all", self)]
        if by == "group":
            return [(g.label, replace(self, groups=(g,))) for g in self.groups]
        if by == "pair":
            out = []
            for g in self.groups:
                expanded = self._expand(g)
                for k, (t, srcs) in enumerate(expanded):
                    label = g.label if len(expanded) == 1 else f"{g.label}[{k}]"
                    out.append((label, replace(self, groups=(MapGroup(label, srcs, (t,)),))))
            return out
        raise PatchingError(f"positions must be 'all', 'group' or 'pair', not {by!r}")

    def check(self, source: EncodedPrompt, target: EncodedPrompt) -> None:
        """Refuse prompts other than the ones the map was built from."""
        for side, prompt, pid, n, digest in (
            ("source", source, self.source_id, self.source_len, self.source_digest),
            ("target", target, self.target_id, self.target_len, self.target_digest),
        ):
            if len(prompt) != n or (digest and prompt_digest(prompt) != digest):
                raise PatchingError(
                    f"the position map was built for {side} prompt {pid!r} ({n} positions), "
                    f"but got {_describe(prompt)}"
                )


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise PatchingError(f"unknown rule {rule!r}; one of {RULES}")


def _check_same_model(source: EncodedPrompt, target: EncodedPrompt) -> None:
    if source.family != target.family:
        raise PatchingError(
            f"prompts come from different models: source {source.utterance_id!r} was encoded "
            f"for {source.family!r}, target {target.utterance_id!r} for {target.family!r}"
        )


def _new_map(
    source: EncodedPrompt, target: EncodedPrompt, groups: Sequence[MapGroup], rule: str
) -> PositionMap:
    _check_rule(rule)
    _check_same_model(source, target)
    return PositionMap(
        groups=tuple(groups),
        rule=rule,
        source_id=source.utterance_id,
        target_id=target.utterance_id,
        source_len=len(source),
        target_len=len(target),
        source_digest=prompt_digest(source),
        target_digest=prompt_digest(target),
        family=source.family,
    )


def word_span(prompt: EncodedPrompt, word: int, modality: str | None) -> tuple[int, ...]:
    spans = [
        s
        for s in prompt.spans
        if s.index == word and (modality is None or s.modality == modality) and s.end > s.start
    ]
    if not spans and any(s.index == word for s in prompt.spans):
        raise PatchingError(
            f"word {word} ({_word_text(prompt, word)!r}) has no positions in prompt "
            f"{_describe(prompt)} (a spoken word with no unit of its own)"
        )
    if not spans:
        what = f"word {word}" + (f" in {modality}" if modality else "")
        have = ", ".join(f"{s.index}:{s.text}({s.modality})" for s in prompt.spans) or "none"
        raise PatchingError(
            f"{what} is missing from prompt {_describe(prompt)}; its words are: {have}"
        )
    if len(spans) > 1:
        raise PatchingError(
            f"word {word} occurs {len(spans)} times in prompt {prompt.utterance_id!r} "
            f"({', '.join(s.modality for s in spans)}); pass source_modality/target_modality"
        )
    return tuple(spans[0].positions)


def _word_text(prompt: EncodedPrompt, word: int) -> str:
    return prompt.words[word] if 0 <= word < len(prompt.words) else f"#{word}"


def map_words(
    source: EncodedPrompt,
    target: EncodedPrompt,
    words: Iterable[int] | Iterable[tuple[int, int]] | None = None,
    *,
    rule: Rule | str = "last",
    source_modality: str | None = None,
    target_modality: str | None = None,
) -> PositionMap:
    """Map word spans of ``source`` onto word spans of ``target``.

    ``words``: ``None`` maps every word index present in both prompts; ints map word i to word i
    (the same content in the other modality, or a swapped word at the same place); ``(i, j)``
    pairs map source word i to target word j. A word index missing in either prompt is refused.
    ``source_modality``/``target_modality`` pick one span when a prompt holds a word twice.
    """
    _check_rule(rule)
    _check_same_model(source, target)
    if words is None:
        src_idx = {s.index for s in source.spans}
        pairs = [(i, i) for i in sorted(src_idx & {s.index for s in target.spans})]
        if not pairs:
            raise PatchingError(
                f"prompts {source.utterance_id!r} and {target.utterance_id!r} share no word index"
            )
    else:
        pairs = []
        for w in words:
            if isinstance(w, tuple):
                pairs.append((int(w[0]), int(w[1])))
            else:
                pairs.append((int(w), int(w)))
    groups = []
    for i, j in pairs:
        si = word_span(source, i, source_modality)
        tj = word_span(target, j, target_modality)
        a, b = _word_text(source, i), _word_text(target, j)
        label = a if (a == b and i == j) else f"{a}@{i}->{b}@{j}"
        groups.append(MapGroup(label, si, tj))
    return _new_map(source, target, groups, rule)


def map_positions(
    source: EncodedPrompt,
    target: EncodedPrompt,
    groups: Iterable[tuple[Sequence[int], Sequence[int]]],
    *,
    rule: Rule | str = "each",
    labels: Sequence[str] | None = None,
) -> PositionMap:
    """A map from explicit ``(source positions, target positions)`` groups."""
    gs = [(tuple(int(p) for p in s), tuple(int(p) for p in t)) for s, t in groups]
    names = list(labels) if labels is not None else [f"{s[-1]}->{t[-1]}" for s, t in gs]
    if len(names) != len(gs):
        raise PatchingError(f"{len(names)} labels for {len(gs)} map groups")
    return _new_map(
        source, target, [MapGroup(n, s, t) for n, (s, t) in zip(names, gs, strict=True)], rule
    )


def map_all(source: EncodedPrompt, target: EncodedPrompt) -> PositionMap:
    """Every position to the same position (rule ``"each"``); prompts must have equal length.

    This is the map ``transformer_lens.patching`` implies; one group per position.
    """
    if len(source) != len(target):
        raise PatchingError(
            f"map_all needs prompts of equal length: {_describe(source)} vs {_describe(target)}"
        )
    return map_positions(
        source,
        target,
        [((p,), (p,)) for p in range(len(target))],
        rule="each",
        labels=[f"{p}" for p in range(len(target))],
    )


# ---------------------------------------------------------------------------------------------
# Prompt / model consistency
# ---------------------------------------------------------------------------------------------


def check_prompt(model: SpeechLM, prompt: EncodedPrompt, role: str = "prompt") -> None:
    """Refuse a prompt that was not encoded for ``model``: every token must be in the model's
    vocabulary and fit its position kind (speech positions hold this model's unit ids, text
    positions text ids, marker positions marker ids)."""
    lay = model.layout
    ids = prompt.tokens.to(torch.long).cpu()
    where = f"{role} {prompt.utterance_id!r} (encoded for {prompt.family!r})"
    if ids.ndim != 1:
        raise PatchingError(f"{where}: tokens must be 1-D, got shape {tuple(ids.shape)}")
    n_vocab = int(model.bridge.cfg.d_vocab)
    out = ((ids < 0) | (ids >= n_vocab)).nonzero()
    if len(out):
        p = int(out[0])
        raise PatchingError(
            f"{where}: token id {int(ids[p])} at position {p} is outside the vocabulary of "
            f"{model.path} ({n_vocab} ids); the prompt comes from a different model"
        )
    markers = set(lay.marker_ids.values())
    prosody = set(lay.prosody_ids.tolist())
    is_unit = lay.is_unit(ids)
    is_text = lay.is_text(ids)
    for p, kind in enumerate(prompt.kind):
        t = int(ids[p])
        ok = {
            SPEECH: bool(is_unit[p]),
            TEXT: bool(is_text[p]),
            MARKER: t in markers,
            PROSODY: t in prosody,
        }.get(kind, True)
        if not ok:
            raise PatchingError(
                f"{where}: position {p} is {kind} but holds token id {t}, which is not a {kind} "
                f"id of {model.path} ({model.spec.name}); the prompt comes from a different model"
            )
    if kind_bos := [p for p, k in enumerate(prompt.kind) if k == BOS and p != 0]:
        raise PatchingError(f"{where}: BOS at position {kind_bos[0]}, expected only at 0")
