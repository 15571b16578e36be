"""The organisms' on-disk format: a SpiritLM-style checkpoint directory.

``config.json`` (LlamaForCausalLM), ``model.safetensors``, a word-level ``tokenizer.json`` (one
token per word, so there is no sub-word matching question) with the SpiritLM token strings
``[Text]``, ``[Speech]``, ``[Hu0]``..``[HuK-1]``, and ``speech_lens.toml`` (the spiritlm spec with
this checkpoint's ids) that ``speech_lens.load_model`` picks up unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from speech_lens.organisms.corpus import SPECIALS

TEXT_MARKER, SPEECH_MARKER = "[Text]", "[Speech]"


@dataclass(frozen=True)
class OrganismVocab:
    """Id layout: specials, words, ``[Text]``, ``[Speech]``, then K unit tokens."""

    words: tuple[str, ...]
    n_units: int

    @property
    def tokens(self) -> list[str]:
        return [*SPECIALS, *self.words, TEXT_MARKER, SPEECH_MARKER] + [
            f"[Hu{k}]" for k in range(self.n_units)
        ]

    @property
    def size(self) -> int:
        return len(SPECIALS) + len(self.words) + 2 + self.n_units

    @property
    def first_word(self) -> int:
        return len(SPECIALS)

    @property
    def text_id(self) -> int:
        return len(SPECIALS) + len(self.words)

    @property
    def speech_id(self) -> int:
        return self.text_id + 1

    @property
    def first_unit(self) -> int:
        return self.text_id + 2

    def word_id(self, w: str) -> int:
        return self._index().get(w, 0)  # 0 = <unk>

    def _index(self) -> dict[str, int]:
        idx = self.__dict__.get("_idx")
        if idx is None:
            idx = {w: i + len(SPECIALS) for i, w in enumerate(self.words)}
            object.__setattr__(self, "_idx", idx)
        return idx

    def unit_id(self, k: int) -> int:
        if not 0 <= k < self.n_units:
            raise ValueError(f"unit {k} out of range 0..{self.n_units - 1}")
        return self.first_unit + k

    def to_json(self) -> dict[str, Any]:
        return {"words": list(self.words), "n_units": self.n_units}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OrganismVocab:
        return cls(tuple(d["words"]), int(d["n_units"]))


def save_tokenizer(vocab: OrganismVocab, directory: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    toks = vocab.tokens
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(toks)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # markers and units are added tokens, so "[Speech][Hu3][Hu7]" splits without spaces
    tk.add_tokens([AddedToken(t, normalized=False) for t in toks[vocab.text_id :]])
    tk.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(directory))


def spec_toml(vocab: OrganismVocab, frame_rate: float, name: str = "spiritlm-organism") -> str:
    return f"""# A speech_lens model organism in SpiritLM's on-disk format (word-level text vocabulary).
name = "{name}"
description = "speech_lens organism: Llama, {len(vocab.words)} word tokens + {vocab.n_units} units [Hu0]..[Hu{vocab.n_units - 1}]"
architectures = ["LlamaForCausalLM"]
vocab_size = {vocab.size}

[detect]
tokens_present = ["[Hu0]", "[Speech]", "[Text]"]
tokens_absent = ["[Pi0]"]

[tokenizer]
source = "checkpoint"

[units]
pattern = "[Hu{{k}}]"
count = {vocab.n_units}
first_id = {vocab.first_unit}
frame_rate = {frame_rate}
dedup = true

[markers]
text = {{ token = "[Text]", id = {vocab.text_id} }}
speech = {{ token = "[Speech]", id = {vocab.speech_id} }}

[prompt]
bos = true
text_open = "[Text]"
speech_open = "[Speech]"
marker_on_change_only = true
speech_only_marker = true
"""


def llama_config(vocab: OrganismVocab, d_model: int, n_layers: int, n_heads: int, d_ff: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab.size,
        hidden_size=d_model,
        intermediate_size=d_ff,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def export(
    model: Any,
    vocab: OrganismVocab,
    directory: str | Path,
    *,
    frame_rate: float,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write the checkpoint directory (fp16 safetensors by default)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    cfg.pop("dtype", None)
    (d / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    sd = {
        k: v.detach().to(dtype).contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"  # tied to model.embed_tokens.weight
    }
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(vocab, d)
    (d / "speech_lens.toml").write_text(spec_toml(vocab, frame_rate))
    if extra:
        (d / "organism.json").write_text(json.dumps(extra, indent=2))
    return d
