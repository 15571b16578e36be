"""The streaming logit lens: every layer's residual read out through the model's own unembedding.

``logit_lens`` reads positions; ``word_lens`` also max-pools the lens logits over each spoken
word's unit positions (the paper's per-word readout) and ranks every candidate text token of the
word and of the next word, so any matching rule can be scored afterwards (``metrics.py``).
Both run a single ``run_with_hooks`` forward pass whose hooks reduce as they go (``hooks.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from speech_lens._tl import HookFn
from speech_lens.batching import PADDING_SIDES, padded_inputs
from speech_lens.data.encoded import SPEECH, EncodedPrompt, WordTarget
from speech_lens.data.word_targets import word_targets
from speech_lens.lens.hooks import LensComplete, batch_lens_hooks
from speech_lens.lens.readout import HiddenTransform, LensBuffer, Readout
from speech_lens.lens.results import LensResult, WordLensResult
from speech_lens.options import DEFAULT_ZERO_UNIT_WORDS, ZERO_UNIT_WORDS


def _as_sequence(tokens: Tensor | Sequence[int], what: str = "tokens") -> Int[Tensor, " seq"]:
    t = torch.as_tensor(tokens, dtype=torch.long)
    if t.dim() == 2:
        if t.shape[0] != 1:
            raise ValueError(
                f"logit_lens reads one sequence at a time; got a batch of {t.shape[0]} "
                "(use logit_lens_batch for several)"
            )
        t = t[0]
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(
            f"{what} must be a non-empty 1-D sequence of ids, got shape {tuple(t.shape)}"
        )
    return t


def _targets(targets: Tensor | str | None, tokens: Tensor) -> Tensor | None:
    if targets is None:
        return None
    if isinstance(targets, str):
        if targets != "next":
            raise ValueError(f"targets={targets!r}: pass id tensor [pos] / [pos, n] or 'next'")
        t = torch.full_like(tokens, -1)
        t[:-1] = tokens[1:]
        return t.unsqueeze(1)
    t = torch.as_tensor(targets, dtype=torch.long)
    if t.dim() == 1:
        t = t.unsqueeze(1)
    if t.dim() != 2 or t.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"targets must have shape [seq] or [seq, n] with seq={tokens.shape[0]}, "
            f"got {tuple(t.shape)}"
        )
    return t


def _layers(layers: Sequence[int] | None, n_layers: int) -> tuple[int, ...]:
    """Lens rows to compute, sorted; negative values count from the output row (-1)."""
    n_rows = n_layers + 1
    if layers is None:
        return tuple(range(n_rows))
    raw = [int(i) for i in layers]
    rows = sorted({i + n_rows if i < 0 else i for i in raw})
    if not rows or rows[0] < 0 or rows[-1] >= n_rows:
        raise ValueError(f"layers {raw}: lens rows are 0..{n_layers} (0 = embeddings)")
    return tuple(rows)


def _per_sequence(value: Any, n: int, what: str) -> list[Any]:
    """``None`` / ``"next"`` for every sequence, or one entry per sequence."""
    if value is None or isinstance(value, str):
        return [value] * n
    items = list(value)
    if len(items) != n:
        raise ValueError(f"{what}: {len(items)} entries for {n} sequences (one per sequence)")
    return items


def _run_batch(
    model: Any,
    seqs: Sequence[Tensor],
    buffers: Sequence[LensBuffer],
    lens: HiddenTransform | None,
    fwd_hooks: Sequence[tuple[Any, HookFn]],
    padding_side: str,
    stop_early: bool = True,
) -> None:
    """One forward pass over the padded batch; the lens hooks fill one buffer per sequence."""
    model.require_eval()
    readout = Readout.of(model)
    # a batch of one (or of equal lengths) gets no mask: a plain forward pass (bit-equal logits)
    batch, tokens, kwargs = padded_inputs(model, seqs, padding_side)
    hooks = batch_lens_hooks(buffers, batch.offsets, readout, lens, stop_early=stop_early)
    # LensComplete: every requested row is filled and later blocks are not needed
    with torch.no_grad(), contextlib.suppress(LensComplete):
        # the user's hooks go first so that ours read what they wrote
        model.bridge.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, *hooks], **kwargs)
    for b in buffers:
        if not bool(b.filled.all()):
            missing = [b.layers[i] for i in (~b.filled).nonzero().squeeze(-1).tolist()]
            raise RuntimeError(
                f"lens rows {missing} never fired (did a hook stop the forward early?)"
            )


def logit_lens_batch(
    model: Any,
    sequences: Sequence[Tensor | Sequence[int]],
    *,
    k: int = 10,
    targets: Sequence[Tensor | None] | str | None = None,
    lens: HiddenTransform | None = None,
    positions: Sequence[Tensor | Sequence[int] | None] | None = None,
    layers: Sequence[int] | None = None,
    chunk_size: int | None = None,
    padding_side: str = "right",
    fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
    stop_early: bool = True,
) -> list[LensResult]:
    """:func:`logit_lens` on several sequences of any lengths in one padded forward pass.

    Each result equals the sequence's own ``logit_lens`` run up to float summation order (the
    padded matmuls sum in another order: about 1e-7 in fp32). ``targets``: ``"next"``, or one
    ``[seq]`` / ``[seq, n]`` id tensor (or None) per sequence; ``positions``: one position list
    (or None = all) per sequence. ``layers``: the lens rows to compute (0 = embeddings,
    ``n_layers`` or -1 = output); hooks go only there, and with ``stop_early`` and no output
    row the forward pass stops at the last row asked for (a user hook on a later layer then
    does not fire). ``padding_side``: "right" or "left" (attention mask and position ids follow).
    Position chunks (``chunk_size``) run over the batch's positions laid end to end.
    """
    seqs = [_as_sequence(s, f"sequence {i}") for i, s in enumerate(sequences)]
    if not seqs:
        raise ValueError("logit_lens_batch: no sequences")
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding side {padding_side!r}: one of {PADDING_SIDES}")
    kk = _check_k(k, model)
    rows = _layers(layers, model.n_layers)
    tgs = [
        _targets(t, s)
        for t, s in zip(_per_sequence(targets, len(seqs), "targets"), seqs, strict=True)
    ]
    poss = [
        _positions(p, s)
        for p, s in zip(_per_sequence(positions, len(seqs), "positions"), seqs, strict=True)
    ]
    buffers = [
        LensBuffer(
            n_rows=len(rows),
            positions=p,
            k=kk,
            targets=None if t is None else t[p],
            chunk_size=chunk_size,
            layers=rows,
        )
        for p, t in zip(poss, tgs, strict=True)
    ]
    _run_batch(model, seqs, buffers, lens, fwd_hooks, padding_side, stop_early)
    return [
        LensResult.from_buffer(
            b, s, None if t is None else t[b.positions], None, _lens_name(lens), model.n_layers
        )
        for b, s, t in zip(buffers, seqs, tgs, strict=True)
    ]


def logit_lens(
    model: Any,
    tokens: Tensor | Sequence[int],
    *,
    k: int = 10,
    targets: Tensor | str | None = None,
    lens: HiddenTransform | None = None,
    positions: Tensor | Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    chunk_size: int | None = None,
    fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
    stop_early: bool = True,
) -> LensResult:
    """Logit lens (or, with ``lens=``, a tuned lens) over every layer of ``model`` on ``tokens``.

    ``targets``: ids ``[seq]`` or ``[seq, n]`` whose rank and log-prob are measured at every
    position (-1: none), or ``"next"`` for the next input token. ``positions``: the positions to
    read (default all). ``layers``: the lens rows to compute (default all; see
    :func:`logit_lens_batch`). ``chunk_size``: positions unembedded at once (default: about 16M
    logits). ``fwd_hooks``: the caller's own hooks, run in the same forward pass before ours;
    hooks already attached with ``model.bridge.hooks()`` compose too.
    """
    seq = _as_sequence(tokens)
    tg: Sequence[Tensor | None] | str | None
    tg = targets if targets is None or isinstance(targets, str) else [targets]
    return logit_lens_batch(
        model,
        [seq],
        k=k,
        targets=tg,
        lens=lens,
        positions=None if positions is None else [positions],
        layers=layers,
        chunk_size=chunk_size,
        fwd_hooks=fwd_hooks,
        stop_early=stop_early,
    )[0]


WORD_POSITIONS = ("all", "speech")


def _word_units(prompt: EncodedPrompt, zero_unit_words: str) -> tuple[list[Any], list[int]]:
    """``(span, unit positions)`` of each spoken word that has units, and the indices of those
    that have none (refused under ``zero_unit_words="error"``)."""
    pooled: list[Any] = []
    without: list[int] = []
    for s in prompt.speech_spans():
        units = [p for p in s.positions if prompt.kind[p] == SPEECH]
        if units:
            pooled.append((s, units))
            continue
        if zero_unit_words == "error":
            raise ValueError(
                f"utterance {prompt.utterance_id}: spoken word {s.index} ({s.text!r}) has no "
                f"unit position (no unit's reference time falls inside the word; prompt "
                f"position {s.start}); --zero-unit-words skip or miss scores such words"
            )
        without.append(s.index)
    return pooled, without


def _word_buffer(
    model: Any,
    prompt: EncodedPrompt,
    targets: Sequence[WordTarget] | None,
    k: int,
    rows: tuple[int, ...],
    positions: str,
    chunk_size: int | None,
    zero_unit_words: str = DEFAULT_ZERO_UNIT_WORDS,
) -> tuple[LensBuffer, tuple[Any, ...]]:
    if targets is None:
        targets = word_targets(model, prompt.words)
    targets = list(targets)
    if len(targets) != len(prompt.words):
        raise ValueError(
            f"utterance {prompt.utterance_id}: {len(targets)} word targets for "
            f"{len(prompt.words)} words"
        )
    seq = _as_sequence(prompt.tokens, f"utterance {prompt.utterance_id}: tokens")
    pooled, without = _word_units(prompt, zero_unit_words)
    cur = [targets[s.index] for s, _ in pooled]
    nxt = [targets[s.index + 1] if s.index + 1 < len(targets) else None for s, _ in pooled]
    cand_ids: list[int] = []
    cand_word: list[int] = []
    for j, (c, n) in enumerate(zip(cur, nxt, strict=True)):
        ids = {*c.spaced, *c.bare} | (set() if n is None else {*n.spaced, *n.bare})
        cand_ids.extend(sorted(ids))
        cand_word.extend([j] * len(ids))
    if positions == "all":
        pos = torch.arange(seq.shape[0])
    else:
        # the unit positions: all that word pooling and the per-utterance record read (a prompt
        # with no speech reads none)
        pos = prompt.positions_of(SPEECH).to(torch.long)
    buffer = LensBuffer(
        n_rows=len(rows),
        positions=pos,
        k=k,
        word_positions=[torch.tensor(u, dtype=torch.long) for _, u in pooled],
        cand_ids=torch.tensor(cand_ids, dtype=torch.long),
        cand_word=torch.tensor(cand_word, dtype=torch.long),
        chunk_size=chunk_size,
        layers=rows,
    )
    meta = (
        tuple(s.index for s, _ in pooled),
        tuple(s.text for s, _ in pooled),
        tuple(cur),
        tuple(nxt),
        tuple(without),
        len(targets),
    )
    return buffer, meta


def word_lens_batch(
    model: Any,
    prompts: Sequence[EncodedPrompt],
    targets: Sequence[Sequence[WordTarget] | None] | None = None,
    *,
    k: int = 10,
    lens: HiddenTransform | None = None,
    layers: Sequence[int] | None = None,
    positions: str = "all",
    chunk_size: int | None = None,
    padding_side: str = "right",
    fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
    stop_early: bool = True,
    zero_unit_words: str = DEFAULT_ZERO_UNIT_WORDS,
) -> list[LensResult]:
    """:func:`word_lens` on several prompts of any lengths in one padded forward pass.

    ``targets``: one list of ``WordTarget`` per prompt (None: ``prompts.word_targets``).
    ``positions``: ``"all"``, or ``"speech"`` to unembed only the unit positions (what word
    pooling and :func:`speech_lens.metrics.utterance_record` read; the per-position arrays then
    cover those positions only). ``layers``, ``padding_side``, ``stop_early``: as in
    :func:`logit_lens_batch`; ``zero_unit_words``: as in :func:`word_lens`.
    """
    if not prompts:
        raise ValueError("word_lens_batch: no prompts")
    if positions not in WORD_POSITIONS:
        raise ValueError(f"positions={positions!r}: one of {WORD_POSITIONS}")
    if zero_unit_words not in ZERO_UNIT_WORDS:
        raise ValueError(f"zero_unit_words={zero_unit_words!r}: one of {ZERO_UNIT_WORDS}")
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding side {padding_side!r}: one of {PADDING_SIDES}")
    kk = _check_k(k, model)
    rows = _layers(layers, model.n_layers)
    tg = _per_sequence(targets, len(prompts), "targets")
    made = [
        _word_buffer(model, p, t, kk, rows, positions, chunk_size, zero_unit_words)
        for p, t in zip(prompts, tg, strict=True)
    ]
    buffers = [b for b, _ in made]
    seqs = [_as_sequence(p.tokens) for p in prompts]
    _run_batch(model, seqs, buffers, lens, fwd_hooks, padding_side, stop_early)
    out = []
    for (b, meta), seq in zip(made, seqs, strict=True):
        words = WordLensResult.from_buffer(b, *meta)
        out.append(LensResult.from_buffer(b, seq, None, words, _lens_name(lens), model.n_layers))
    return out


def word_lens(
    model: Any,
    prompt: EncodedPrompt,
    targets: Sequence[WordTarget] | None = None,
    *,
    k: int = 10,
    lens: HiddenTransform | None = None,
    layers: Sequence[int] | None = None,
    positions: str = "all",
    chunk_size: int | None = None,
    fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
    stop_early: bool = True,
    zero_unit_words: str = DEFAULT_ZERO_UNIT_WORDS,
) -> LensResult:
    """``logit_lens`` over the positions of ``prompt`` plus the pooled readout of its spoken words.

    ``targets`` holds one ``WordTarget`` per utterance word (``prompt.words``); by default they
    come from ``prompts.word_targets``. Each speech word's lens logits are max-pooled over its
    unit (SPEECH) positions; the pooled vector is ranked over text ids. Every sub-token of the
    word and of the next word (spaced and bare forms) is ranked, so every matching rule in
    ``metrics.MATCH_RULES`` can be scored from the result. ``positions="speech"`` reads only
    the unit positions (enough for the word readout and the per-utterance record).

    A word's units are those :func:`~speech_lens.prompts.encode_prompt` assigned to it: under
    the default ``unit_rule="end"`` the units whose end time ``t`` lies in ``(start, end]``
    (within ``data.TIME_EPS``). So a unit ending exactly on a word's end belongs to that word,
    and a unit ending exactly on a word's start belongs to the word before. A short word may
    get no unit at all (no unit ends inside it): ``zero_unit_words="skip"`` (default) or
    ``"miss"`` leave it out of the pooled readout and list it in ``words.no_unit_words`` (the
    metrics then leave it out of Recall@k, or count it as a miss); ``"error"`` raises,
    naming the utterance and the word.
    """
    return word_lens_batch(
        model,
        [prompt],
        None if targets is None else [targets],
        k=k,
        lens=lens,
        layers=layers,
        positions=positions,
        chunk_size=chunk_size,
        fwd_hooks=fwd_hooks,
        stop_early=stop_early,
        zero_unit_words=zero_unit_words,
    )[0]


def _check_k(k: int, model: Any) -> int:
    n_text = int(model.layout.text_mask.sum())
    if not 1 <= k <= n_text:
        raise ValueError(f"k={k} must be between 1 and the {n_text} text ids of the model")
    return int(k)


def _positions(positions: Tensor | Sequence[int] | None, seq: Tensor) -> Tensor:
    n = int(seq.shape[0])
    if positions is None:
        return torch.arange(n)
    p = torch.as_tensor(positions, dtype=torch.long).flatten()
    p = torch.where(p < 0, p + n, p)
    if p.numel() == 0 or int(p.min()) < 0 or int(p.max()) >= n:
        raise ValueError(f"positions {positions} out of range for a sequence of {n} tokens")
    return torch.unique(p)  # sorted


def _lens_name(lens: HiddenTransform | None) -> str:
    return "logit" if lens is None else type(lens).__name__
