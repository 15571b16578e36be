"""Causal activation patching between speech and text positions, as composable hook factories.

- ``positions``: position maps (which source positions feed which target positions, by a rule:
  ``"last"``, ``"mean"`` or ``"each"``);
- ``hooks``: hooks that write cached source activations into a target run
  (``run_with_hooks``-composable);
- ``metrics``: reduce a patched forward to a scalar;
- ``sweep``: layer x position (x head) sweeps in batched forwards, into a frozen ``PatchResult``;
- ``pairs``, ``cross_modal``, ``word_swap``: experiments over utterance pairs.

Where both can express an experiment (same-length prompts, identity map, ``"each"`` rule) the
numbers equal ``transformer_lens.patching`` exactly (tests/test_patching.py).
"""

from speech_lens.patching.cross_modal import cross_modal
from speech_lens.patching.hooks import (
    COMPONENTS,
    cache_source,
    cache_sources,
    hook_name,
    patch_hook,
    patching_hooks,
    run_patched,
)
from speech_lens.patching.metrics import (
    KLToClean,
    LensLogProb,
    LogitDiff,
    NextTokenLogProb,
    kl_to_clean,
    lens_next_word_logprob,
    logit_diff,
    next_token_logprob,
    next_word_logprob,
    word_end,
    word_logit_diff,
    word_token_ids,
)
from speech_lens.patching.pairs import mean_curve, stack_curves
from speech_lens.patching.positions import (
    RULES,
    MapGroup,
    PatchingError,
    PositionMap,
    check_prompt,
    map_all,
    map_positions,
    map_words,
    prompt_digest,
)
from speech_lens.patching.result import PatchResult, write_csv
from speech_lens.patching.sweep import patch_sweep
from speech_lens.patching.word_swap import splice_word, word_swap

__all__ = [
    "COMPONENTS",
    "RULES",
    "KLToClean",
    "LensLogProb",
    "LogitDiff",
    "MapGroup",
    "NextTokenLogProb",
    "PatchResult",
    "PatchingError",
    "PositionMap",
    "cache_source",
    "cache_sources",
    "check_prompt",
    "cross_modal",
    "hook_name",
    "kl_to_clean",
    "lens_next_word_logprob",
    "logit_diff",
    "map_all",
    "map_positions",
    "map_words",
    "mean_curve",
    "next_token_logprob",
    "next_word_logprob",
    "patch_hook",
    "patch_sweep",
    "patching_hooks",
    "prompt_digest",
    "run_patched",
    "splice_word",
    "stack_curves",
    "word_end",
    "word_logit_diff",
    "word_swap",
    "word_token_ids",
    "write_csv",
]
