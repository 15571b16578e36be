"""The vocabulary layout of a loaded checkpoint: where text, unit and marker tokens live."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from speech_lens.models.checkpoint import (
    TOKENIZER_FILES,
    auto_tokenizer,
    base_config_dict,
    has_tokenizer,
)
from speech_lens.models.spec import (
    AdapterError,
    AdapterSpec,
    MissingTokenizerError,
    TokenSpec,
    UnitSpec,
)
from speech_lens.models.tokenizer_cache import atomic_cache_dir, cache_root, tokenizer_content_key
from speech_lens.vocab import UnitBlock, VocabLayout


def load_tokenizer(
    path: Path, spec: AdapterSpec, base_tokenizer: str | Path | None
) -> tuple[Any, int]:
    """Tokenizer with every unit token; also the number of text tokens before the units."""
    if spec.tokenizer_source == "checkpoint":
        if not has_tokenizer(path):
            raise AdapterError(
                f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); {spec.name} checkpoints store one"
            )
        tok = auto_tokenizer(path)
        return tok, len(tok)
    if base_tokenizer is None:
        raise MissingTokenizerError(
            f"{spec.name} checkpoints store no tokenizer ({path}); pass base_tokenizer= the directory "
            f"of the base text tokenizer (e.g. Qwen2.5 or Llama-3.2), as slamkit does"
        )
    base_dir = Path(base_tokenizer)
    if not base_dir.is_dir() or not has_tokenizer(base_dir):
        raise MissingTokenizerError(
            f"base_tokenizer {base_dir} is not a directory with tokenizer files"
        )
    return _rebuilt_tokenizer(base_dir, spec)


def _rebuilt_tokenizer(base_dir: Path, spec: AdapterSpec) -> tuple[Any, int]:
    """slamkit's recipe: base tokenizer + add_tokens(units, markers), saved to disk so that
    TransformerLens' BOS reload (pitfall P1) reads the extended tokenizer, not the base one."""
    tok = auto_tokenizer(base_dir)
    n_text = len(tok)
    added = [spec.units.pattern.format(k=k) for k in range(spec.units.count)]
    for name in spec.added_tokens:
        if name == "units":
            continue
        if name not in spec.markers:
            raise AdapterError(
                f"spec {spec.source}: tokenizer.added_tokens names unknown marker {name!r}"
            )
        added.append(spec.markers[name].token)
    tok.add_tokens(added)
    # keyed by the base tokenizer's content; written whole then renamed (torchrun ranks race here)
    key = tokenizer_content_key(base_dir, added)
    cache = atomic_cache_dir(
        cache_root() / "tokenizers" / key, lambda d: tok.save_pretrained(str(d))
    )
    return auto_tokenizer(cache), n_text


def check_rebuilt_vocab(
    spec: AdapterSpec, config: dict[str, Any], path: Path, rows: int, n_text: int, n_tok: int
) -> None:
    """A rebuilt tokenizer (base + added tokens) must fill the embedding exactly: slamkit resizes
    the base LM to ``vocab_size = len(text tokenizer)`` after ``add_tokens``. Any other row count
    means the base tokenizer is not the one the checkpoint was trained with."""
    if rows == n_tok:
        return
    key = f"{spec.weights_prefix}model.embed_tokens.weight"
    raise AdapterError(
        f"{path}: {key} has {rows} rows (config.json field vocab_size: {config.get('vocab_size')}), "
        f"but the base tokenizer has {n_text} tokens + {n_tok - n_text} added = {n_tok}; "
        f"{spec.name} sizes the embedding to len(base tokenizer) + added tokens, so the unit ids "
        f"would not be the trained ones: pass the base tokenizer the checkpoint was trained on"
    )


def base_model_names(spec: AdapterSpec, config: dict[str, Any], path: Path) -> list[str]:
    """What the checkpoint says its base is: slamkit's ``base_model_name`` and the nested base
    config's ``_name_or_path``."""
    base = base_config_dict(config, spec, path)
    names = [config.get("base_model_name"), base.get("_name_or_path")]
    return [n for n in names if isinstance(n, str) and n]


def warn_if_unlike_release(
    spec: AdapterSpec,
    config: dict[str, Any],
    path: Path,
    n_text: int,
    base_dir: str | Path | None,
) -> None:
    """Warn when the checkpoint names a released base but the base tokenizer's length is not the
    released one (a different tokenizer version, or the wrong directory)."""
    # matched by last path component: "Qwen/Qwen2.5-7B" and a local "/models/Qwen2.5-7B" alike
    released = {Path(k).name: v for k, v in spec.units.released_first_ids.items()}
    for name in base_model_names(spec, config, path):
        if Path(name).name not in released:
            continue
        first = released[Path(name).name]
        if n_text != first:
            warnings.warn(
                f"{path / 'config.json'} names the base {name!r}, whose released tokenizer has "
                f"{first} tokens ({spec.name} units from id {first}), but base tokenizer "
                f"{base_dir} has {n_text}: units are read from id {n_text}",
                stacklevel=3,
            )
        return


def build_layout(
    spec: AdapterSpec,
    tokenizer: Any,
    rows: int,
    *,
    n_text: int,
    where: str = "",
) -> VocabLayout:
    """Check every spec'd id against the tokenizer and embedding, and describe the partition."""
    vocab = tokenizer.get_vocab()
    n_tok = len(tokenizer)
    at = f" in {where}" if where else ""
    # first_id "after_text" is checkable only where we rebuilt the tokenizer ourselves
    after_text = n_text if spec.tokenizer_source == "base" else None
    first = after_text if spec.units.first_id is None else None
    units = unit_block("units", spec.units, first, vocab, spec.name, at)
    prosody = {k: unit_block(k, u, None, vocab, spec.name, at) for k, u in spec.prosody.items()}
    marker_ids, marker_tokens = token_ids(spec.markers, "marker", vocab, units, spec.name, at)
    control, _ = token_ids(spec.control, "control", vocab, units, spec.name, at)
    for name in ("bos", "eos", "unk", "pad"):
        i = getattr(tokenizer, f"{name}_token_id", None)
        if (
            i is not None
            and name not in control
            and i not in marker_ids.values()
            and not units.contains(torch.tensor(i))
        ):
            control[name] = int(i)

    top = max(
        [
            units.last_id,
            *(b.last_id for b in prosody.values()),
            *marker_ids.values(),
            *control.values(),
        ]
    )
    if rows <= top or n_tok > rows:
        raise AdapterError(
            f"the embedding has {rows} rows{at} but the tokenizer has {n_tok} tokens (largest used id {top})"
        )
    need = spec.vocab_size_min or spec.vocab_size
    if need is not None and rows < need:
        raise AdapterError(
            f"the embedding has {rows} rows{at}, smaller than {spec.name}'s vocabulary of {need}"
        )
    return VocabLayout(
        vocab_size=rows,
        n_tokenizer=n_tok,
        units=units,
        prosody=prosody,
        marker_ids=marker_ids,
        marker_tokens=marker_tokens,
        control_ids=control,
    )


def unit_block(
    name: str,
    u: UnitSpec,
    default_first: int | None,
    vocab: dict[str, int],
    family: str,
    at: str,
) -> UnitBlock:
    """A block of unit tokens: present, contiguous, and starting where the spec says."""
    first_tok = u.pattern.format(k=0)
    if first_tok not in vocab:
        raise AdapterError(f"unit token {first_tok!r} is missing from the tokenizer{at}")
    first = vocab[first_tok]
    expected = u.first_id if u.first_id is not None else default_first
    if expected is not None and first != expected:
        raise AdapterError(
            f"unit token {first_tok!r} has id {first}{at}; the {family} spec says {expected}"
        )
    for k in range(u.count):
        t = u.pattern.format(k=k)
        if t not in vocab:
            raise AdapterError(f"unit token {t!r} is missing from the tokenizer{at}")
        if vocab[t] != first + k:
            raise AdapterError(
                f"unit tokens are not contiguous{at}: {t!r} has id {vocab[t]}, expected {first + k}"
            )
    return UnitBlock(name, u.pattern, first, u.count, u.frame_rate, u.dedup)


def token_ids(
    tokens: dict[str, TokenSpec],
    kind: str,
    vocab: dict[str, int],
    units: UnitBlock,
    family: str,
    at: str,
) -> tuple[dict[str, int], dict[str, str]]:
    """Marker or control tokens by name: their ids (checked against the spec) and strings."""
    ids, strs = {}, {}
    for name, t in tokens.items():
        if t.token not in vocab:
            if t.optional:
                continue
            raise AdapterError(
                f"{kind} token {t.token!r} ({name}) is missing from the tokenizer{at}"
            )
        got = vocab[t.token]
        want = (
            t.id
            if t.id is not None
            else (units.first_id + t.offset if t.offset is not None else None)
        )
        if want is not None and got != want:
            raise AdapterError(
                f"{kind} token {t.token!r} has id {got}{at}; the {family} spec says {want}"
            )
        ids[name], strs[name] = got, t.token
    return ids, strs
