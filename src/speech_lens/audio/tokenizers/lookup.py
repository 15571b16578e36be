"""Find a speech tokenizer by registered name, module:factory, or checkpoint directory."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from speech_lens.audio.tokenizers.hubert import HubertKMeansTokenizer
from speech_lens.audio.tokenizers.organism import OrganismSpeechTokenizer, organism_tokenizer_path
from speech_lens.audio.tokenizers.registry import (
    FAMILY_TOKENIZERS,
    REGISTRY,
    SpeechTokenizer,
    available_speech_tokenizers,
    register_speech_tokenizer,
)
from speech_lens.audio.tokenizers.spiritlm import SpiritLMSpeechTokenizer
from speech_lens.models.checkpoint import detect_family
from speech_lens.models.spec import CHECKPOINT_SPEC, AdapterSpec


def get_speech_tokenizer(name_or_checkpoint: str | Path, **kw: Any) -> SpeechTokenizer:
    """A tokenizer by registered name, ``package.module:factory``, or checkpoint directory.

    For a checkpoint directory: an organism checkpoint loads the unit tokenizer stored with it;
    any other checkpoint's family (its ``speech_lens.toml`` or the detected spec) picks the real
    tokenizer for that family (``kw`` go to it, e.g. ``checkpoint_dir=`` for SpiritLM files).
    """
    key = str(name_or_checkpoint)
    if key in REGISTRY:
        return _checked(REGISTRY[key](**kw), key)
    path = Path(key)
    if path.is_dir():
        return _checked(_from_checkpoint(path, **kw), key)
    if ":" in key and not path.exists():
        mod, _, attr = key.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(
                f"speech tokenizer {key!r}: cannot import {attr} from {mod}: {e}"
            ) from e
        return _checked(factory(**kw), key)
    raise ValueError(
        f"unknown speech tokenizer {key!r}: not a registered name "
        f"({', '.join(available_speech_tokenizers())}), a checkpoint directory, or module:factory"
    )


def _checked(tok: Any, key: str) -> SpeechTokenizer:
    if not isinstance(tok, SpeechTokenizer):
        raise TypeError(
            f"speech tokenizer {key!r} built a {type(tok).__name__}, which lacks family, "
            "expected_sample_rate or __call__(audio, sample_rate)"
        )
    return tok


def _from_checkpoint(path: Path, **kw: Any) -> SpeechTokenizer:

    if organism_tokenizer_path(path) is not None:
        return REGISTRY["organism"](checkpoint=path, **kw)
    if (path / CHECKPOINT_SPEC).exists():
        spec = AdapterSpec.from_toml(path / CHECKPOINT_SPEC)
    else:
        spec = detect_family(path)
    name = FAMILY_TOKENIZERS.get(spec.name)
    if name is None or name not in REGISTRY:
        raise ValueError(
            f"checkpoint {path} is family {spec.name!r}, which has no registered speech tokenizer "
            f"and no organism tokenizer file; pass a tokenizer name "
            f"({', '.join(available_speech_tokenizers())}) or module:factory"
        )
    return REGISTRY[name](**kw)


register_speech_tokenizer("spiritlm", lambda **kw: SpiritLMSpeechTokenizer(**kw))
register_speech_tokenizer(
    "spiritlm-expressive", lambda **kw: SpiritLMSpeechTokenizer(expressive=True, **kw)
)
register_speech_tokenizer("sims", lambda **kw: HubertKMeansTokenizer(preset="sims", **kw))
register_speech_tokenizer("speechgpt", lambda **kw: HubertKMeansTokenizer(preset="speechgpt", **kw))
register_speech_tokenizer("mhubert", lambda **kw: HubertKMeansTokenizer(**kw))
register_speech_tokenizer("organism", lambda **kw: OrganismSpeechTokenizer(**kw))
