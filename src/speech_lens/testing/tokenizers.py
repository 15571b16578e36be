"""Tiny real tokenizers (sentencepiece Llama, byte BPE) for test checkpoints."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from speech_lens.testing.words import WORDS

# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def sentencepiece_llama(directory: Path, added: list[str], extra_files: dict[str, Any]) -> None:
    """A Llama-2 style SentencePiece ``tokenizer.model`` of exactly 32000 pieces plus added tokens
    declared in ``tokenizer_config.json`` (as SpiritLM and SpeechGPT ship them)."""

    pb: Any = sentencepiece_model_pb2

    sp = pb.ModelProto.SentencePiece
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = 32000
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = (
        0,
        1,
        2,
        -1,
    )
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False

    def add(piece: str, score: float, kind: int = sp.NORMAL) -> None:
        x = m.pieces.add()
        x.piece, x.score, x.type = piece, score, kind

    add("<unk>", 0.0, sp.UNKNOWN)
    add("<s>", 0.0, sp.CONTROL)
    add("</s>", 0.0, sp.CONTROL)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, sp.BYTE)
    seen: set[str] = set()
    score = 0.0
    for c in sorted(set("".join(WORDS)) | {"▁"}):
        seen.add(c)
        add(c, score)
        score -= 1
    for w in WORDS:
        piece = "▁" + w
        for i in range(2, len(piece) + 1):  # every prefix, so BPE merges reach the whole word
            if piece[:i] not in seen:
                seen.add(piece[:i])
                add(piece[:i], score)
                score -= 1
    i = 0
    while len(m.pieces) < 32000:
        add(f"▁fill{i}", -1e6 - i)
        i += 1
    _write_llama_tokenizer(directory, m.SerializeToString(), 32000, added, extra_files)


def llama2_sentencepiece(
    directory: Path, corpus: list[str], vocab_size: int, added: tuple[str, ...] = ()
) -> Path:
    """A SentencePiece ``tokenizer.model`` trained on ``corpus`` with Llama-2's trainer settings
    (BPE, byte fallback, split digits, dummy prefix, whitespace kept), written and wrapped as
    ``_sentencepiece_llama`` writes the tiny checkpoints' tokenizer. Rare words and numbers then
    start with the lone ``▁`` piece, as in Llama-2 (``" 1990"`` -> ``▁ 1 9 9 0``)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    _write_llama_tokenizer(directory, buf.getvalue(), vocab_size, list(added), {})
    return directory


def _write_llama_tokenizer(
    directory: Path, model: bytes, n_pieces: int, added: list[str], extra_files: dict[str, Any]
) -> None:
    """``tokenizer.model`` plus the config files SpiritLM and SpeechGPT ship (added tokens
    from id ``n_pieces`` on)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model)
    decoder = {
        str(n_pieces + j): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": False,
        }
        for j, t in enumerate(added)
    }
    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": True,
        "model_max_length": 2048,
        "added_tokens_decoder": decoder,
    }
    tok_cfg.update(extra_files.pop("tokenizer_config", {}))
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    special.update(extra_files.pop("special_tokens_map", {}))
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    for name, content in extra_files.items():
        (directory / name).write_text(json.dumps(content, indent=2))


def _byte_bpe(
    directory: Path,
    n_regular: int,
    specials: dict[int, str],
    bos: str | None,
    eos: str,
    n_total: int,
) -> None:
    """A GPT-2 style byte-level BPE tokenizer (Qwen2.5 / Llama-3 shape) of exactly ``n_total`` ids:
    byte symbols, merges that spell the test words, filler pieces up to ``n_regular``, then the
    special tokens at their real ids."""

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for c in sorted(byte_chars):
        vocab[c] = len(vocab)
    merges: list[tuple[str, str]] = []
    for w in WORDS:
        for piece in (w, "Ġ" + w):
            cur = piece[0]
            for ch in piece[1:]:
                nxt = cur + ch
                if nxt not in vocab:
                    vocab[nxt] = len(vocab)
                    merges.append((cur, ch))
                cur = nxt
    i = 0
    while len(vocab) < n_regular:
        vocab[f"fill{i}Ġ"] = len(vocab)
        i += 1
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()

    for i_ in sorted(specials):
        assert tk.get_vocab_size() == i_, (tk.get_vocab_size(), i_)
        tk.add_special_tokens([AddedToken(specials[i_], special=True, normalized=False)])
    if bos is not None:
        bos_id = tk.token_to_id(bos)
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    assert tk.get_vocab_size() == n_total, (tk.get_vocab_size(), n_total)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))


def small_base_tokenizer(directory: Path, size: int = 1000, *, bos: bool = False) -> Path:
    """A byte-level BPE base tokenizer of ``size`` ids (not a released length): the test words,
    fillers, then ``<|endoftext|>`` (and ``<|begin_of_text|>`` as BOS when ``bos``) at the end."""
    names = (["<|begin_of_text|>"] if bos else []) + ["<|endoftext|>"]
    n_regular = size - len(names)
    _byte_bpe(
        directory,
        n_regular,
        {n_regular + j: n for j, n in enumerate(names)},
        "<|begin_of_text|>" if bos else None,
        "<|endoftext|>",
        size,
    )
    return directory


def qwen_base_tokenizer(directory: Path) -> Path:
    """Qwen2.5's tokenizer shape: 151643 regular ids, 22 specials up to 151664, no BOS (len 151665)."""
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{j}|>" for j in range(19)]
    _byte_bpe(
        directory,
        151643,
        {151643 + j: n for j, n in enumerate(names)},
        None,
        "<|endoftext|>",
        151665,
    )
    return directory


def llama3_base_tokenizer(directory: Path) -> Path:
    """Llama-3.2's tokenizer shape: 128000 regular ids, 256 specials, BOS <|begin_of_text|> (len 128256)."""
    names = ["<|begin_of_text|>", "<|end_of_text|>"] + [
        f"<|reserved_special_token_{j}|>" for j in range(254)
    ]
    _byte_bpe(
        directory,
        128000,
        {128000 + j: n for j, n in enumerate(names)},
        "<|begin_of_text|>",
        "<|end_of_text|>",
        128256,
    )
    return directory
