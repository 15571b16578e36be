"""Prompt encoders: utterances -> each family's exact token sequence + a position table.

Interface types are defined here first; the encoders follow (issue 4).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class WordTarget:
    """A word's text tokens in the model's tokenizer, in both leading-space forms.

    ``spaced`` is the tokenization of ``" " + word`` (the form inside a sentence: ``▁cat`` /
    ``Ġcat``), ``bare`` of ``word`` alone. Each is a tuple of ids (several for multi-token words).
    """

    word: str
    spaced: tuple[int, ...]
    bare: tuple[int, ...]
