"""An on-disk cache of rebuilt tokenizers, keyed by content and written atomically.

SIMS checkpoints store no tokenizer: the loader rebuilds it (base tokenizer + added unit and marker
tokens) and saves it so that TransformerLens' BOS reload (pitfall P1) reads the extended tokenizer.
The entry's name is a hash of the base tokenizer's files and the added tokens, so a base tokenizer
that changes in place gets a new entry. An entry appears only by renaming a complete temporary
folder, so a reader (another torchrun rank, a later run) never sees a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import transformers

# files that hold weights, never read by a tokenizer: left out of the content key
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


def cache_root() -> Path:
    return Path(os.environ.get("SPEECH_LENS_CACHE", Path.home() / ".cache" / "speech_lens"))


def tokenizer_content_key(base_dir: Path, added: list[str]) -> str:
    """Hash of every non-weight file in ``base_dir`` (name and bytes) and the added tokens."""
    h = hashlib.sha256()
    h.update(json.dumps({"added": added, "transformers": transformers.__version__}).encode())
    for f in sorted(p for p in base_dir.iterdir() if p.is_file()):
        if f.name.endswith(WEIGHT_SUFFIXES):
            continue
        h.update(f.name.encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:24]


def atomic_cache_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """``target`` if it exists; else ``write`` fills a fresh temporary folder next to it, which is
    renamed to ``target``. When another process renamed its folder there first, ours is dropped
    and theirs (same content key, so same content) is used."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, target)  # atomic; fails when target exists and is not empty
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
