"""Adapter specs (one TOML per checkpoint family) and the one loader that reads them.

``load_model(path)`` detects the family, reads the weights (converting SIMS ``lm.``-prefixed
weights and merging LoRA adapters where needed), rebuilds or loads the tokenizer without losing
added unit tokens (TL pitfall P1), checks every documented id, and boots a ``TransformerBridge``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from speech_lens._tl import TransformerBridge, boot_bridge
from speech_lens.vocab import UnitBlock, VocabLayout

SPEC_DIR = Path(__file__).parent / "model_adapters"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
CHECKPOINT_SPEC = "speech_lens.toml"  # a family spec shipped inside a checkpoint directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class AdapterError(ValueError):
    """A checkpoint or spec that cannot be loaded as described; the message names file, field or token."""


class MissingTokenizerError(AdapterError):
    """The family stores no tokenizer (SIMS) and no base text tokenizer was given."""


class WeightFileError(AdapterError):
    """A weight file is missing, unreadable, or does not match the architecture."""


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSpec:
    """A marker or control token: an absolute ``id``, or an ``offset`` from the first unit id."""

    token: str
    id: int | None = None
    offset: int | None = None
    optional: bool = False


@dataclass(frozen=True)
class UnitSpec:
    pattern: str
    count: int
    first_id: int | None  # None: right after the text tokenizer (SIMS)
    frame_rate: float
    dedup: bool
    first_id_by_model_type: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptSpec:
    """How the family writes speech and text spans (read by ``prompts.py``)."""

    bos: bool | str = True  # True, False, or "tokenizer" (whatever add_special_tokens does)
    text_open: str = ""
    text_close: str = ""
    speech_open: str = ""
    speech_close: str = ""
    marker_on_change_only: bool = True
    speech_only_marker: bool = True


@dataclass(frozen=True)
class DetectSpec:
    config_model_type: str | None = None
    tokens_present: tuple[str, ...] = ()
    tokens_absent: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    description: str
    architectures: tuple[str, ...]
    units: UnitSpec
    prompt: PromptSpec
    detect: DetectSpec = DetectSpec()
    vocab_size: int | None = None
    vocab_size_min: int | None = None
    tokenizer_source: str = "checkpoint"  # or "base"
    added_tokens: tuple[str, ...] = ()
    prosody: dict[str, UnitSpec] = field(default_factory=dict)
    markers: dict[str, TokenSpec] = field(default_factory=dict)
    control: dict[str, TokenSpec] = field(default_factory=dict)
    weights_prefix: str = ""
    nested_config: str | None = None
    source: str = ""

    @classmethod
    def from_toml(cls, path: str | Path) -> AdapterSpec:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise AdapterError(f"spec file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise AdapterError(f"spec file {path} is not valid TOML: {e}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> AdapterSpec:
        def need(d: dict[str, Any], key: str, where: str) -> Any:
            if key not in d:
                raise AdapterError(f"spec {source}: missing field {where}{key}")
            return d[key]

        def unit_spec(d: dict[str, Any], where: str) -> UnitSpec:
            pattern = need(d, "pattern", where)
            if "{k}" not in pattern:
                raise AdapterError(f"spec {source}: {where}pattern {pattern!r} must contain {{k}}")
            first = need(d, "first_id", where)
            if first != "after_text" and not isinstance(first, int):
                raise AdapterError(f"spec {source}: {where}first_id must be an int or 'after_text'")
            return UnitSpec(
                pattern=pattern,
                count=int(need(d, "count", where)),
                first_id=None if first == "after_text" else first,
                frame_rate=float(need(d, "frame_rate", where)),
                dedup=bool(d.get("dedup", True)),
                first_id_by_model_type=dict(d.get("first_id_by_model_type", {})),
            )

        def tokens(d: dict[str, Any], where: str) -> dict[str, TokenSpec]:
            out = {}
            for name, t in d.items():
                if isinstance(t, str):
                    t = {"token": t}
                out[name] = TokenSpec(
                    token=need(t, "token", f"{where}{name}."),
                    id=t.get("id"),
                    offset=t.get("offset"),
                    optional=bool(t.get("optional", False)),
                )
            return out

        det = raw.get("detect", {})
        tok = raw.get("tokenizer", {})
        w = raw.get("weights", {})
        source_kind = tok.get("source", "checkpoint")
        if source_kind not in ("checkpoint", "base"):
            raise AdapterError(f"spec {source}: tokenizer.source must be 'checkpoint' or 'base'")
        return cls(
            name=need(raw, "name", ""),
            description=raw.get("description", ""),
            architectures=tuple(raw.get("architectures", ())),
            units=unit_spec(need(raw, "units", ""), "units."),
            prompt=PromptSpec(**raw.get("prompt", {})),
            detect=DetectSpec(
                config_model_type=det.get("config_model_type"),
                tokens_present=tuple(det.get("tokens_present", ())),
                tokens_absent=tuple(det.get("tokens_absent", ())),
            ),
            vocab_size=raw.get("vocab_size"),
            vocab_size_min=raw.get("vocab_size_min"),
            tokenizer_source=source_kind,
            added_tokens=tuple(tok.get("added_tokens", ())),
            prosody={k: unit_spec(v, f"prosody.{k}.") for k, v in raw.get("prosody", {}).items()},
            markers=tokens(raw.get("markers", {}), "markers."),
            control=tokens(raw.get("control", {}), "control."),
            weights_prefix=w.get("prefix", ""),
            nested_config=w.get("nested_config"),
            source=source,
        )


def available_families() -> dict[str, AdapterSpec]:
    """The specs shipped in ``speech_lens/model_adapters/``, by name."""
    specs = {}
    for p in sorted(SPEC_DIR.glob("*.toml")):
        s = AdapterSpec.from_toml(p)
        specs[s.name] = s
    return specs


def get_spec(family: str | Path | AdapterSpec) -> AdapterSpec:
    if isinstance(family, AdapterSpec):
        return family
    fams = available_families()
    if str(family) in fams:
        return fams[str(family)]
    if str(family).endswith(".toml") or Path(family).is_file():
        return AdapterSpec.from_toml(family)
    raise AdapterError(
        f"unknown family {family!r}; known: {', '.join(fams)} (or pass a .toml spec)"
    )


# --------------------------------------------------------------------------------------------
# The loaded model
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SpeechLM:
    """A TransformerBridge plus what it needs to understand speech: tokenizer, layout, spec."""

    bridge: TransformerBridge
    tokenizer: Any
    layout: VocabLayout
    spec: AdapterSpec
    path: Path
    tied: bool

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def hf_model(self) -> Any:
        return self.bridge.original_model

    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device

    def require_eval(self) -> None:
        """Analyses refuse train mode: dropout would make every number irreproducible."""
        training = [n for n, m in self.bridge.named_modules() if m.training]
        if training:
            raise AdapterError(
                f"model {self.path} is in train mode ({len(training)} modules, e.g. "
                f"{training[0] or 'the bridge'}); call model.bridge.eval() before analysing it"
            )

    def describe(self) -> dict[str, Any]:
        cfg = self.bridge.cfg
        return {
            "path": str(self.path),
            "family": self.spec.name,
            "architecture": self.hf_model.__class__.__name__,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": int(cfg.n_heads),
            "n_key_value_heads": getattr(cfg, "n_key_value_heads", None),
            "d_vocab": int(cfg.d_vocab),
            "tied_embeddings": self.tied,
            "dtype": str(next(self.bridge.parameters()).dtype).replace("torch.", ""),
        }


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_model(
    path: str | Path,
    *,
    family: str | None = None,
    spec: str | Path | AdapterSpec | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    base_tokenizer: str | Path | None = None,
    memory_budget_gb: float | None = None,
    seq_len: int = 1024,
) -> SpeechLM:
    """Load a speech-text checkpoint directory into a ``TransformerBridge`` (eval mode).

    ``family`` names a shipped spec (``spiritlm``, ``spiritlm-expressive``, ``speechgpt``,
    ``sims``); ``spec`` is a user's own TOML spec; with neither, the family is detected.
    ``base_tokenizer`` is the base text tokenizer directory for families that store none (SIMS).
    Before reading any weight, the memory a lens run at ``seq_len`` positions needs is estimated
    and the load is refused when it exceeds ``memory_budget_gb`` (default: available RAM on CPU).
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"checkpoint {path} is not a directory")
    dtype = dtype or torch.float32
    lora_base = _lora_base(path)
    weights_dir = lora_base or path
    config = _read_json(weights_dir / "config.json")

    tok_dir = path if _has_tokenizer(path) else weights_dir
    if spec is not None:
        the_spec = get_spec(spec)
    elif family is None and (path / CHECKPOINT_SPEC).exists():
        the_spec = AdapterSpec.from_toml(path / CHECKPOINT_SPEC)
    elif family is not None:
        the_spec = get_spec(family)
    else:
        the_spec = detect_family(weights_dir, config, tok_dir)

    est = estimate_memory(_base_config_dict(config, the_spec, weights_dir), dtype, seq_len=seq_len)
    budget = memory_budget_gb if memory_budget_gb is not None else _available_gb(device)
    if budget is not None and est.total_gb > budget:
        raise AdapterError(
            f"{path} needs about {est.total_gb:.1f} GiB ({est}) but the budget is {budget:.1f} GiB; "
            f"use a smaller dtype (dtype=torch.bfloat16), fewer positions, or a machine with more memory"
        )
    hf: Any = _load_hf_model(weights_dir, config, the_spec, dtype)
    if lora_base is not None:
        hf = _merge_lora(hf, path)
    hf.eval()

    model_type = _base_config_dict(config, the_spec, weights_dir).get("model_type", "")
    tokenizer, n_text = _load_tokenizer(tok_dir, the_spec, base_tokenizer)
    rows = int(hf.get_input_embeddings().weight.shape[0])
    layout = build_layout(
        the_spec, tokenizer, rows, n_text=n_text, model_type=model_type, where=str(path)
    )
    tied = _is_tied(hf)
    bridge = boot_bridge(str(path), hf, tokenizer, device=device, dtype=dtype)
    return SpeechLM(
        bridge=bridge, tokenizer=tokenizer, layout=layout, spec=the_spec, path=path, tied=tied
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a lens run needs: weights, one forward's activations, the streaming lens buffers."""

    weights: int
    activations: int
    lens: int

    @property
    def total_gb(self) -> float:
        return (self.weights + self.activations + self.lens) / 2**30

    def __str__(self) -> str:
        g = 2**30
        return (
            f"weights {self.weights / g:.2f} GiB + activations {self.activations / g:.2f} GiB "
            f"+ lens buffers {self.lens / g:.2f} GiB"
        )


def estimate_memory(
    config: dict[str, Any], dtype: torch.dtype, *, seq_len: int = 1024, lens_chunk: int = 128
) -> MemoryEstimate:
    """Estimate from the HF config alone (nothing loaded), for Llama / Qwen2-shaped decoders."""
    d = int(config["hidden_size"])
    n_layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    d_head = int(config.get("head_dim") or d // heads)
    ff = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    tied = bool(config.get("tie_word_embeddings", False))
    per_layer = d * heads * d_head * 2 + d * kv * d_head * 2 + 3 * d * ff + 2 * d
    n_params = vocab * d * (1 if tied else 2) + n_layers * per_layer + d
    width = torch.finfo(dtype).bits // 8
    # eager attention holds one layer's [heads, pos, pos] scores; logits [pos, vocab] in fp32
    act = (
        heads * seq_len * seq_len * width * 2
        + seq_len * (4 * d + 2 * ff) * width
        + seq_len * vocab * 4
    )
    lens = 3 * lens_chunk * vocab * 4
    return MemoryEstimate(weights=n_params * width, activations=act, lens=lens)


def _available_gb(device: str | torch.device) -> float | None:
    if torch.device(device).type != "cpu":
        return None  # accelerators: the user's device_map decides
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def load_from_args(args: Any, checkpoint: str | Path | None = None, **kw: Any) -> SpeechLM:
    """``load_model`` with the checkpoint options every CLI command shares
    (``--family``, ``--spec``, ``--base-tokenizer``)."""
    return load_model(
        checkpoint if checkpoint is not None else args.checkpoint,
        family=args.family,
        spec=args.spec,
        base_tokenizer=args.base_tokenizer,
        **kw,
    )


def detect_family(
    path: Path, config: dict[str, Any] | None = None, tok_dir: Path | None = None
) -> AdapterSpec:
    """Pick the one shipped spec whose detection rules match; refuse when none or several do."""
    config = config if config is not None else _read_json(path / "config.json")
    vocab = _tokenizer_vocab(tok_dir or path)
    matches = []
    for s in available_families().values():
        d = s.detect
        if d.config_model_type is not None and config.get("model_type") != d.config_model_type:
            continue
        if (d.tokens_present or d.tokens_absent) and vocab is None:
            continue
        if vocab is not None and any(t not in vocab for t in d.tokens_present):
            continue
        if vocab is not None and any(t in vocab for t in d.tokens_absent):
            continue
        first_unit = s.units.pattern.format(k=0)
        if (
            vocab is not None
            and s.units.first_id is not None
            and vocab.get(first_unit) != s.units.first_id
        ):
            continue
        if d.config_model_type is None and not d.tokens_present:
            continue  # a spec with no rule never matches by detection
        matches.append(s)
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(available_families())
    if not matches:
        raise AdapterError(
            f"cannot detect the family of {path}: no spec matches its config.json "
            f"(model_type={config.get('model_type')!r}) and tokenizer; pass family= one of {names}, "
            f"or spec='my_model.toml'"
        )
    raise AdapterError(
        f"{path} matches several families ({', '.join(m.name for m in matches)}); pass family= explicitly"
    )


def _read_json(p: Path) -> dict[str, Any]:
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise AdapterError(
            f"{p} is missing: a checkpoint directory needs its config.json"
        ) from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{p} is not valid JSON: {e}") from None


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model"))


def _tokenizer_vocab(path: Path) -> dict[str, int] | None:
    """Token strings of a stored tokenizer, read from its files without building it."""
    if not _has_tokenizer(path):
        return None
    tok = _auto_tokenizer(path)
    return dict(tok.get_vocab())


def _auto_tokenizer(path: Path, **kw: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), **kw)
    except Exception as e:  # transformers raises many types here; name the directory
        raise AdapterError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from e


def _lora_base(path: Path) -> Path | None:
    cfg_path = path / "adapter_config.json"
    if not cfg_path.exists():
        return None
    cfg = _read_json(cfg_path)
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{cfg_path}: field base_model_name_or_path is empty")
    base_path = Path(base)
    if not base_path.is_absolute():
        base_path = (path / base_path).resolve() if (path / base_path).is_dir() else base_path
    if not base_path.is_dir():
        raise AdapterError(
            f"{cfg_path}: base_model_name_or_path={base!r} is not a local directory; download the base "
            f"checkpoint (e.g. SpeechGPT-7B-cm for -com) and point the field at it"
        )
    return base_path


def _merge_lora(hf: Any, adapter_dir: Path) -> Any:
    try:
        from peft import PeftModel
    except ImportError:
        raise AdapterError(
            f"{adapter_dir} is a LoRA adapter (adapter_config.json); merging it needs peft: "
            f"pip install 'speech-lens[lora]'"
        ) from None
    try:
        merged = PeftModel.from_pretrained(hf, str(adapter_dir)).merge_and_unload()
    except Exception as e:
        raise WeightFileError(f"cannot apply the LoRA adapter in {adapter_dir}: {e}") from e
    return merged


def _weight_files(path: Path) -> list[Path]:
    index = [path / f for f in ("model.safetensors.index.json", "pytorch_model.bin.index.json")]
    for idx in index:
        if idx.exists():
            shards = sorted(set(_read_json(idx).get("weight_map", {}).values()))
            if not shards:
                raise WeightFileError(f"{idx}: weight_map is empty")
            files = [path / s for s in shards]
            for f in files:
                if not f.exists():
                    raise WeightFileError(
                        f"{idx} lists shard {f.name}, which is missing from {path}"
                    )
            return files
    for f in ("model.safetensors", "pytorch_model.bin"):
        if (path / f).exists():
            return [path / f]
    raise WeightFileError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, safetensors preferred; pickles loaded with ``weights_only``."""
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        out.update(_read_weight_file(f))
    return out


def _read_weight_file(f: Path) -> dict[str, torch.Tensor]:
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(f))
        except Exception as e:
            raise WeightFileError(f"weight file {f} is corrupt or not safetensors: {e}") from e
    try:
        sd = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightFileError(
            f"weight file {f} could not be loaded safely (weights_only=True refuses pickled code): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if not isinstance(sd, dict):
        raise WeightFileError(f"weight file {f} holds a {type(sd).__name__}, not a state dict")
    return sd


def _base_config_dict(config: dict[str, Any], spec: AdapterSpec, path: Path) -> dict[str, Any]:
    if spec.nested_config is None:
        return config
    base = config.get(spec.nested_config)
    if not isinstance(base, dict):
        raise AdapterError(
            f"{path / 'config.json'}: field {spec.nested_config!r} (the base LM config) is missing"
        )
    return base


def _load_hf_model(
    path: Path, config: dict[str, Any], spec: AdapterSpec, dtype: torch.dtype
) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(_base_config_dict(config, spec, path))
    arch = (base.get("architectures") or [None])[0]
    if spec.architectures and arch is not None and arch not in spec.architectures:
        raise AdapterError(
            f"{path / 'config.json'}: architecture {arch} is not one of {spec.name}'s "
            f"{', '.join(spec.architectures)}"
        )
    state = read_state_dict(path)
    if spec.weights_prefix:
        p = spec.weights_prefix
        if not any(k.startswith(p) for k in state):
            raise WeightFileError(
                f"weights in {path} have no keys with the {spec.name} prefix {p!r}"
            )
        state = {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
    emb = state.get("model.embed_tokens.weight")
    if emb is None:
        raise WeightFileError(f"weights in {path} have no model.embed_tokens.weight")
    base["vocab_size"] = int(emb.shape[0])  # SIMS: the nested config may predate the resize
    model_type = base.pop("model_type", None)
    if model_type is None:
        raise AdapterError(f"{path / 'config.json'}: no model_type in the (base) config")
    hf_config = AutoConfig.for_model(model_type, **base)
    hf_config._attn_implementation = "eager"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    expected = set(model.state_dict())
    if tied:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state))
    unexpected = sorted(k for k in set(state) - expected if "rotary_emb" not in k)
    if missing or unexpected:
        raise WeightFileError(
            f"weights in {path} do not match {model_type} config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    state = {
        k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items() if k in expected
    }
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    # buffers created on meta (rotary inv_freq) must be rebuilt on a real device
    _materialize_buffers(model, hf_config)
    return model


def _materialize_buffers(model: torch.nn.Module, hf_config: Any) -> None:
    for module in model.modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            with torch.device("cpu"):
                fresh = type(module)(config=hf_config)
            for bname, buf in fresh.named_buffers(recurse=False):
                module.register_buffer(bname, buf, persistent=False)
            if hasattr(fresh, "attention_scaling"):
                module.attention_scaling = fresh.attention_scaling
    leftovers = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftovers:
        raise WeightFileError(f"tensors left unloaded: {leftovers[:5]}")


def _is_tied(hf: Any) -> bool:
    out = hf.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()


def _load_tokenizer(
    path: Path, spec: AdapterSpec, base_tokenizer: str | Path | None
) -> tuple[Any, int]:
    """Tokenizer with every unit token; also the number of text tokens before the units."""
    if spec.tokenizer_source == "checkpoint":
        if not _has_tokenizer(path):
            raise AdapterError(
                f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); {spec.name} checkpoints store one"
            )
        tok = _auto_tokenizer(path)
        return tok, len(tok)
    if base_tokenizer is None:
        raise MissingTokenizerError(
            f"{spec.name} checkpoints store no tokenizer ({path}); pass base_tokenizer= the directory "
            f"of the base text tokenizer (e.g. Qwen2.5 or Llama-3.2), as slamkit does"
        )
    base_dir = Path(base_tokenizer)
    if not base_dir.is_dir() or not _has_tokenizer(base_dir):
        raise MissingTokenizerError(
            f"base_tokenizer {base_dir} is not a directory with tokenizer files"
        )
    return _rebuilt_tokenizer(base_dir, spec)


def _rebuilt_tokenizer(base_dir: Path, spec: AdapterSpec) -> tuple[Any, int]:
    """slamkit's recipe: base tokenizer + add_tokens(units, markers), saved to disk so that
    TransformerLens' BOS reload (pitfall P1) reads the extended tokenizer, not the base one."""
    tok = _auto_tokenizer(base_dir)
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
    key = hashlib.sha256(
        (str(base_dir.resolve()) + json.dumps(added) + str(n_text)).encode()
    ).hexdigest()[:16]
    cache = (
        Path(os.environ.get("SPEECH_LENS_CACHE", Path.home() / ".cache" / "speech_lens"))
        / "tokenizers"
        / key
    )
    if not (cache / "tokenizer_config.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(cache))
    return _auto_tokenizer(cache), n_text


def build_layout(
    spec: AdapterSpec,
    tokenizer: Any,
    rows: int,
    *,
    n_text: int,
    model_type: str = "",
    where: str = "",
) -> VocabLayout:
    """Check every spec'd id against the tokenizer and embedding, and describe the partition."""
    vocab = tokenizer.get_vocab()
    n_tok = len(tokenizer)
    at = f" in {where}" if where else ""

    def block(name: str, u: UnitSpec, default_first: int | None) -> UnitBlock:
        first_tok = u.pattern.format(k=0)
        if first_tok not in vocab:
            raise AdapterError(f"unit token {first_tok!r} is missing from the tokenizer{at}")
        first = vocab[first_tok]
        expected = u.first_id if u.first_id is not None else default_first
        if u.first_id is None and model_type in u.first_id_by_model_type:
            documented = u.first_id_by_model_type[model_type]
            if first != documented:
                raise AdapterError(
                    f"unit token {first_tok!r} has id {first}{at}, but {spec.name} on a {model_type} base "
                    f"documents {documented} (is the base tokenizer the right one?)"
                )
        if expected is not None and first != expected:
            raise AdapterError(
                f"unit token {first_tok!r} has id {first}{at}; the {spec.name} spec says {expected}"
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

    # first_id "after_text" is checkable only where we rebuilt the tokenizer ourselves
    after_text = n_text if spec.tokenizer_source == "base" else None
    units = block("units", spec.units, after_text if spec.units.first_id is None else None)
    prosody = {k: block(k, u, None) for k, u in spec.prosody.items()}

    def token_ids(tokens: dict[str, TokenSpec], kind: str) -> tuple[dict[str, int], dict[str, str]]:
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
                    f"{kind} token {t.token!r} has id {got}{at}; the {spec.name} spec says {want}"
                )
            ids[name], strs[name] = got, t.token
        return ids, strs

    marker_ids, marker_tokens = token_ids(spec.markers, "marker")
    control, _ = token_ids(spec.control, "control")
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
