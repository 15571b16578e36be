"""speech_lens: mechanistic interpretability of interleaved speech-text LMs on TransformerLens."""

from speech_lens.adapters import (
    AdapterError,
    AdapterSpec,
    SpeechLM,
    available_families,
    detect_family,
    load_model,
)
from speech_lens.prompts import EncodedPrompt, WordSpan, WordTarget
from speech_lens.vocab import UnitBlock, VocabError, VocabLayout

__all__ = [
    "AdapterError",
    "AdapterSpec",
    "EncodedPrompt",
    "SpeechLM",
    "UnitBlock",
    "VocabError",
    "VocabLayout",
    "WordSpan",
    "WordTarget",
    "available_families",
    "detect_family",
    "load_model",
]
__version__ = "0.1.0"
