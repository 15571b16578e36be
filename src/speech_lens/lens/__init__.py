"""Lenses: read every layer's residual stream out in the model's own vocabulary."""

from speech_lens.lens.logit import (
    LensResult,
    WordLensResult,
    logit_lens,
    logit_lens_batch,
    word_lens,
    word_lens_batch,
)

__all__ = [
    "LensResult",
    "WordLensResult",
    "logit_lens",
    "logit_lens_batch",
    "word_lens",
    "word_lens_batch",
]
