"""Tiny random checkpoints in each family's exact on-disk format (for tests, examples, demos)."""

from speech_lens.testing.families import FAMILIES, build_family, random_utterances
from speech_lens.testing.words import WORDS

__all__ = ["FAMILIES", "WORDS", "build_family", "random_utterances"]
