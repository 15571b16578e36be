"""Lenses: read every layer's residual stream out in the model's own vocabulary."""

from speech_lens.lens.logit import logit_lens, logit_lens_batch, word_lens, word_lens_batch
from speech_lens.lens.results import LensResult, WordLensResult
from speech_lens.lens.rows import layer_stride

__all__ = [
    "LensResult",
    "WordLensResult",
    "layer_stride",
    "logit_lens",
    "logit_lens_batch",
    "word_lens",
    "word_lens_batch",
]
