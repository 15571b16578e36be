"""Tiny random checkpoints in each family's exact on-disk format (for tests, examples, demos).

Each builder writes what the real release writes: file names (``pytorch_model.bin`` vs sharded
safetensors + index), config keys, the real unit / marker token strings and ids, and the real
vocabulary size (the text part of a small tokenizer is padded with filler pieces so the ids
match the released checkpoints). Weights are random; norms and biases are randomised too so that
numerical checks exercise them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

WORDS = [
    "the",
    "a",
    "an",
    "and",
    "of",
    "to",
    "in",
    "on",
    "at",
    "is",
    "was",
    "it",
    "he",
    "she",
    "they",
    "we",
    "you",
    "i",
    "his",
    "her",
    "their",
    "my",
    "our",
    "with",
    "for",
    "as",
    "by",
    "from",
    "that",
    "this",
    "there",
    "which",
    "who",
    "what",
    "when",
    "where",
    "how",
    "not",
    "no",
    "but",
    "or",
    "so",
    "if",
    "then",
    "than",
    "very",
    "cat",
    "dog",
    "mat",
    "sat",
    "ran",
    "bird",
    "fish",
    "tree",
    "house",
    "man",
    "woman",
    "child",
    "day",
    "night",
    "sun",
    "moon",
    "water",
    "fire",
    "red",
    "green",
    "blue",
    "big",
    "small",
    "old",
    "new",
    "good",
    "bad",
    "happy",
    "sad",
    "fast",
    "slow",
    "hot",
    "cold",
    "long",
    "short",
    "walk",
    "talk",
    "see",
    "saw",
    "hear",
    "heard",
    "eat",
    "ate",
    "go",
    "went",
    "come",
    "came",
    "make",
    "made",
    "take",
    "took",
    "give",
    "gave",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "capital",
    "city",
    "country",
    "world",
    "paris",
    "france",
    "london",
    "england",
    "rome",
    "italy",
    "berlin",
    "germany",
    "emma",
    "jane",
    "elizabeth",
    "darcy",
    "sister",
    "brother",
    "mother",
    "father",
    "friend",
    "letter",
    "time",
    "life",
    "love",
    "heart",
    "mind",
    "word",
    "words",
    "speak",
    "spoke",
    "said",
    "says",
    "speech",
    "text",
]

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
# Tokenizers
# --------------------------------------------------------------------------------------------


def _sentencepiece_llama(directory: Path, added: list[str], extra_files: dict[str, Any]) -> None:
    """A Llama-2 style SentencePiece ``tokenizer.model`` of exactly 32000 pieces plus added tokens
    declared in ``tokenizer_config.json`` (as SpiritLM and SpeechGPT ship them)."""
    from sentencepiece import sentencepiece_model_pb2

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
    import io

    import sentencepiece as spm

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

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
    from tokenizers import AddedToken

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


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _llama(vocab: int, seed: int, tied: bool = False, **over: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

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
    _sentencepiece_llama(d, added, {})
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
    _sentencepiece_llama(d, added, extra)
    return d


def build_speechgpt_com(
    directory: str | Path, base_dir: str | Path, *, seed: int = 1, rank: int = 4
) -> Path:
    """SpeechGPT-7B-com: a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.bin``) on cm."""
    from peft import LoraConfig, get_peft_model

    from speech_lens.adapters import read_state_dict

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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
    from safetensors.torch import save_file

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
    from speech_lens.data import Utterance, Word

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
