"""Tiny random checkpoints of every family, written to disk for tests and the demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from speech_lens.data.utterance import Utterance, Word
from speech_lens.models.checkpoint import read_state_dict
from speech_lens.testing.tokenizers import (
    llama3_base_tokenizer,
    qwen_base_tokenizer,
    sentencepiece_llama,
)

FAMILIES = (
    "spiritlm",
    "spiritlm-expressive",
    "speechgpt",
    "speechgpt-com",
    "sims-qwen",
    "sims-llama",
)


def _tiny_dims(**over: Any) -> dict[str, Any]:
    d = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
    )
    d.update(over)
    return d


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _llama(vocab: int, seed: int, tied: bool = False, **over: Any) -> Any:

    cfg = LlamaConfig(
        vocab_size=vocab,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=tied,
        **_tiny_dims(**over),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    _randomize(model, seed)
    return model.eval()


def build_spiritlm(
    directory: str | Path, *, expressive: bool = False, seed: int = 0, **dims: Any
) -> Path:
    """SpiritLM Base (vocab 32512) or Expressive (32768): one ``pytorch_model.bin``, SentencePiece
    ``tokenizer.model``, ``[Text]``=32000, ``[Speech]``=32001, ``[Hu0..500]``=32002-32502, and for
    Expressive ``[Pi0..63]``=32503-32566, ``[St0..99]``=32567-32666."""
    d = Path(directory)
    added = ["[Text]", "[Speech]"] + [f"[Hu{k}]" for k in range(501)]
    if expressive:
        added += [f"[Pi{k}]" for k in range(64)] + [f"[St{k}]" for k in range(100)]
    vocab = 32768 if expressive else 32512
    model = _llama(vocab, seed, **dims)
    _save_hf(model, d, safetensors=False)
    sentencepiece_llama(d, added, {})
    return d


def build_speechgpt(
    directory: str | Path, *, stage: str = "cm", seed: int = 0, **dims: Any
) -> Path:
    """SpeechGPT-7B-ma (33002 rows) or -cm (33006): ``<0>..<999>``=32000-32999, ``<sosp>``=33000,
    ``<eosp>``=33001, cm adds ``[Human]``, ``[SpeechGPT]``, ``<eoh>``, ``<eos>``; added_tokens.json."""
    d = Path(directory)
    added = [f"<{k}>" for k in range(1000)] + ["<sosp>", "<eosp>"]
    if stage == "cm":
        added += ["[Human]", "[SpeechGPT]", "<eoh>", "<eos>"]
    model = _llama(32000 + len(added), seed, **dims)
    _save_hf(model, d, safetensors=False)
    extra = {
        "added_tokens.json": {t: 32000 + j for j, t in enumerate(added)},
        "special_tokens_map": {"pad_token": "<unk>"},
    }
    sentencepiece_llama(d, added, extra)
    return d


def build_speechgpt_com(
    directory: str | Path, base_dir: str | Path, *, seed: int = 1, rank: int = 4
) -> Path:
    """SpeechGPT-7B-com: a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.bin``) on cm."""
    from peft import LoraConfig, get_peft_model

    base_dir = Path(base_dir)
    d = Path(directory)
    cfg = json.loads((base_dir / "config.json").read_text())
    model = _llama(cfg["vocab_size"], 0, **_dims_from(cfg))
    model.load_state_dict(read_state_dict(base_dir))
    lcfg = LoraConfig(r=rank, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, lcfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:  # peft zero-inits B; make the adapter change something
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(d), safe_serialization=False)
    adapter_cfg = json.loads((d / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = str(base_dir.resolve())
    (d / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
    return d


def _dims_from(cfg: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    )
    return {k: cfg[k] for k in keys if k in cfg}


# base -> (transformers model_type, BOS, EOS, released base name and its pre-resize vocabulary)
SIMS_BASES: dict[str, tuple[str, int, int, str | None, int | None]] = {
    "qwen2": ("qwen2", 151643, 151643, "Qwen/Qwen2.5-0.5B", 151936),
    "llama": ("llama", 128000, 128001, "meta-llama/Llama-3.2-1B", 128256),
    "qwen3": ("qwen3", 151643, 151645, None, None),  # no released SIMS: pass base_name
}


def build_sims(
    directory: str | Path,
    base_tokenizer_dir: str | Path,
    *,
    base: str = "qwen2",
    base_name: str | None = None,
    seed: int = 0,
    sharded: bool = True,
    **dims: Any,
) -> Path:
    """slamkit ``UnitLM``: ``config.json`` with model_type ``speech_language_model`` and the base
    config nested under ``base_config``; weights prefixed ``lm.``; no tokenizer files. Units
    ``<Un0..499>`` start at len(base tokenizer): 151665 on Qwen2.5, 128256 on Llama-3.2; then
    ``<speech>``, ``<text>``. Qwen2.5 (0.5B-3B) and Llama-3.2 bases are tied. ``base`` is one of
    ``SIMS_BASES``; ``base_name`` (default: the released base of that architecture) is what the
    config says the base is; a base of another name has len(base tokenizer) rows before the resize."""
    model_type, bos, eos, released_name, released_vocab = SIMS_BASES[base]
    if base_name is None and released_name is None:
        raise ValueError(f"no released SIMS on a {base} base: pass base_name=")
    d = Path(directory)
    n_text = len(AutoTokenizer.from_pretrained(str(base_tokenizer_dir)))
    name = base_name or released_name
    base_vocab = released_vocab if base_name is None and released_vocab else n_text
    extra = {"head_dim": 8} if base == "qwen3" else {}  # Qwen3's default head_dim is 128
    base_cfg = AutoConfig.for_model(
        model_type,
        vocab_size=base_vocab,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        **_tiny_dims(**{**extra, **dims}),
    )
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(base_cfg)
    lm.resize_token_embeddings(n_text + 502)
    _randomize(lm, seed)
    assert name is not None
    return save_unit_lm(lm, d, name, base_vocab=base_vocab, sharded=sharded)


def save_unit_lm(
    lm: Any, directory: str | Path, base_name: str, *, base_vocab: int, sharded: bool = False
) -> Path:
    """Write any HF causal LM whose embedding was already resized to len(base tokenizer) + added
    tokens in slamkit's ``UnitLM`` layout: ``config.json`` (``base_model_name``, the base config
    as saved before the resize under ``base_config``, ``vocab_size`` = rows) and ``lm.``-prefixed
    safetensors (one file, or two shards with an index); the tied ``lm_head`` is not stored."""
    d = Path(directory)
    rows = int(lm.get_input_embeddings().weight.shape[0])
    base_dict = lm.config.to_dict()
    base_dict["vocab_size"] = base_vocab
    base_dict["_name_or_path"] = base_name
    tied = bool(lm.config.tie_word_embeddings)
    config = {
        "architectures": ["UnitLM"],
        "model_type": "speech_language_model",
        "base_model_name": base_name,
        "base_config": base_dict,
        "vocab_size": rows,
        "twist_init": True,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    (d / "generation_config.json").write_text(json.dumps({"_from_model_config": True}, indent=2))
    state = {f"lm.{k}": v.contiguous() for k, v in lm.state_dict().items()}
    if tied:
        state.pop("lm.lm_head.weight", None)
    _write_safetensors(state, d, shards=2 if sharded else 1)
    return d


def _save_hf(model: Any, d: Path, *, safetensors: bool) -> None:
    d.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(d))
    model.generation_config.save_pretrained(str(d))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if safetensors:
        _write_safetensors(sd, d, shards=1)
    else:
        torch.save(sd, d / "pytorch_model.bin")


def _write_safetensors(state: dict[str, torch.Tensor], d: Path, shards: int) -> None:

    if shards == 1:
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        save_file(part, str(d / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_family(family: str, root: str | Path, **dims: Any) -> tuple[Path, dict[str, Any]]:
    """Build one family's tiny checkpoint under ``root``; returns its path and ``load_model`` kwargs."""
    root = Path(root)
    if family == "spiritlm":
        return build_spiritlm(root / "spiritlm", **dims), {}
    if family == "spiritlm-expressive":
        return build_spiritlm(root / "spiritlm-expressive", expressive=True, **dims), {}
    if family == "speechgpt":
        return build_speechgpt(root / "speechgpt-cm", **dims), {}
    if family == "speechgpt-com":
        cm = root / "speechgpt-cm"
        if not (cm / "config.json").exists():
            build_speechgpt(cm, **dims)
        return build_speechgpt_com(root / "speechgpt-com", cm), {}
    if family in ("sims-qwen", "sims-llama"):
        base = "qwen2" if family == "sims-qwen" else "llama"
        tok_dir = root / f"{base}-base-tokenizer"
        if not (tok_dir / "tokenizer.json").exists():
            (qwen_base_tokenizer if base == "qwen2" else llama3_base_tokenizer)(tok_dir)
        path = build_sims(root / family, tok_dir, base=base, sharded=base == "qwen2", **dims)
        return path, {"base_tokenizer": tok_dir}
    raise ValueError(f"unknown test family {family!r}; one of {FAMILIES}")


def random_utterances(
    n: int, rate: float = 25.0, prefix: str = "u", *, seed: int = 1, n_units: int = 500
) -> list[Any]:
    """``n`` short utterances (3-4 words of "the cat sat on a mat", 0.3 s apart) with random
    units: data for tests that need a manifest but no particular words."""

    g = torch.Generator().manual_seed(seed)
    words = ["the", "cat", "sat", "on", "a", "mat"]
    out = []
    for i in range(n):
        ws = tuple(Word(words[(i + j) % 6], 0.3 * j, 0.3 * j + 0.25) for j in range(3 + i % 2))
        nf = int(ws[-1].end * rate) + 2
        units = tuple(int(u) for u in torch.randint(0, n_units, (nf,), generator=g))
        out.append(
            Utterance(id=f"{prefix}{i}", words=ws, units=units, durations=None, frame_rate=rate)
        )
    return out
