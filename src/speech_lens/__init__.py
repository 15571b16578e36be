"""speech_lens: mechanistic interpretability of interleaved speech-text LMs on TransformerLens."""

from speech_lens.audio.tokenizers.lookup import get_speech_tokenizer
from speech_lens.audio.tokenizers.registry import (
    FrameUnits,
    SpeechTokenizer,
    register_speech_tokenizer,
)
from speech_lens.data.encoded import EncodedPrompt, PromptError, WordSpan, WordTarget
from speech_lens.data.manifest import LoadReport, read_manifest, write_manifest
from speech_lens.data.prompts import encode_prompt
from speech_lens.data.scramble import scramble_words
from speech_lens.data.utterance import DataError, UnitStream, Utterance, Word
from speech_lens.data.word_targets import word_piece_ids, word_targets
from speech_lens.guards import NumericError, finite_guard_hooks
from speech_lens.lens import (
    LensResult,
    WordLensResult,
    layer_stride,
    logit_lens,
    logit_lens_batch,
    word_lens,
    word_lens_batch,
)
from speech_lens.lens.kl import lens_kl
from speech_lens.lens.train import train_tuned_lens
from speech_lens.lens.tuned import LensError, TunedLens, TunedLensConfig, lens_from_spec
from speech_lens.models.checkpoint import detect_family
from speech_lens.models.delta import DeltaError
from speech_lens.models.load import SpeechLM, load_model
from speech_lens.models.rebuild import rebuild_unit_lm
from speech_lens.models.spec import AdapterError, AdapterSpec, available_families
from speech_lens.patching.hooks import patching_hooks, run_patched
from speech_lens.patching.positions import PatchingError, PositionMap, map_words
from speech_lens.patching.result import PatchResult
from speech_lens.patching.sweep import patch_sweep
from speech_lens.provenance import collect_provenance
from speech_lens.runs.compare import CompareError, compare_runs
from speech_lens.vocab import UnitBlock, VocabError, VocabLayout

__all__ = [
    "AdapterError",
    "AdapterSpec",
    "CompareError",
    "DataError",
    "DeltaError",
    "EncodedPrompt",
    "FrameUnits",
    "LensError",
    "LensResult",
    "LoadReport",
    "NumericError",
    "PatchResult",
    "PatchingError",
    "PositionMap",
    "PromptError",
    "SpeechLM",
    "SpeechTokenizer",
    "TunedLens",
    "TunedLensConfig",
    "UnitBlock",
    "UnitStream",
    "Utterance",
    "VocabError",
    "VocabLayout",
    "Word",
    "WordLensResult",
    "WordSpan",
    "WordTarget",
    "available_families",
    "collect_provenance",
    "compare_runs",
    "detect_family",
    "encode_prompt",
    "finite_guard_hooks",
    "get_speech_tokenizer",
    "layer_stride",
    "lens_from_spec",
    "lens_kl",
    "load_model",
    "logit_lens",
    "logit_lens_batch",
    "map_words",
    "patch_sweep",
    "patching_hooks",
    "read_manifest",
    "rebuild_unit_lm",
    "register_speech_tokenizer",
    "run_patched",
    "scramble_words",
    "train_tuned_lens",
    "word_lens",
    "word_lens_batch",
    "word_piece_ids",
    "word_targets",
    "write_manifest",
]
__version__ = "0.1.0"
