"""Torch-free constants shared across layers (no heavy imports here)."""

from __future__ import annotations

# Position chunks are sized so one [chunk, vocab] fp32 block stays near this many elements
# (64 MB). Smaller chunks re-read the whole unembedding per chunk: at a 152k vocabulary, 1 << 22
# (27 positions) cost 4.24x a forward pass against 3.15x at 1 << 24 (2-layer Qwen shape, 256 pos).
DEFAULT_CHUNK_ELEMENTS = 1 << 24

# Interleaved prompts: how the spoken words are chosen (data/word_targets.sample_speech_words), and
# each sampler's parameters with their defaults (None: not used by that sampler).
SPAN_SAMPLERS: tuple[str, ...] = ("poisson", "spiritlm", "alternate")
SPAN_DEFAULTS: dict[str, dict[str, float | None]] = {
    "poisson": {"span_mean": 10.0, "speech_fraction": 0.3},
    "spiritlm": {"span_mean": 5.0, "speech_fraction": None},
    "alternate": {"span_mean": 1.0, "speech_fraction": None},
}

# What the lens does with a spoken word that has no unit position (a short word between two unit
# ends): "skip" leaves it out of Recall@k and counts it, "miss" scores it as a miss at every layer
# (and its next-word prediction too), "error" refuses the utterance, naming the word.
ZERO_UNIT_WORDS = ("skip", "miss", "error")
DEFAULT_ZERO_UNIT_WORDS = "skip"
