"""Patching metrics: reduce a patched forward's logits (or a lens readout) to a scalar."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from jaxtyping import Float
from torch import Tensor

from speech_lens.data.encoded import EncodedPrompt
from speech_lens.data.word_targets import word_piece_ids

if TYPE_CHECKING:
    from speech_lens.models.load import SpeechLM
from speech_lens.patching.hooks import hook_name
from speech_lens.patching.positions import PatchingError, word_span

Metric = Callable[[Float[Tensor, "batch pos vocab"]], Tensor]


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
    return word_span(prompt, word, modality)[-1]


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
    point = lens_point(model, layer)
    m = next_word_logprob(model, prompt, word, next_word)
    b = model.bridge
    return LensLogProb(
        point,
        m.position,
        m.token_ids,
        readout=lambda x: b.unembed(b.ln_final(x)),
        name=f"lens{layer}:{m.name}",
    )


def metric_name(metric: Metric) -> str:
    return str(getattr(metric, "name", getattr(metric, "__name__", type(metric).__name__)))


def lens_point(model: SpeechLM, layer: int) -> str:
    """Hook point the logit lens reads at row ``layer`` (``n_layers``: the last block's output)."""
    n = model.n_layers
    if not 0 <= layer <= n:
        raise PatchingError(f"lens layer {layer} out of range 0..{n}")
    return hook_name("resid_pre", layer) if layer < n else hook_name("resid_post", n - 1)
