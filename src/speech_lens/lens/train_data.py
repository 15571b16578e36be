"""Tuned-lens training data: encoded sequences, padding, held-out split, fingerprint."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from speech_lens.data.prompts import encode_prompt
from speech_lens.data.utterance import Utterance
from speech_lens.models.load import SpeechLM

DATA_MODES = ("text", "speech", "interleaved", "mix")


class TrainError(ValueError):
    """Bad training input or a checkpoint that does not belong to this run (names the file)."""


def pad_right(
    seqs: Sequence[Tensor], pad_id: int = 0
) -> tuple[Int[Tensor, "b pos"], Bool[Tensor, "b pos"]]:
    """Right padding is harmless under causal attention: real positions never see the pads."""
    n = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
        mask[i, : len(s)] = True
    return tokens, mask


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def encode_training_data(
    model: SpeechLM, utterances: Iterable[Utterance], mode: str, *, seed: int = 0
) -> tuple[list[Tensor], dict[str, int]]:
    """Token sequences of ``utterances`` in the family's prompt format, and how many per mode.

    ``mode`` is text, speech or interleaved (``prompts.encode_prompt``), or ``mix``: each
    utterance in one of the three, drawn with a seeded RNG. Which one the translators see
    changes what they reveal at speech positions, so the choice is recorded in the lens config.
    """

    if mode not in DATA_MODES:
        raise TrainError(f"data mode {mode!r} is not one of {DATA_MODES}")
    rng = random.Random(seed)
    seqs: list[Tensor] = []
    counts = dict.fromkeys(DATA_MODES[:3], 0)
    for j, utt in enumerate(utterances):
        m = rng.choice(DATA_MODES[:3]) if mode == "mix" else mode
        prompt = encode_prompt(model, utt, mode=m, seed=seed * 1_000_003 + j)  # type: ignore[arg-type]
        seqs.append(prompt.tokens)
        counts[m] += 1
    if not seqs:
        raise TrainError("no utterances to encode")
    return seqs, {k: v for k, v in counts.items() if v}


def split_heldout(
    utterances: Iterable[Utterance], fraction: float
) -> tuple[list[Utterance], list[Utterance]]:
    """(train, held-out) by a hash of the utterance id: stable across runs and manifest order."""
    if not 0.0 <= fraction < 1.0:
        raise TrainError(f"held-out fraction must be in [0, 1), got {fraction}")
    train: list[Utterance] = []
    held: list[Utterance] = []
    for u in utterances:
        x = int.from_bytes(hashlib.sha256(u.id.encode()).digest()[:8], "big") / 2**64
        (held if x < fraction else train).append(u)
    return train, held


def prepare_sequences(sequences: Sequence[Tensor], max_seq_len: int) -> list[Tensor]:
    """1-D id tensors split into windows of at most ``max_seq_len`` (tuned-lens chunks too)."""
    out: list[Tensor] = []
    for i, s in enumerate(sequences):
        s = torch.as_tensor(s, dtype=torch.long)
        if s.ndim != 1:
            raise TrainError(
                f"training sequence {i} has shape {tuple(s.shape)}; expected 1-D token ids"
            )
        out.extend(w for w in s.split(max_seq_len) if len(w) > 0)
    if not out:
        raise TrainError("no training tokens: every sequence is empty")
    return out


def data_fingerprint(sequences: Sequence[Tensor]) -> str:
    h = hashlib.sha256()
    for s in sequences:
        h.update(len(s).to_bytes(8, "little"))
        h.update(s.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


def held_out_table(logit_kl: Tensor, tuned_kl: Tensor, layers: Sequence[int] | None = None) -> str:
    """Plain-text table of per-layer held-out KL, logit lens vs tuned lens (``layers``: the
    true row of each value when ``lens_kl`` read a selection)."""
    rows = range(len(logit_kl)) if layers is None else layers
    lines = [f"{'layer':>5}  {'logit lens':>11}  {'tuned lens':>11}  {'ratio':>6}"]
    for i, a, b in zip(rows, logit_kl.tolist(), tuned_kl.tolist(), strict=True):
        ratio = f"{b / a:6.3f}" if a > 0 and not math.isnan(a) else "     -"
        lines.append(f"{i:>5}  {a:11.4f}  {b:11.4f}  {ratio}")
    return "\n".join(lines)
