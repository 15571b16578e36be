"""Tiny random checkpoints in each family's exact on-disk format (for tests, examples, demos).

Each builder writes what the real release writes: file names (``pytorch_model.bin`` vs sharded
safetensors + index), config keys, the real unit / marker token strings and ids, and the real
vocabulary size (the text part of a small tokenizer is padded with filler pieces so the ids
match the released checkpoints). Weights are random; norms and biases are randomised too so that
numerical checks exercise them.
"""

from speech_lens.testing.families import FAMILIES, build_family, random_utterances
from speech_lens.testing.words import WORDS

__all__ = ["FAMILIES", "WORDS", "build_family", "random_utterances"]
