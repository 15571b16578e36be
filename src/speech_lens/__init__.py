"""speech_lens: mechanistic interpretability of interleaved speech-text LMs on TransformerLens."""

from speech_lens.adapters import (
    AdapterError,
    AdapterSpec,
    SpeechLM,
    available_families,
    detect_family,
    load_model,
)
from speech_lens.compare import CompareError, compare_runs
from speech_lens.data import (
    DataError,
    LoadReport,
    UnitStream,
    Utterance,
    Word,
    read_manifest,
    write_manifest,
)
from speech_lens.guards import NumericError, finite_guard_hooks
from speech_lens.lens import (
    LensResult,
    WordLensResult,
    logit_lens,
    logit_lens_batch,
    word_lens,
    word_lens_batch,
)
from speech_lens.lens.tuned import LensError, TunedLens, TunedLensConfig, lens_from_spec
from speech_lens.patching import (
    PatchingError,
    PatchResult,
    PositionMap,
    map_words,
    patch_sweep,
    patching_hooks,
    run_patched,
)
from speech_lens.prompts import (
    EncodedPrompt,
    PromptError,
    WordSpan,
    WordTarget,
    encode_prompt,
    word_piece_ids,
    word_targets,
)
from speech_lens.provenance import collect_provenance
from speech_lens.speech_tokenizers import (
    FrameUnits,
    SpeechTokenizer,
    get_speech_tokenizer,
    register_speech_tokenizer,
)
from speech_lens.tuned_train import lens_kl, train_tuned_lens
from speech_lens.vocab import UnitBlock, VocabError, VocabLayout

__all__ = [
    "AdapterError",
    "AdapterSpec",
    "CompareError",
    "DataError",
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
    "lens_from_spec",
    "lens_kl",
    "load_model",
    "logit_lens",
    "logit_lens_batch",
    "map_words",
    "patch_sweep",
    "patching_hooks",
    "read_manifest",
    "register_speech_tokenizer",
    "run_patched",
    "train_tuned_lens",
    "word_lens",
    "word_lens_batch",
    "word_piece_ids",
    "word_targets",
    "write_manifest",
]
__version__ = "0.1.0"
