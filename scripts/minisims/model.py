"""Step 3: the mini-SIMS network, its trainable delta, and slamkit's ``UnitLM`` layout on disk.

mini-SIMS = SmolLM2-135M-Instruct + 502 new token rows (``<Un0>..<Un499>``, ``<speech>``,
``<text>`` at ids 49152.. 49653, tied input/output) + optional LoRA on every linear layer of the
30 blocks. The 49,152 base rows stay frozen; the new rows live in their own parameter
(``ExtendedVocab``), so the trainable state, the optimizer state and the shipped delta hold only
what training changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from common import N_BASE_TOKENS, load_base
from torch import Tensor, nn

from data import N_UNITS, VOCAB

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def lora_alpha(rank: int) -> int:
    return 2 * rank  # LoRA scaling alpha / rank = 2 at every rank


class ExtendedVocab(nn.Module):
    """Tied embedding / unembedding over frozen base rows + trainable new rows."""

    def __init__(self, base: Tensor, new: Tensor) -> None:
        super().__init__()
        self.register_buffer("base", base.detach().clone(), persistent=False)
        self.new = nn.Parameter(new.detach().clone())

    def weight(self) -> Tensor:
        return torch.cat([self.base, self.new], 0)


class _Embed(nn.Module):
    def __init__(self, vocab: ExtendedVocab) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids: Tensor) -> Tensor:
        return nn.functional.embedding(ids, self.vocab.weight())


class _Unembed(nn.Module):
    def __init__(self, vocab: ExtendedVocab) -> None:
        super().__init__()
        self._vocab = [vocab]  # a list: not a submodule twice (embed owns it)

    def forward(self, h: Tensor) -> Tensor:
        return h @ self._vocab[0].weight().to(h.dtype).T


def init_new_rows(base: Tensor, seed: int) -> Tensor:
    """Mean of the base rows plus small noise (std = 0.1 of the rows' per-dim std), seeded:
    close to transformers' mean resizing, but reproducible without the global RNG."""
    g = torch.Generator().manual_seed(seed)
    mean, std = base.mean(0), base.std(0)
    noise = torch.randn(VOCAB - N_BASE_TOKENS, base.shape[1], generator=g)
    return mean + 0.1 * std * noise


# The usual English spelling of each U0 phoneme (espeak-ng IPA, stress dropped): the "graphemes"
# initialisation puts a phoneme's row at the mean embedding of its spelling's BPE pieces.
GRAPHEMES = {
    "aɪ": "i", "aɪə": "ia", "aɪɚ": "ire", "aʊ": "ow", "b": "b", "d": "d", "dʒ": "j",
    "eɪ": "a", "f": "f", "h": "h", "i": "y", "iə": "ea", "iː": "ee", "j": "y", "k": "k",
    "l": "l", "m": "m", "n": "n", "n̩": "n", "oʊ": "o", "p": "p", "r": "r", "s": "s", "t": "t",
    "tʃ": "ch", "uː": "oo", "v": "v", "w": "w", "x": "ch", "z": "z", "æ": "a", "ð": "th",
    "ŋ": "ng", "ɐ": "a", "ɑː": "a", "ɑːɹ": "ar", "ɔ": "o", "ɔɪ": "oy", "ɔː": "aw",
    "ɔːɹ": "or", "ə": "a", "əl": "le", "ɚ": "er", "ɛ": "e", "ɛɹ": "air", "ɜː": "ur",
    "ɡ": "g", "ɪ": "i", "ɪɹ": "ear", "ɹ": "r", "ɾ": "t", "ʃ": "sh", "ʊ": "oo", "ʊɹ": "ure",
    "ʌ": "u", "ʒ": "s", "ʔ": "t", "θ": "th", "ᵻ": "e",
}  # fmt: skip


def init_grapheme_rows(base: Tensor, tokenizer: Any, phonemes: list[str], seed: int) -> Tensor:
    """``init_new_rows``, then each used unit row moved to the mean embedding of its phoneme's
    spelling (same small noise, so phonemes sharing a spelling stay distinct)."""
    rows = init_new_rows(base, seed)
    mean = base.mean(0)
    for i, ph in enumerate(phonemes):
        if ph not in GRAPHEMES:
            raise KeyError(f"phoneme {ph!r} (unit {i}) has no spelling in GRAPHEMES")
        ids = tokenizer(GRAPHEMES[ph], add_special_tokens=False)["input_ids"]
        rows[i] = rows[i] - mean + base[ids].mean(0)
    return rows


def build(
    seed: int = 0,
    lora_rank: int = 4,
    full: bool = False,
    init: str = "mean",
    phonemes: list[str] | None = None,
) -> tuple[Any, ExtendedVocab]:
    """The trainable mini-SIMS: (model, vocab module). ``full`` = every weight trainable
    (the benchmark's full fine-tuning; the new rows are then still a separate parameter).
    ``init``: "mean" (mean row + noise) or "graphemes" (``init_grapheme_rows``, needs
    ``phonemes``)."""
    model, tok = load_base()
    base = model.model.embed_tokens.weight.detach()
    if init == "graphemes":
        new = init_grapheme_rows(base, tok, list(phonemes or []), seed)
    elif init == "mean":
        new = init_new_rows(base, seed)
    else:
        raise ValueError(f"unknown init {init!r} (mean, graphemes)")
    vocab = ExtendedVocab(base, new)
    model.model.embed_tokens = _Embed(vocab)
    model.lm_head = _Unembed(vocab)
    model.config.tie_word_embeddings = False  # tying is done by ExtendedVocab itself
    model.config.vocab_size = VOCAB
    if full:
        model.train()
        return model, vocab
    for p in model.parameters():
        p.requires_grad_(False)
    if lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha(lora_rank),
            lora_dropout=0.0,
            target_modules=list(LORA_TARGETS),
        )
        model = get_peft_model(model, cfg)
    vocab.new.requires_grad_(True)
    model.train()
    return model, vocab


def trainable_state(model: Any) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, state: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise RuntimeError(
            f"trainable state mismatch: missing {missing[:3]}, unknown {unknown[:3]}"
        )
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def merged_lm(model: Any, vocab: ExtendedVocab) -> Any:
    """A plain LlamaForCausalLM (tied, 49,654 rows) with LoRA merged in."""
    from transformers import LlamaForCausalLM

    inner = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    cfg = inner.config
    cfg.tie_word_embeddings = True
    out = LlamaForCausalLM(cfg)
    sd = {k: v for k, v in inner.state_dict().items() if "embed_tokens" not in k}
    sd = {k: v for k, v in sd.items() if not k.startswith("lm_head")}
    sd["model.embed_tokens.weight"] = vocab.weight().detach()
    missing, unexpected = out.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"merge: missing {missing}, unexpected {unexpected}")
    out.tie_weights()
    return out.eval()


def save_unitlm(lm: Any, directory: Path, base_name: str = BASE_NAME) -> Path:
    """slamkit ``UnitLM`` layout: nested ``base_config`` (vocab_size as before the resize),
    ``lm.``-prefixed tied safetensors, no tokenizer files (ids rebuilt from the base tokenizer +
    add_tokens(<Un0>..<Un499>, <speech>, <text>))."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    base_cfg = lm.config.to_dict()
    base_cfg["vocab_size"] = N_BASE_TOKENS
    base_cfg["tie_word_embeddings"] = True
    base_cfg.pop("quantization_config", None)
    config = {
        "architectures": ["UnitLM"],
        "model_type": "speech_language_model",
        "base_model_name": base_name,
        "base_config": base_cfg,
        "vocab_size": VOCAB,
        "n_units": N_UNITS,
        "twist_init": True,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    (d / "config.json").write_text(json.dumps(config, indent=2))
    (d / "generation_config.json").write_text(json.dumps({"_from_model_config": True}, indent=2))
    state = {f"lm.{k}": v.detach().contiguous() for k, v in lm.state_dict().items()}
    state.pop("lm.lm_head.weight", None)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d
