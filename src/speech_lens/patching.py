"""Causal activation patching between speech and text positions, as composable hook factories.

Three layers, each usable on its own:

1. **Position maps** (:class:`PositionMap`): which positions of a *source* prompt feed which
   positions of a *target* prompt, built from the prompts' position tables
   (:func:`map_words`, :func:`map_positions`, :func:`map_all`). A word's span may have several
   positions in one run (speech units, sub-tokens) and another number in the other run, so every
   map carries a stated rule:

   - ``"last"``: the last source position of the span -> the last target position of the span
     (last unit / last sub-token: where a causal LM has read the whole word);
   - ``"mean"``: the mean over the source span -> every position of the target span;
   - ``"each"``: source span position k -> target span position k; spans must have equal length.

2. **Hooks** (:func:`patch_hook`, :func:`patching_hooks`): ``fn(act, *, hook)`` functions that
   write cached source activations into a target run at the mapped positions. They go through
   ``bridge.run_with_hooks`` / ``bridge.hooks()``, so they compose with any other hook (e.g. a
   lens reading later layers of the patched run).

3. **Experiments** (:func:`run_patched`, :func:`patch_sweep`): cache the source run only at the
   hook points needed, patch per layer (or layer set) x position (x head) and reduce each patched
   forward to a scalar metric (:func:`next_token_logprob`, :func:`logit_diff`,
   :func:`kl_to_clean`, or any ``logits -> scalar`` callable). Results are a frozen
   :class:`PatchResult` that records the component, layers, rule and metric.

4. **Batching** (``batch_size=N | "auto"``): a sweep's cells run N at a time as one forward of
   the target repeated N times, every row patched by its own cell (one hook per hook point
   writes each row's values at that row's positions) and read on its own. Across utterance
   pairs (:func:`cross_modal`, :func:`word_swap`, :func:`run_experiment`), N pairs' source and
   target runs go through one padded forward (``padding_side``; position maps stay in unpadded
   positions: cached rows are cut back to their own columns and patches are shifted by a row's
   pad offset), and the patched rows of those pairs share padded forwards too. Values equal the
   one-by-one runs (fp32: up to summation order; tests/test_batched_patching.py).

Where both can express an experiment (same-length prompts, identity map, ``"each"`` rule) the
numbers equal ``transformer_lens.patching`` exactly (tests/test_patching.py).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from speech_lens._tl import get_act_name
from speech_lens.batching import PaddedBatch, padded_inputs, plan_batches
from speech_lens.prompts import (
    BOS,
    MARKER,
    PROSODY,
    SPEECH,
    TEXT,
    EncodedPrompt,
    word_piece_ids,
)

if TYPE_CHECKING:
    from speech_lens.adapters import SpeechLM
    from speech_lens.data import Utterance

Rule = Literal["last", "mean", "each"]
RULES: tuple[str, ...] = ("last", "mean", "each")
# component -> TransformerLens activation name (legacy alias; the bridge answers to it)
COMPONENTS: dict[str, str] = {
    "resid_pre": "resid_pre",
    "resid_mid": "resid_mid",
    "resid_post": "resid_post",
    "attn_out": "attn_out",
    "mlp_out": "mlp_out",
    "z": "z",  # per-head attention output before W_O: [batch, pos, head, d_head]
}
HookFn = Callable[..., Tensor]
T = TypeVar("T")
Metric = Callable[[Float[Tensor, "batch pos vocab"]], Tensor]
# an unpatched run: logits [1, pos, vocab] and the activations cached by hook name
SourceRun = tuple[Tensor, dict[str, Tensor]]


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


def _span(prompt: EncodedPrompt, word: int, modality: str | None) -> tuple[int, ...]:
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
        si = _span(source, i, source_modality)
        tj = _span(target, j, target_modality)
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


def _batch(tokens: Tensor, device: torch.device) -> Int[Tensor, "1 pos"]:
    return tokens.to(device=device, dtype=torch.long).unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------


def hook_name(component: str, layer: int) -> str:
    """TransformerLens name of ``component`` at ``layer`` (the legacy alias the bridge answers to)."""
    if component not in COMPONENTS:
        raise PatchingError(f"unknown component {component!r}; one of {tuple(COMPONENTS)}")
    return str(get_act_name(COMPONENTS[component], layer))


def _gather(
    source_act: Float[Tensor, "batch src_pos *rest"], pmap: PositionMap
) -> tuple[Int[Tensor, " n"], Float[Tensor, "batch n *rest"]]:
    """Target indices and the source values written there (mean over each pair's sources)."""
    if source_act.shape[1] != pmap.source_len:
        raise PatchingError(
            f"source activation has {source_act.shape[1]} positions but the map's source prompt "
            f"{pmap.source_id!r} has {pmap.source_len}"
        )
    rows = []
    for _, srcs in pmap.pairs:
        if len(srcs) == 1:  # plain indexing: bit-identical to transformer_lens.patching
            rows.append(source_act[:, srcs[0]])
        else:
            rows.append(source_act[:, list(srcs)].mean(dim=1))
    tgt = torch.tensor(pmap.target_positions, dtype=torch.long, device=source_act.device)
    return tgt, torch.stack(rows, dim=1)


@dataclass(frozen=True, eq=False)
class _Patch:
    """One hook point's patch of one target run: ``values`` go to ``target`` positions
    (unpadded; :func:`_put` adds a padded row's offset), restricted to ``heads`` if given."""

    name: str
    target: Int[Tensor, " n"]
    values: Float[Tensor, "1 n *rest"]
    heads: Int[Tensor, " h"] | None
    target_len: int
    target_id: str


def _make_patch(
    name: str,
    source_act: Float[Tensor, "batch src_pos *rest"],
    pmap: PositionMap,
    heads: Sequence[int] | None = None,
) -> _Patch:
    tgt, values = _gather(source_act.detach(), pmap)
    head_idx = None
    if heads is not None:
        if source_act.ndim != 4:
            raise PatchingError(
                f"heads= needs a per-head activation [batch, pos, head, d_head]; got shape "
                f"{tuple(source_act.shape)} (use component='z')"
            )
        n_heads = int(source_act.shape[2])
        bad = [h for h in heads if not 0 <= int(h) < n_heads]
        if bad:
            raise PatchingError(f"head {bad[0]} out of range 0..{n_heads - 1}")
        head_idx = torch.tensor([int(h) for h in heads], dtype=torch.long, device=tgt.device)
        values = values[:, :, head_idx]
    return _Patch(name, tgt, values, head_idx, pmap.target_len, pmap.target_id)


def _put(out: Tensor, patch: _Patch, offset: int = 0) -> None:
    """Write ``patch`` into every batch row of ``out`` in place (a one-row view writes one
    row), at its positions shifted by ``offset`` (a left-padded row's pad columns)."""
    tgt = (patch.target + offset).to(out.device)
    v = patch.values.to(device=out.device, dtype=out.dtype)
    if patch.heads is None:
        out[:, tgt] = v
    else:
        out[:, tgt.unsqueeze(1), patch.heads.to(out.device).unsqueeze(0)] = v


def patch_hook(
    source_act: Float[Tensor, "batch src_pos *rest"],
    pmap: PositionMap,
    *,
    heads: Sequence[int] | None = None,
) -> HookFn:
    """A hook ``fn(act, *, hook)`` writing ``source_act`` (one hook point's activation from the
    source run) into the target run at the map's positions; ``heads`` restricts a per-head
    activation (``attn.hook_z``, ``[batch, pos, head, d_head]``) to those heads."""
    return _patch_fn(_make_patch("", source_act, pmap, heads))


def _patch_fn(patch: _Patch) -> HookFn:
    def hook(act: Tensor, *, hook: Any) -> Tensor:
        if act.shape[1] != patch.target_len:
            raise PatchingError(
                f"{hook.name}: target run has {act.shape[1]} positions but the map's target "
                f"prompt {patch.target_id!r} has {patch.target_len}"
            )
        out = act.clone()  # never write into a tensor autograd or another hook may hold
        _put(out, patch)
        return out

    return hook


def _rows_hook(entries: Sequence[tuple[int, _Patch]], batch: PaddedBatch) -> HookFn:
    """One hook for a hook point of a batched forward: row ``b`` gets its own patch at its own
    (offset) positions; rows without an entry pass through unchanged."""

    def hook(act: Tensor, *, hook: Any) -> Tensor:
        out = act.clone()
        for b, patch in entries:
            _put(out[b : b + 1], patch, batch.offsets[b])
        return out

    return hook


def _check_pair(
    model: SpeechLM, source: EncodedPrompt, target: EncodedPrompt, pmap: PositionMap
) -> None:
    model.require_eval()
    check_prompt(model, source, "source")
    check_prompt(model, target, "target")
    pmap.check(source, target)


def _layer_sets(
    model: SpeechLM, layers: int | Iterable[int | Iterable[int]] | None
) -> list[tuple[int, ...]]:
    n = model.n_layers
    if layers is None:
        entries: list[tuple[int, ...]] = [(i,) for i in range(n)]
    elif isinstance(layers, int):
        entries = [(layers,)]
    else:
        entries = [(int(e),) if isinstance(e, int) else tuple(int(x) for x in e) for e in layers]
    for e in entries:
        if not e:
            raise PatchingError("an empty layer set patches nothing")
        bad = [x for x in e if not 0 <= x < n]
        if bad:
            raise PatchingError(f"layer {bad[0]} out of range 0..{n - 1} for {model.path}")
    return entries


def _unpad(x: Tensor, batch: PaddedBatch, b: int) -> Tensor:
    """Row ``b`` of a batched activation at its real columns, as ``[1, own length, ...]``."""
    if len(batch) == 1:
        return x
    return x[b : b + 1, batch.columns(b)].clone()  # a copy: the batch tensor can be freed


def _cache_bytes_per_token(model: SpeechLM, names: Collection[str]) -> int:
    cfg = model.bridge.cfg
    width = torch.finfo(next(model.bridge.parameters()).dtype).bits // 8
    per_point = max(int(cfg.d_model), int(cfg.n_heads) * int(cfg.d_head))  # resid / z
    return len(names) * per_point * width


def cache_sources(
    model: SpeechLM,
    prompts: Sequence[EncodedPrompt],
    names: Iterable[str],
    *,
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    padding_side: str = "right",
) -> list[SourceRun]:
    """Run every prompt once, caching only ``names``: ``batch_size`` prompts (an int, or
    ``"auto"`` from the memory budget) per padded forward. Each prompt's logits and cache come
    back un-padded, ``[1, its length, ...]``, as from its own run (fp32: up to summation
    order)."""
    wanted = sorted(set(names))
    seqs = [p.tokens for p in prompts]
    batches = plan_batches(
        model,
        [len(x) for x in seqs],
        batch_size,
        memory_budget_gb=memory_budget_gb,
        extra_bytes_per_token=_cache_bytes_per_token(model, wanted),
    )
    runs: dict[int, SourceRun] = {}
    for idx in batches:
        batch, tokens, kwargs = padded_inputs(model, [seqs[i] for i in idx], padding_side)
        with torch.no_grad():
            logits, cache = model.bridge.run_with_cache(tokens, names_filter=wanted, **kwargs)
        for b, i in enumerate(idx):
            runs[i] = (_unpad(logits, batch, b), {n: _unpad(cache[n], batch, b) for n in wanted})
    return [runs[i] for i in range(len(seqs))]


def cache_source(model: SpeechLM, source: EncodedPrompt, names: Iterable[str]) -> SourceRun:
    """Run ``source`` once, caching only ``names`` (``names_filter``); returns logits and cache."""
    return cache_sources(model, [source], names)[0]


def _row_patches(
    source_cache: Mapping[str, Tensor],
    pmap: PositionMap,
    component: str,
    layers: Iterable[int],
    heads: Sequence[int] | None,
) -> tuple[_Patch, ...]:
    if heads is not None and component != "z":
        raise PatchingError(f"heads= applies to component 'z' only, not {component!r}")
    out = []
    for layer in layers:
        name = hook_name(component, layer)
        if name not in source_cache:
            raise PatchingError(f"source cache has no {name!r}; cache it with cache_source")
        out.append(_make_patch(name, source_cache[name], pmap, heads))
    return tuple(out)


def patching_hooks(
    source_cache: Mapping[str, Tensor],
    pmap: PositionMap,
    *,
    component: str = "resid_pre",
    layers: Iterable[int],
    heads: Sequence[int] | None = None,
) -> list[tuple[str, HookFn]]:
    """``fwd_hooks`` for ``bridge.run_with_hooks`` / ``bridge.hooks()``: patch ``component`` at
    every layer in ``layers`` (jointly) from ``source_cache`` into the target at ``pmap``."""
    patches = _row_patches(source_cache, pmap, component, layers, heads)
    return [(p.name, _patch_fn(p)) for p in patches]


def run_patched(
    model: SpeechLM,
    source: EncodedPrompt,
    target: EncodedPrompt,
    pmap: PositionMap,
    *,
    component: str = "resid_pre",
    layers: int | Iterable[int] = 0,
    heads: Sequence[int] | None = None,
    fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
) -> Float[Tensor, "1 pos vocab"]:
    """Logits of ``target`` with ``component`` at ``layers`` (patched jointly) taken from
    ``source`` at ``pmap``'s positions; ``fwd_hooks`` run alongside (e.g. lens readers)."""
    _check_pair(model, source, target, pmap)
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    _layer_sets(model, [tuple(layer_list)])
    _, cache = cache_source(model, source, [hook_name(component, i) for i in layer_list])
    hooks = patching_hooks(cache, pmap, component=component, layers=layer_list, heads=heads)
    with torch.no_grad():
        return model.bridge.run_with_hooks(
            _batch(target.tokens, model.device), fwd_hooks=[*hooks, *fwd_hooks]
        )


# ---------------------------------------------------------------------------------------------
# Metrics: logits [batch, pos, vocab] -> scalar (averaged over the batch)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NextTokenLogProb:
    """log P(any of ``token_ids``) at ``position`` (full softmax over the whole vocabulary)."""

    position: int
    token_ids: tuple[int, ...]
    name: str = "logprob"

    def __call__(self, logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        lp = logits[:, self.position].float().log_softmax(-1)
        return lp[:, list(self.token_ids)].logsumexp(-1).mean()


@dataclass(frozen=True)
class LogitDiff:
    """logit(good) - logit(bad) at ``position`` (max over each id set: a word may have two
    first sub-tokens, with and without the leading-space marker)."""

    position: int
    good: tuple[int, ...]
    bad: tuple[int, ...]
    name: str = "logit_diff"

    def __call__(self, logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        row = logits[:, self.position].float()
        return (row[:, list(self.good)].amax(-1) - row[:, list(self.bad)].amax(-1)).mean()


@dataclass(frozen=True, eq=False)
class KLToClean:
    """KL(P_clean || P_patched) between the clean run's next-token distribution (one row of
    its logits) and the patched run's at ``position``."""

    clean_logprobs: Float[Tensor, " vocab"]
    position: int
    name: str = "kl_to_clean"

    def __call__(self, logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        lp = logits[:, self.position].float().log_softmax(-1)
        ref = self.clean_logprobs.to(lp.device)
        return (ref.exp() * (ref - lp)).sum(-1).mean()


def next_token_logprob(position: int, token_ids: int | Iterable[int]) -> NextTokenLogProb:
    ids = (token_ids,) if isinstance(token_ids, int) else tuple(int(i) for i in token_ids)
    return NextTokenLogProb(position, ids, name=f"logprob@{position}")


def logit_diff(position: int, good: int | Iterable[int], bad: int | Iterable[int]) -> LogitDiff:
    g = (good,) if isinstance(good, int) else tuple(int(i) for i in good)
    b = (bad,) if isinstance(bad, int) else tuple(int(i) for i in bad)
    return LogitDiff(position, g, b, name=f"logit_diff@{position}")


def kl_to_clean(
    clean_logits: Float[Tensor, "... pos vocab"], clean_position: int, position: int
) -> KLToClean:
    """KL to row ``clean_position`` of ``clean_logits`` (e.g. the unpatched source run), at the
    patched run's ``position``."""
    row = clean_logits.reshape(-1, *clean_logits.shape[-2:])[0, clean_position]
    return KLToClean(row.detach().float().log_softmax(-1), position, name=f"kl_to_clean@{position}")


def word_token_ids(model: SpeechLM, word: str) -> tuple[int, ...]:
    """First text sub-token of ``word`` with and without the leading-space marker (the DESIGN §4
    default matching rule), deduplicated; refuses words the tokenizer cannot write as text."""
    out: list[int] = []
    for form in (" " + word, word):
        # the lens's word targets' rule: a lone "▁" / "Ġ" before the word's pieces is skipped
        ids = word_piece_ids(model.tokenizer, form)
        if ids and bool(model.layout.is_text(ids[0])) and ids[0] not in out:
            out.append(int(ids[0]))
    if not out:
        raise PatchingError(f"word {word!r} has no text token in the tokenizer of {model.path}")
    return tuple(out)


def word_end(prompt: EncodedPrompt, word: int, modality: str | None = None) -> int:
    """Last position of word ``word`` in ``prompt``: where the model predicts what follows it."""
    return _span(prompt, word, modality)[-1]


def next_word_logprob(
    model: SpeechLM, prompt: EncodedPrompt, word: int, next_word: str | None = None
) -> NextTokenLogProb:
    """log P(next word's first text sub-token) at the last position of word ``word``.

    ``next_word`` defaults to the prompt's word ``word + 1``."""
    if next_word is None:
        if word + 1 >= len(prompt.words):
            raise PatchingError(
                f"word {word} is the last word of {prompt.utterance_id!r}; pass next_word="
            )
        next_word = prompt.words[word + 1]
    pos = word_end(prompt, word)
    m = next_token_logprob(pos, word_token_ids(model, next_word))
    return replace(m, name=f"logprob({next_word!r})@{prompt.words[word]!r}")


def word_logit_diff(
    model: SpeechLM, prompt: EncodedPrompt, word: int, good: str, bad: str
) -> LogitDiff:
    """logit(good) - logit(bad) (text tokens) at the last position of word ``word``."""
    m = logit_diff(word_end(prompt, word), word_token_ids(model, good), word_token_ids(model, bad))
    return replace(m, name=f"logit({good!r})-logit({bad!r})@{prompt.words[word]!r}")


@dataclass(frozen=True, eq=False)
class LensLogProb:
    """log P(any of ``token_ids``) at ``position`` as the logit lens reads ``hook_point``
    (final norm + unembedding of that residual; full softmax). Metrics with a ``hook_point``
    get that activation instead of the logits: :func:`patch_sweep` captures it in the same
    patched forward, after the patch hooks, so the reading sees the patch."""

    hook_point: str
    position: int
    token_ids: tuple[int, ...]
    readout: Callable[[Tensor], Tensor]
    name: str = "lens_logprob"

    def __call__(self, resid: Float[Tensor, "batch pos d_model"]) -> Tensor:
        logits = self.readout(resid[:, self.position : self.position + 1])[:, 0]
        lp = logits.float().log_softmax(-1)
        return lp[:, list(self.token_ids)].logsumexp(-1).mean()


def lens_next_word_logprob(
    model: SpeechLM, prompt: EncodedPrompt, word: int, layer: int, next_word: str | None = None
) -> LensLogProb:
    """:func:`next_word_logprob` read by the logit lens at row ``layer`` (``resid_pre`` of that
    block; ``layer == n_layers`` is the model output), as in ``speech_lens.logit_lens``."""
    point = _lens_point(model, layer)
    m = next_word_logprob(model, prompt, word, next_word)
    b = model.bridge
    return LensLogProb(
        point,
        m.position,
        m.token_ids,
        readout=lambda x: b.unembed(b.ln_final(x)),
        name=f"lens{layer}:{m.name}",
    )


@dataclass(frozen=True, eq=False)
class _Row:
    """One patched (or plain) run to measure: ``tokens`` (1-D, unpadded) with ``patches``
    written in, reduced to a scalar by ``metric``."""

    tokens: Int[Tensor, " pos"]
    metric: Metric
    patches: tuple[_Patch, ...] = ()


def _known(metric: Metric, run: SourceRun | None) -> float | None:
    """``metric`` on a run already made (its logits, or the activation it reads, if cached)."""
    if run is None:
        return None
    point = getattr(metric, "hook_point", None)
    with torch.no_grad():  # a lens readout applies the model's own weights
        if point is None:
            return float(metric(run[0]))
        return float(metric(run[1][point])) if point in run[1] else None


def _forward_rows(
    model: SpeechLM,
    rows: Sequence[_Row],
    padding_side: str,
    fwd_hooks: Sequence[tuple[Any, HookFn]],
) -> list[Tensor]:
    """One padded forward of ``rows``, each patched by its own patches only; every metric reads
    its own row at its real columns (logits, or the activation at its ``hook_point``)."""
    batch, tokens, kwargs = padded_inputs(model, [r.tokens for r in rows], padding_side)
    by_point: dict[str, list[tuple[int, _Patch]]] = {}
    for b, r in enumerate(rows):
        for patch in r.patches:
            by_point.setdefault(patch.name, []).append((b, patch))
    seen: dict[str, Tensor] = {}

    def reader(point: str) -> Callable[..., None]:
        def grab(act: Tensor, *, hook: Any) -> None:
            seen[point] = act.detach()  # keyed by the metric's name: hook.name is canonical (P6)

        return grab

    # readers go last: at a patched hook point they see the patch
    points = sorted({p for r in rows if (p := getattr(r.metric, "hook_point", None))})
    hooks = [(n, _rows_hook(e, batch)) for n, e in by_point.items()]
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(
            tokens, fwd_hooks=[*hooks, *fwd_hooks, *[(p, reader(p)) for p in points]], **kwargs
        )
        out = []
        for b, r in enumerate(rows):
            point = getattr(r.metric, "hook_point", None)
            x = _unpad(logits if point is None else seen[point], batch, b)
            out.append(torch.as_tensor(r.metric(x)).detach().float().cpu())
    return out


def _run_rows(
    model: SpeechLM,
    rows: Sequence[_Row],
    *,
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    padding_side: str = "right",
    fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
    progress: bool = False,
    desc: str = "patch",
) -> list[Tensor]:
    """Metric values of ``rows`` in order, ``batch_size`` rows (an int, or ``"auto"``) per
    forward; rows of similar length go together."""
    batches = plan_batches(
        model, [len(r.tokens) for r in rows], batch_size, memory_budget_gb=memory_budget_gb
    )
    values: dict[int, Tensor] = {}
    with tqdm(total=len(rows), disable=not progress, desc=desc, leave=False) as bar:
        for idx in batches:
            got = _forward_rows(model, [rows[i] for i in idx], padding_side, fwd_hooks)
            values.update(zip(idx, got, strict=True))
            bar.update(len(idx))
    return [values[i] for i in range(len(rows))]


def metric_name(metric: Metric) -> str:
    return str(getattr(metric, "name", getattr(metric, "__name__", type(metric).__name__)))


# ---------------------------------------------------------------------------------------------
# Sweeps and results
# ---------------------------------------------------------------------------------------------


def _layer_label(layers: tuple[int, ...]) -> str:
    if len(layers) > 1 and layers == tuple(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return "+".join(str(x) for x in layers)


@dataclass(frozen=True, eq=False)
class PatchResult:
    """Metric values of a patching sweep, with everything needed to read them.

    ``values`` has one axis per name in ``axes`` (``"layer"``, then ``"position"`` unless the
    whole map was patched at once, then ``"head"`` for head sweeps). ``baseline`` is the metric
    on the unpatched target run, ``source_value`` on the unpatched source run when the metric
    can be read there (equal lengths), else None.
    """

    values: Float[Tensor, "..."]
    axes: tuple[str, ...]
    layers: tuple[tuple[int, ...], ...]
    positions: tuple[str, ...]
    heads: tuple[int, ...] | None
    component: str
    rule: str
    metric: str
    baseline: float
    source_value: float | None
    source_id: str
    target_id: str
    position_mode: str
    head_mode: str = "all"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def layer_labels(self) -> tuple[str, ...]:
        return tuple(_layer_label(e) for e in self.layers)

    def effect(self) -> Float[Tensor, "..."]:
        """Values minus the unpatched target metric."""
        return self.values - self.baseline

    def to_table(self) -> list[dict[str, Any]]:
        """One row per cell: layer, position, head, value, and the run's settings."""
        rows = []
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in self.values.shape]).reshape(
            -1, self.values.ndim
        ):
            cell = dict(zip(self.axes, idx.tolist(), strict=True))
            row: dict[str, Any] = {"layer": self.layer_labels[cell["layer"]]}
            row["position"] = (
                self.positions[cell["position"]] if "position" in cell else self.position_mode
            )
            if "head" in cell:
                row["head"] = (self.heads or ())[cell["head"]]
            elif self.heads is not None:
                row["head"] = "+".join(str(h) for h in self.heads)
            row["value"] = float(self.values[tuple(idx.tolist())])
            row.update(
                component=self.component,
                rule=self.rule,
                metric=self.metric,
                baseline=self.baseline,
                source_value=self.source_value,
                source=self.source_id,
                target=self.target_id,
                **self.extra,
            )
            rows.append(row)
        return rows

    def to_csv(self, path: str | Path) -> Path:
        return write_csv(self.to_table(), path)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows atomically (temp file + os.replace); columns are the union, in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; a table is for reading
    os.replace(tmp, path)
    return path


@dataclass(frozen=True, eq=False)
class _Plan:
    """A sweep laid out as rows: its cells in ``values`` order, then the unpatched target run
    if its metric could not be read from a run already made."""

    template: PatchResult
    rows: tuple[_Row, ...]
    baseline_row: bool

    def finish(self, values: Sequence[Tensor]) -> PatchResult:
        shape = self.template.values.shape
        n = self.template.values.numel()
        baseline = float(values[n]) if self.baseline_row else self.template.baseline
        return replace(
            self.template, values=torch.stack(list(values[:n])).reshape(shape), baseline=baseline
        )


def _run_plans(
    model: SpeechLM,
    plans: Sequence[_Plan],
    *,
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    padding_side: str = "right",
    fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
    progress: bool = False,
    desc: str = "patch",
) -> list[PatchResult]:
    """Run the rows of all ``plans`` together (rows of different plans share forwards)."""
    rows = [r for p in plans for r in p.rows]
    values = _run_rows(
        model,
        rows,
        batch_size=batch_size,
        memory_budget_gb=memory_budget_gb,
        padding_side=padding_side,
        fwd_hooks=fwd_hooks,
        progress=progress,
        desc=desc,
    )
    parts = _split(values, [len(p.rows) for p in plans])
    return [p.finish(v) for p, v in zip(plans, parts, strict=True)]


def _split(items: Sequence[T], sizes: Iterable[int]) -> list[Sequence[T]]:
    """``items`` cut into consecutive runs of ``sizes``."""
    out, k = [], 0
    for n in sizes:
        out.append(items[k : k + n])
        k += n
    return out


def _head_cells(
    model: SpeechLM, component: str, heads: str | Sequence[int] | None
) -> tuple[list[tuple[int, ...] | None], tuple[int, ...] | None]:
    """Head sets to patch one at a time, and the head labels of the result."""
    if heads is not None and component != "z":
        raise PatchingError(f"heads= applies to component 'z' only, not {component!r}")
    if heads == "each":
        n_heads = int(model.bridge.cfg.n_heads)
        return [(h,) for h in range(n_heads)], tuple(range(n_heads))
    if heads is None:
        return [None], None
    if isinstance(heads, str):
        raise PatchingError(f"heads must be None, 'each' or a list of heads, not {heads!r}")
    labels = tuple(int(h) for h in heads)
    return [labels], labels


def _source_names(
    model: SpeechLM, component: str, layers: Sequence[tuple[int, ...]], metric: Metric | None
) -> set[str]:
    """Hook points a source run must cache: the patched ones and the one ``metric`` reads."""
    names = {hook_name(component, x) for e in layers for x in e}
    point = getattr(metric, "hook_point", None)
    return names | ({point} if point else set())


def _plan_sweep(
    model: SpeechLM,
    source: EncodedPrompt,
    target: EncodedPrompt,
    pmap: PositionMap,
    metric: Metric,
    *,
    component: str,
    layers: int | Iterable[int | Iterable[int]] | None,
    positions: str,
    heads: str | Sequence[int] | None,
    source_metric: Metric | None,
    source_run: SourceRun,
    target_run: SourceRun | None,
    extra: Mapping[str, str] | None = None,
) -> _Plan:
    """Check a sweep, read what runs already made can tell, and lay out its rows."""
    _check_pair(model, source, target, pmap)
    layer_sets = _layer_sets(model, layers)
    head_cells, head_labels = _head_cells(model, component, heads)
    cells = pmap.subsets(positions)
    if source_metric is None and len(source) == len(target):
        source_metric = metric
    missing = sorted(_source_names(model, component, layer_sets, None) - set(source_run[1]))
    if missing:
        raise PatchingError(f"source_run has no cached {missing[0]!r}")
    source_value = None
    if source_metric is not None:
        source_value = _known(source_metric, source_run)
        if source_value is None:  # the source run did not cache the point the metric reads
            source_value = float(_run_rows(model, [_Row(source.tokens, source_metric)])[0])
    rows = [
        _Row(target.tokens, metric, _row_patches(source_run[1], sub, component, layer_set, hs))
        for layer_set in layer_sets
        for _, sub in cells
        for hs in head_cells
    ]
    baseline = _known(metric, target_run)
    if baseline is None:
        rows.append(_Row(target.tokens, metric))
    shape = [len(layer_sets)] + ([len(cells)] if positions != "all" else [])
    shape += [len(head_cells)] if heads == "each" else []
    axes = ("layer",) + (("position",) if positions != "all" else ())
    axes += ("head",) if heads == "each" else ()
    template = PatchResult(
        values=torch.zeros(shape),
        axes=axes,
        layers=tuple(layer_sets),
        positions=tuple(label for label, _ in cells),
        heads=head_labels,
        component=component,
        rule=pmap.rule,
        metric=metric_name(metric),
        baseline=float("nan") if baseline is None else baseline,
        source_value=source_value,
        source_id=pmap.source_id,
        target_id=pmap.target_id,
        position_mode=positions,
        head_mode="each" if heads == "each" else ("all" if heads is None else "set"),
        extra=dict(extra or {}),
    )
    return _Plan(template, tuple(rows), baseline is None)


def _rows_budget(
    memory_budget_gb: float | None, held: Iterable[tuple[Tensor, Mapping[str, Tensor]]]
) -> float | None:
    """What a stated budget leaves for patched forwards while the cached runs are held (free
    memory, when measured, already counts them)."""
    if memory_budget_gb is None:
        return None
    nbytes = sum(t.numel() * t.element_size() for lg, c in held for t in (lg, *c.values()))
    return memory_budget_gb - nbytes / 2**30


def patch_sweep(
    model: SpeechLM,
    source: EncodedPrompt,
    target: EncodedPrompt,
    pmap: PositionMap,
    metric: Metric,
    *,
    component: str = "resid_pre",
    layers: int | Iterable[int | Iterable[int]] | None = None,
    positions: str = "group",
    heads: str | Sequence[int] | None = None,
    fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
    source_metric: Metric | None = None,
    source_run: tuple[Tensor, Mapping[str, Tensor]] | None = None,
    target_logits: Tensor | None = None,
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    progress: bool = False,
) -> PatchResult:
    """Patch ``component`` from ``source`` into ``target`` once per cell and record ``metric``.

    ``layers``: None (every layer, one at a time), or entries that are a layer or a set of layers
    patched together. ``positions``: ``"group"`` (each map group, e.g. word, alone), ``"pair"``
    (each patched target position alone), or ``"all"`` (the whole map at once). ``heads`` (for
    component ``"z"``): None (all heads), ``"each"`` (one head at a time: a head axis), or a
    list patched together. ``fwd_hooks`` are added to every patched forward (which holds
    ``batch_size`` rows). ``source_metric`` reads the same quantity on the unpatched source run
    (e.g. at the source's own position of the word); by default ``metric`` itself when both
    prompts have the same length. ``source_run`` (``cache_source`` output covering the needed
    hook points) and ``target_logits`` (the unpatched target run) skip recomputing them across
    many sweeps.

    ``batch_size``: cells measured per forward, an int or ``"auto"`` (from ``memory_budget_gb``,
    default the free memory): the target repeated, each row patched with its own cell's hooks
    and read on its own, so values equal the one-cell-at-a-time sweep (fp32: up to summation
    order, <= 1e-6).
    """
    _check_pair(model, source, target, pmap)
    layer_sets = _layer_sets(model, layers)
    if source_run is None:
        # cache the point a lens source metric reads too: its source value needs no extra run
        reads = source_metric if source_metric is not None or len(source) != len(target) else metric
        source_run = cache_source(model, source, _source_names(model, component, layer_sets, reads))
    plan = _plan_sweep(
        model,
        source,
        target,
        pmap,
        metric,
        component=component,
        layers=layer_sets,
        positions=positions,
        heads=heads,
        source_metric=source_metric,
        source_run=(source_run[0], dict(source_run[1])),
        target_run=None if target_logits is None else (target_logits, {}),
    )
    (result,) = _run_plans(
        model,
        [plan],
        batch_size=batch_size,
        memory_budget_gb=_rows_budget(memory_budget_gb, [source_run]),
        fwd_hooks=fwd_hooks,
        progress=progress,
        desc=f"patch {component}",
    )
    return result


# ---------------------------------------------------------------------------------------------
# Worked experiments (used by examples/, the CLI and the demo report)
# ---------------------------------------------------------------------------------------------


def _spoken_word_ok(prompt: EncodedPrompt, i: int) -> bool:
    return any(s.index == i and s.end > s.start for s in prompt.spans)


def _run_pairs(
    model: SpeechLM,
    pairs: Sequence[tuple[EncodedPrompt, EncodedPrompt]],
    make_plans: Callable[[int, SourceRun, SourceRun], list[_Plan]],
    *,
    source_names: Collection[str],
    target_names: Collection[str],
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    padding_side: str = "right",
    progress: bool = False,
    desc: str = "patch",
) -> list[list[PatchResult]]:
    """Sweeps over many (source, target) prompt pairs, ``batch_size`` pairs at a time: the
    group's source and target runs go through padded forwards (caching ``source_names`` /
    ``target_names``), then ``make_plans(pair index, source run, target run)`` lays out its
    sweeps and the rows of all the group's sweeps share padded forwards, ``batch_size`` rows
    each. Results per pair, in input order."""
    for source, target in pairs:
        check_prompt(model, source, "source")
        check_prompt(model, target, "target")
    kw: dict[str, Any] = {
        "batch_size": batch_size,
        "memory_budget_gb": memory_budget_gb,
        "padding_side": padding_side,
    }
    # a group's cached runs stay in memory while its patched rows run
    groups = plan_batches(
        model,
        [max(len(s), len(t)) for s, t in pairs],
        batch_size,
        memory_budget_gb=memory_budget_gb,
        extra_bytes_per_token=_cache_bytes_per_token(model, [*source_names, *target_names]),
    )
    out: dict[int, Sequence[PatchResult]] = {}
    with tqdm(total=len(pairs), desc=desc, disable=not progress) as bar:
        for idx in groups:
            src_runs = cache_sources(model, [pairs[i][0] for i in idx], source_names, **kw)
            tgt_runs = cache_sources(model, [pairs[i][1] for i in idx], target_names, **kw)
            plans = [make_plans(i, s, t) for i, s, t in zip(idx, src_runs, tgt_runs, strict=True)]
            kw_rows = {
                **kw,
                "memory_budget_gb": _rows_budget(memory_budget_gb, src_runs + tgt_runs),
            }
            done = _run_plans(model, [p for ps in plans for p in ps], **kw_rows)
            out.update(zip(idx, _split(done, [len(ps) for ps in plans]), strict=True))
            bar.update(len(idx))
    return [list(out[i]) for i in range(len(pairs))]


def _lens_point(model: SpeechLM, layer: int) -> str:
    """Hook point the logit lens reads at row ``layer`` (``n_layers``: the last block's output)."""
    n = model.n_layers
    if not 0 <= layer <= n:
        raise PatchingError(f"lens layer {layer} out of range 0..{n}")
    return hook_name("resid_pre", layer) if layer < n else hook_name("resid_post", n - 1)


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
    (res,) = _cross_modal_many(
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


def _cross_modal_many(
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
    from speech_lens.prompts import encode_prompt

    if direction not in ("text-to-speech", "speech-to-text"):
        raise PatchingError(
            f"direction must be text-to-speech or speech-to-text, not {direction!r}"
        )
    layer_sets = _layer_sets(model, layers)  # a list: an iterator would be used up by one word
    chosen = None if words is None else [int(w) for w in words]
    pairs = []
    for u in utterances:
        text = encode_prompt(model, u, mode="text")
        speech = encode_prompt(model, u, mode="speech")
        pairs.append((text, speech) if direction == "text-to-speech" else (speech, text))
    lens = set() if read_layer is None else {_lens_point(model, read_layer)}

    def make_plans(i: int, source_run: SourceRun, target_run: SourceRun) -> list[_Plan]:
        utt, (source, target) = utterances[i], pairs[i]
        n = len(utt.words)
        plans = []
        for w in list(range(n - 1)) if chosen is None else chosen:
            if not 0 <= w < n - 1:
                raise PatchingError(
                    f"utterance {utt.id!r}: word {w} has no next word (words 0..{n - 2})"
                )
            if not (_spoken_word_ok(source, w) and _spoken_word_ok(target, w)):
                if chosen is None:
                    continue  # a spoken word with no unit of its own: nothing to patch
                _span(source, w, None), _span(target, w, None)  # raises with the reason
            extra = {
                "experiment": direction,
                "utterance": utt.id,
                "word_index": str(w),
                "word": utt.words[w].text,
                "next_word": utt.words[w + 1].text,
            }
            plans.append(
                _plan_sweep(
                    model,
                    source,
                    target,
                    map_words(source, target, [w], rule=rule),
                    _next_word_metric(model, target, w, read_layer),
                    component=component,
                    layers=layer_sets,
                    positions="all",
                    heads=None,
                    source_metric=_next_word_metric(model, source, w, read_layer),
                    source_run=source_run,
                    target_run=target_run,
                    extra=extra,
                )
            )
        return plans

    return _run_pairs(
        model,
        pairs,
        make_plans,
        source_names=_source_names(model, component, layer_sets, None) | lens,
        target_names=lens,
        batch_size=batch_size,
        memory_budget_gb=memory_budget_gb,
        padding_side=padding_side,
        progress=progress,
        desc=direction,
    )


def _next_word_metric(
    model: SpeechLM, prompt: EncodedPrompt, word: int, read_layer: int | None
) -> Metric:
    if read_layer is None:
        return next_word_logprob(model, prompt, word)
    return lens_next_word_logprob(model, prompt, word, read_layer)


def splice_word(utterance: Utterance, word: int, donor: Utterance, donor_word: int) -> Utterance:
    """``utterance`` with the audio units of word ``word`` replaced by those of ``donor``'s word
    ``donor_word`` (frame level; later word times shift; prosody streams are dropped because
    they cannot be spliced consistently)."""
    from speech_lens.data import Utterance as Utt
    from speech_lens.data import Word

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
    return Utt(
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
    (res,) = _word_swap_many(
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


def _word_swap_many(
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
    from speech_lens.prompts import encode_prompt

    for mode in modes:
        if mode not in ("denoise", "noise"):
            raise PatchingError(f"mode must be 'denoise' or 'noise', not {mode!r}")
    for clean, corrupt in items:
        if clean.words[word].text == corrupt.words[word].text:
            raise PatchingError(
                f"word {word} is {clean.words[word].text!r} in both utterances: nothing was swapped"
            )
    layer_sets = _layer_sets(model, layers)
    pairs = [
        (encode_prompt(model, c, mode="speech"), encode_prompt(model, x, mode="speech"))
        for c, x in items
    ]

    def make_plans(i: int, clean_run: SourceRun, corrupt_run: SourceRun) -> list[_Plan]:
        (clean, corrupt), (pc, px) = items[i], pairs[i]
        good, bad = clean.words[word].text, corrupt.words[word].text
        common = [
            w
            for w in range(min(len(clean.words), len(corrupt.words)))
            if _spoken_word_ok(pc, w) and _spoken_word_ok(px, w)
        ]
        if word not in common:
            _span(pc, word, None), _span(px, word, None)  # raises with the reason
        plans = []
        for mode in modes:
            source, target, source_run, target_run = (
                (pc, px, clean_run, corrupt_run)
                if mode == "denoise"
                else (px, pc, corrupt_run, clean_run)
            )
            extra = {
                "experiment": f"word-swap-{mode}",
                "utterance": clean.id,
                "word_index": str(word),
                "word": good,
                "swap": bad,
            }
            plans.append(
                _plan_sweep(
                    model,
                    source,
                    target,
                    map_words(source, target, common, rule=rule),
                    word_logit_diff(model, target, word, good, bad),
                    component=component,
                    layers=layer_sets,
                    positions="group",
                    heads=None,
                    source_metric=word_logit_diff(model, source, word, good, bad),
                    source_run=source_run,
                    target_run=target_run,
                    extra=extra,
                )
            )
        return plans

    names = _source_names(model, component, layer_sets, None)
    return _run_pairs(
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


def mean_curve(results: Sequence[PatchResult]) -> dict[str, Any]:
    """Average layer curves (``positions="all"`` results on the same layers) over words and
    utterances: mean patched value per layer, mean unpatched target, mean source value."""
    if not results:
        raise PatchingError("no patching results to average")
    layers = results[0].layers
    if any(r.layers != layers or r.axes != ("layer",) for r in results):
        raise PatchingError("mean_curve needs layer-only results over the same layers")
    vals = torch.stack([r.values for r in results])
    srcs = [r.source_value for r in results if r.source_value is not None]
    return {
        "layers": results[0].layer_labels,
        "mean": vals.mean(0),
        "sem": vals.std(0) / max(1, len(results)) ** 0.5 if len(results) > 1 else vals[0] * 0,
        "baseline": sum(r.baseline for r in results) / len(results),
        "source": sum(srcs) / len(srcs) if srcs else None,
        "n": len(results),
    }


def stack_curves(results: Sequence[PatchResult]) -> PatchResult:
    """Layer curves of several words as one layer x word result of *effects* (value minus each
    word's own unpatched baseline), for :func:`~speech_lens.plots_patching.plot_layer_position`."""
    if not results:
        raise PatchingError("no patching results to stack")
    first = results[0]
    eff = torch.stack([r.values - r.baseline for r in results], dim=1)
    labels = tuple(
        f"{r.extra.get('word_index', i)}:{r.extra.get('word', '')}" for i, r in enumerate(results)
    )
    return replace(
        first,
        values=eff,
        axes=("layer", "position"),
        positions=labels,
        metric=f"Δ {first.metric.split('@')[0]} (per word)",
        baseline=0.0,
        source_value=None,
        position_mode="group",
        extra={k: v for k, v in first.extra.items() if k in ("experiment", "utterance")},
    )


EXPERIMENTS = ("text-to-speech", "speech-to-text", "word-swap")


def _swap_donor(utts: Sequence[Utterance], k: int, word: int) -> tuple[Utterance, int] | None:
    """A word from another utterance with a different text, for swapping into ``utts[k]``."""
    target = utts[k].words[word].text
    for j in [*range(k + 1, len(utts)), *range(k)]:
        ws = utts[j].words
        for i in sorted(range(len(ws)), key=lambda i: abs(i - word)):
            if ws[i].text != target:
                return utts[j], i
    return None


def run_experiment(
    model: SpeechLM,
    utterances: Iterable[Utterance],
    out: str | Path,
    *,
    experiment: str = "text-to-speech",
    component: str = "resid_pre",
    rule: Rule | str = "last",
    layers: int | Iterable[int | Iterable[int]] | None = None,
    word: int = 1,
    read_layer: int | None = None,
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    padding_side: str = "right",
    data: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run one worked experiment over ``utterances`` and write its table and figures to ``out``.

    ``text-to-speech`` / ``speech-to-text``: :func:`cross_modal` for every word; writes
    ``{experiment}.csv``, the mean per-layer curve ``{experiment}_curve.html`` and a layer x
    word heatmap of the first utterance. ``word-swap``: word ``word`` of each utterance is
    swapped for a word of another utterance (:func:`splice_word`) and patched both ways
    (:func:`word_swap`); writes ``word-swap.csv`` and layer x word heatmaps of the first
    utterance, plus the mean per-layer value at the swapped word. Both write
    ``{experiment}.json``: the returned summary with a ``provenance`` key (checkpoint and
    ``data`` digests, versions, settings).

    ``batch_size`` (int or ``"auto"`` from ``memory_budget_gb``, default the free memory):
    utterances per padded forward (``padding_side`` ``"right"`` or ``"left"``) for the source
    and target runs, and patched runs per forward, across the utterances of a group; values
    equal the one-by-one run (fp32: up to summation order).
    """
    from speech_lens.plots_patching import plot_layer_curves, plot_layer_position
    from speech_lens.provenance import collect_provenance, stable
    from speech_lens.report import atomic_write_text

    if experiment not in EXPERIMENTS:
        raise PatchingError(f"experiment must be one of {EXPERIMENTS}, not {experiment!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    utts = list(utterances)
    layers = _layer_sets(model, layers)
    if not utts:
        raise PatchingError("no utterances to patch")
    figures: list[Path] = []
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {
        "experiment": experiment,
        "component": component,
        "rule": rule,
        "utterances": len(utts),
        "readout": "output" if read_layer is None else f"logit lens row {read_layer}",
    }
    batching: dict[str, Any] = {
        "batch_size": batch_size,
        "memory_budget_gb": memory_budget_gb,
        "padding_side": padding_side,
        "progress": progress,
    }
    if experiment != "word-swap":
        per_utt = _cross_modal_many(
            model,
            utts,
            direction=experiment,
            words=None,
            component=component,
            rule=rule,
            layers=layers,
            read_layer=read_layer,
            **batching,
        )
        results = [r for rs in per_utt for r in rs]
        curve = mean_curve(results)
        rows = [row for r in results for row in r.to_table()]
        fig = plot_layer_curves(
            {f"patched ({component}, rule={rule})": curve["mean"]},
            layers=curve["layers"],
            references={"unpatched target": curve["baseline"], "source run": curve["source"]},
            title=f"{experiment}: next-word log-prob at the patched word "
            f"(mean of {curve['n']} words, {len(utts)} utterances)",
            yaxis="log P(next word, text token)"
            + ("" if read_layer is None else f", lens row {read_layer}"),
        )
        figures.append(out / f"{experiment}_curve.html")
        fig.write_html(figures[-1], include_plotlyjs=True)
        first = [r for r in results if r.extra["utterance"] == utts[0].id]
        if first:
            figures.append(out / f"{experiment}_{_safe(utts[0].id)}_heatmap.html")
            plot_layer_position(stack_curves(first)).write_html(figures[-1], include_plotlyjs=True)
        summary.update(
            layers=list(curve["layers"]),
            curve=[round(float(x), 6) for x in curve["mean"]],
            sem=[round(float(x), 6) for x in curve["sem"]],
            baseline=curve["baseline"],
            source=curve["source"],
            words=curve["n"],
        )
    else:
        per_mode: dict[str, list[Tensor]] = {"denoise": [], "noise": []}
        baselines: dict[str, list[float]] = {"denoise": [], "noise": []}
        items, firsts = [], []
        for k, u in enumerate(utts):
            if not 0 <= word < len(u.words):
                continue
            donor = _swap_donor(utts, k, word)
            if donor is None:
                raise PatchingError(f"no donor word to swap into {u.id!r}: need another utterance")
            items.append((u, splice_word(u, word, *donor)))
            firsts.append(k == 0)
        swapped = _word_swap_many(
            model,
            items,
            word,
            modes=("denoise", "noise"),
            component=component,
            rule=rule,
            layers=layers,
            **batching,
        )
        for is_first, (u, _), pair in zip(firsts, items, swapped, strict=True):
            for mode, r in zip(("denoise", "noise"), pair, strict=True):
                rows += r.to_table()
                w = next(i for i, lab in enumerate(r.positions) if "->" in lab)
                per_mode[mode].append(r.values[:, w])
                baselines[mode].append(r.baseline)
                if is_first:
                    figures.append(out / f"word-swap_{mode}_{_safe(u.id)}.html")
                    plot_layer_position(r, title=f"word swap ({mode}): {r.metric}").write_html(
                        figures[-1], include_plotlyjs=True
                    )
                    summary.setdefault("layers", list(r.layer_labels))
        for mode, vals in per_mode.items():
            if vals:
                summary[f"{mode}_curve"] = [round(float(x), 6) for x in torch.stack(vals).mean(0)]
                summary[f"{mode}_baseline"] = sum(baselines[mode]) / len(baselines[mode])
        summary["words"] = len(per_mode["denoise"])
    summary["table"] = str(write_csv(rows, out / f"{experiment}.csv"))
    summary["figures"] = [str(f) for f in figures]
    settings = {
        "experiment": experiment,
        "component": component,
        "rule": rule,
        "layers": [list(e) for e in layers],
        "metric": (
            "logit(clean word) - logit(swapped word), text tokens, at the swapped word's end"
            if experiment == "word-swap"
            else "log P(next word's first text sub-token) at the patched word's end"
        ),
        "readout": summary["readout"],
        "positions": "each word alone" if experiment == "word-swap" else "the word's span",
        "word": word if experiment == "word-swap" else None,
        "utterance_ids": [u.id for u in utts],
        "batch_size": batch_size,
        "padding_side": padding_side,
        "seed": None,  # nothing random: the same inputs give the same numbers
    }
    prov = collect_provenance(model, data=data, lens="logit", settings=settings)
    # no timestamp: a rerun writes a byte-identical file
    summary["provenance"] = stable(prov)
    summary["metadata"] = str(out / f"{experiment}.json")
    atomic_write_text(summary["metadata"], json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


__all__ = [
    "COMPONENTS",
    "EXPERIMENTS",
    "RULES",
    "KLToClean",
    "LensLogProb",
    "LogitDiff",
    "MapGroup",
    "NextTokenLogProb",
    "PatchResult",
    "PatchingError",
    "PositionMap",
    "cache_source",
    "cache_sources",
    "check_prompt",
    "cross_modal",
    "hook_name",
    "kl_to_clean",
    "lens_next_word_logprob",
    "logit_diff",
    "map_all",
    "map_positions",
    "map_words",
    "mean_curve",
    "next_token_logprob",
    "next_word_logprob",
    "patch_hook",
    "patch_sweep",
    "patching_hooks",
    "prompt_digest",
    "run_experiment",
    "run_patched",
    "splice_word",
    "stack_curves",
    "word_end",
    "word_logit_diff",
    "word_swap",
    "word_token_ids",
    "write_csv",
]
