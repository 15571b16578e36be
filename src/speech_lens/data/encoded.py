"""Encoded prompts: token ids with a position table of words, modalities and segments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

# Position kinds in a PositionTable
BOS, TEXT, SPEECH, PROSODY, MARKER = "bos", "text", "speech", "prosody", "marker"


@dataclass(frozen=True)
class WordSpan:
    """Where word ``index`` of the utterance sits in the prompt: ``positions[start:end]``."""

    index: int
    text: str
    modality: str  # TEXT or SPEECH
    start: int
    end: int

    @property
    def positions(self) -> range:
        return range(self.start, self.end)


@dataclass(frozen=True, eq=False)
class EncodedPrompt:
    """Token ids of one prompt and, for every position, what it is.

    ``kind[p]`` is one of BOS/TEXT/SPEECH/PROSODY/MARKER; ``word_index[p]`` the utterance word the
    position belongs to (-1 for none: BOS, markers, units in silence); ``unit_index[p]`` the
    deduplicated unit index for SPEECH positions (-1 otherwise).
    """

    tokens: Int[Tensor, " pos"]
    kind: tuple[str, ...]
    word_index: Int[Tensor, " pos"]
    unit_index: Int[Tensor, " pos"]
    words: tuple[str, ...]
    spans: tuple[WordSpan, ...]
    utterance_id: str
    family: str
    # added by the encoders (defaults keep hand-built prompts valid)
    text: str = ""  # the prompt as a string, before BOS (what the tokenizer was given)
    token_strings: tuple[str, ...] = ()
    mode: str = ""  # "speech", "text" or "interleaved"
    modalities: tuple[str, ...] = ()  # TEXT or SPEECH per word
    unit_rule: str = "end"

    def __post_init__(self) -> None:
        n = int(self.tokens.shape[0])
        if not (len(self.kind) == n == self.word_index.shape[0] == self.unit_index.shape[0]):
            raise ValueError(
                f"prompt {self.utterance_id}: position table lengths differ from {n} tokens"
            )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def speech_spans(self) -> tuple[WordSpan, ...]:
        return tuple(s for s in self.spans if s.modality == SPEECH)

    def positions_of(self, kind: str) -> Int[Tensor, " n"]:
        return torch.tensor([p for p, k in enumerate(self.kind) if k == kind], dtype=torch.long)

    def table(self) -> list[dict[str, object]]:
        """One row per position: pos, id, token, kind, word index, word, unit index."""
        rows = []
        for p in range(len(self)):
            w = int(self.word_index[p])
            rows.append(
                {
                    "pos": p,
                    "id": int(self.tokens[p]),
                    "token": self.token_strings[p] if self.token_strings else "",
                    "kind": self.kind[p],
                    "word_index": w,
                    "word": self.words[w] if w >= 0 else "",
                    "unit_index": int(self.unit_index[p]),
                }
            )
        return rows

    def format_table(self) -> str:
        """The position table as aligned text (for printing)."""
        head = f"{'pos':>4} {'id':>7}  {'token':<14} {'kind':<8} {'word':<16} unit"
        lines = [head]
        for r in self.table():
            w = f"{r['word_index']}:{r['word']}" if int(str(r["word_index"])) >= 0 else "-"
            u = str(r["unit_index"]) if int(str(r["unit_index"])) >= 0 else "-"
            lines.append(
                f"{r['pos']:>4} {r['id']:>7}  {str(r['token'])[:14]:<14} {r['kind']:<8} {w[:16]:<16} {u}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class WordTarget:
    """A word's text tokens in the model's tokenizer, in both leading-space forms.

    ``spaced`` is the tokenization of ``" " + word`` (the form inside a sentence: ``▁cat`` /
    ``Ġcat``), ``bare`` of ``word`` alone, each as :func:`word_piece_ids` gives it (a lone
    leading word-boundary piece dropped). Each is a tuple of ids (several for multi-token words).
    """

    word: str
    spaced: tuple[int, ...]
    bare: tuple[int, ...]


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------

Mode = Literal["speech", "text", "interleaved"]
SpanSampler = Literal["poisson", "spiritlm", "alternate"]


class PromptError(ValueError):
    """A prompt that cannot be built as asked (message names the utterance and the field)."""


def plain_token_ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])
