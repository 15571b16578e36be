"""Adapter specs (one TOML per checkpoint family) and the one loader that reads them.

``load_model(path)`` detects the family, reads the weights (converting SIMS ``lm.``-prefixed
weights and merging LoRA adapters where needed), rebuilds or loads the tokenizer without losing
added unit tokens (TL pitfall P1), checks every documented id, and boots a ``TransformerBridge``.
"""

from __future__ import annotations

import json
import os
import tomllib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from speech_lens._tl import TransformerBridge, boot_bridge
from speech_lens.prompts import SPAN_SAMPLERS
from speech_lens.tokenizer_cache import atomic_cache_dir, cache_root, tokenizer_content_key
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
    # "after_text" families: first unit id of each released base (documentation; a base named
    # here whose tokenizer length differs gets a warning, not a refusal)
    released_first_ids: dict[str, int] = field(default_factory=dict)


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
    # how interleaved prompts choose their spoken words by default (prompts.SPAN_SAMPLERS)
    span_sampler: str = "poisson"


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
            if "first_id_by_model_type" in d:
                raise AdapterError(
                    f"spec {source}: {where}first_id_by_model_type is no longer read (unit ids "
                    f"follow len(base tokenizer)); name released bases in {where}released_first_ids"
                )
            if first != "after_text" and not isinstance(first, int):
                raise AdapterError(f"spec {source}: {where}first_id must be an int or 'after_text'")
            return UnitSpec(
                pattern=pattern,
                count=int(need(d, "count", where)),
                first_id=None if first == "after_text" else first,
                frame_rate=float(need(d, "frame_rate", where)),
                dedup=bool(d.get("dedup", True)),
                released_first_ids=dict(d.get("released_first_ids", {})),
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
        prompt = raw.get("prompt", {})
        if prompt.get("span_sampler", "poisson") not in SPAN_SAMPLERS:
            raise AdapterError(
                f"spec {source}: prompt.span_sampler {prompt['span_sampler']!r} is not one of "
                f"{', '.join(SPAN_SAMPLERS)}"
            )
        return cls(
            name=need(raw, "name", ""),
            description=raw.get("description", ""),
            architectures=tuple(raw.get("architectures", ())),
            units=unit_spec(need(raw, "units", ""), "units."),
            prompt=PromptSpec(**prompt),
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
        """Where input tokens go: the embedding's execution device (also under a device map,
        where the embedding may be offloaded and its parameter sits on ``meta``)."""
        return input_device(self.hf_model)

    @property
    def output_device(self) -> torch.device:
        """Where the logits come out (the unembedding's execution device): the same as
        ``device`` unless a device map put the unembedding elsewhere."""
        return execution_device(self.hf_model.get_output_embeddings())

    @property
    def device_map(self) -> dict[str, str | int] | None:
        """The accelerate device map the model was dispatched with (None: one device)."""
        dmap = getattr(self.hf_model, "hf_device_map", None)
        return dict(dmap) if dmap else None

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
            **({"devices": _device_summary(self.device_map)} if self.device_map else {}),
        }


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_model(
    path: str | Path,
    *,
    family: str | None = None,
    spec: str | Path | AdapterSpec | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    base_tokenizer: str | Path | None = None,
    memory_budget_gb: float | None = None,
    seq_len: int = 1024,
    device_map: str | dict[str, str | int] | None = None,
    max_memory: dict[str | int, str | int] | None = None,
    offload_folder: str | Path | None = None,
) -> SpeechLM:
    """Load a speech-text checkpoint directory into a ``TransformerBridge`` (eval mode).

    ``family`` names a shipped spec (``spiritlm``, ``spiritlm-expressive``, ``speechgpt``,
    ``sims``); ``spec`` is a user's own TOML spec; with neither, the family is detected.
    ``base_tokenizer`` is the base text tokenizer directory for families that store none (SIMS).
    Before reading any weight, the memory a lens run at ``seq_len`` positions needs is estimated
    and the load is refused when it exceeds ``memory_budget_gb`` (default: available RAM on CPU).

    Models that do not fit one device: ``device_map`` is ``"auto"`` (also ``"balanced"``,
    ``"balanced_low_0"``, ``"sequential"``) or a dict from module name to device (``0``,
    ``"cuda:1"``, ``"cpu"``, ``"disk"``), within ``max_memory`` (``{"0": "70GiB", "cpu":
    "100GiB"}``; default: free memory of each device); ``"disk"`` needs ``offload_folder``.
    Per device, weights + activations + lens buffers at ``seq_len`` are planned and the load is
    refused before any weight is read when they do not fit. Weights are then read tensor by
    tensor straight onto their device (or into ``offload_folder``), and accelerate's hooks move
    activations between devices; ``SpeechLM.device`` is where input tokens go.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"checkpoint {path} is not a directory")
    if device_map is not None and device is not None:
        raise AdapterError(
            f"pass device= or device_map=, not both (got device={device!r}, device_map={device_map!r})"
        )
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise AdapterError("max_memory= and offload_folder= need device_map= ('auto' or a dict)")
    if device_map is not None and memory_budget_gb is not None:
        raise AdapterError(
            "with device_map=, give per-device budgets as max_memory=, not memory_budget_gb="
        )
    dtype = dtype or torch.float32
    lora_base = _lora_base(path)
    weights_dir = lora_base or path
    config = _read_json(weights_dir / "config.json")
    tok_dir = path if _has_tokenizer(path) else weights_dir
    the_spec = _checkpoint_spec(path, weights_dir, config, tok_dir, family, spec)

    hf: Any
    if device_map is not None:
        hf, tied = _load_dispatched(
            weights_dir,
            config,
            the_spec,
            dtype,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
            seq_len=seq_len,
            lora_dir=path if lora_base is not None else None,
        )
    else:
        device = device if device is not None else "cpu"
        base_cfg = _base_config_dict(config, the_spec, weights_dir)
        est = estimate_memory(base_cfg, dtype, seq_len=seq_len)
        budget = memory_budget_gb if memory_budget_gb is not None else _available_gb(device)
        if budget is not None and est.total_gb > budget:
            raise AdapterError(
                f"{path} needs about {est.total_gb:.1f} GiB ({est}) but the budget is {budget:.1f} GiB; "
                f"use a smaller dtype (dtype=torch.bfloat16), fewer positions, device_map='auto' "
                f"with max_memory= to split it over devices, or a machine with more memory"
            )
        hf = _load_hf_model(weights_dir, config, the_spec, dtype)
        if lora_base is not None:
            hf = _merge_lora(hf, path)
        tied = _is_tied(hf)
    hf.eval()

    tokenizer, n_text = _load_tokenizer(tok_dir, the_spec, base_tokenizer)
    rows = int(hf.get_input_embeddings().weight.shape[0])
    if the_spec.tokenizer_source == "base":
        check_rebuilt_vocab(the_spec, config, weights_dir, rows, n_text, len(tokenizer))
        warn_if_unlike_release(the_spec, config, weights_dir, n_text, base_tokenizer)
    layout = build_layout(the_spec, tokenizer, rows, n_text=n_text, where=str(path))
    bridge = boot_bridge(
        str(path), hf, tokenizer, device=device if device_map is None else None, dtype=dtype
    )
    if device_map is not None:
        # TL reads the embedding parameter's device, which is meta when it is offloaded
        bridge.cfg.device = str(input_device(hf))
    return SpeechLM(
        bridge=bridge, tokenizer=tokenizer, layout=layout, spec=the_spec, path=path, tied=tied
    )


def _checkpoint_spec(
    path: Path,
    weights_dir: Path,
    config: dict[str, Any],
    tok_dir: Path,
    family: str | None,
    spec: str | Path | AdapterSpec | None,
) -> AdapterSpec:
    if spec is not None:
        return get_spec(spec)
    if family is None and (path / CHECKPOINT_SPEC).exists():
        return AdapterSpec.from_toml(path / CHECKPOINT_SPEC)
    if family is not None:
        return get_spec(family)
    return detect_family(weights_dir, config, tok_dir)


def plan_load(
    path: str | Path,
    device_map: str | dict[str, str | int],
    *,
    family: str | None = None,
    spec: str | Path | AdapterSpec | None = None,
    dtype: torch.dtype | None = None,
    max_memory: dict[str | int, str | int] | None = None,
    offload_folder: str | Path | None = None,
    seq_len: int = 1024,
) -> DevicePlan:
    """Where ``load_model(path, device_map=...)`` would put every module and what each device
    would hold, from the config and the weight files' headers alone (no weight is read).
    Raises the same ``AdapterError`` the load would when a device cannot hold its part."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"checkpoint {path} is not a directory")
    weights_dir = _lora_base(path) or path
    config = _read_json(weights_dir / "config.json")
    tok_dir = path if _has_tokenizer(path) else weights_dir
    the_spec = _checkpoint_spec(path, weights_dir, config, tok_dir, family, spec)
    folder = Path(offload_folder) if offload_folder is not None else None
    return _plan_dispatch(
        weights_dir,
        config,
        the_spec,
        dtype or torch.float32,
        device_map,
        max_memory,
        folder,
        seq_len,
    )[3]


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
    config: dict[str, Any],
    dtype: torch.dtype,
    *,
    seq_len: int = 1024,
    lens_chunk: int | None = None,
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
    layer, logits, lens = _activation_parts(config, dtype, seq_len, lens_chunk)
    return MemoryEstimate(weights=n_params * width, activations=layer + logits, lens=lens)


def _activation_parts(
    config: dict[str, Any], dtype: torch.dtype, seq_len: int, lens_chunk: int | None = None
) -> tuple[int, int, int]:
    """Bytes of (one decoder layer's activations, the fp32 logits, the lens buffers: up to
    three fp32 ``[chunk, vocab]`` blocks, chunk as the streaming lens picks it by default)."""
    from speech_lens.hooks import DEFAULT_CHUNK_ELEMENTS

    d = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    ff = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    width = torch.finfo(dtype).bits // 8
    # eager attention holds one layer's [heads, pos, pos] scores; logits [pos, vocab] in fp32
    layer = heads * seq_len * seq_len * width * 2 + seq_len * (4 * d + 2 * ff) * width
    chunk = lens_chunk or min(seq_len, max(1, DEFAULT_CHUNK_ELEMENTS // vocab))
    return layer, seq_len * vocab * 4, 3 * chunk * vocab * 4


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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_from_args(args: Any, checkpoint: str | Path | None = None, **kw: Any) -> SpeechLM:
    """``load_model`` with the checkpoint options every CLI command shares
    (``--family``, ``--spec``, ``--base-tokenizer``, and where the parser has them
    ``--dtype``, ``--device-map``, ``--max-memory``, ``--offload-folder``); ``kw`` wins."""
    opts: dict[str, Any] = {}
    dtype = getattr(args, "dtype", None)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise AdapterError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
        opts["dtype"] = DTYPES[dtype]
    device_map = parse_device_map(getattr(args, "device_map", None))
    if device_map is not None:
        opts["device_map"] = device_map
    max_memory = parse_max_memory(getattr(args, "max_memory", None))
    if max_memory is not None:
        opts["max_memory"] = max_memory
    if getattr(args, "offload_folder", None) is not None:
        opts["offload_folder"] = args.offload_folder
    opts.update(kw)
    return load_model(
        checkpoint if checkpoint is not None else args.checkpoint,
        family=args.family,
        spec=args.spec,
        base_tokenizer=args.base_tokenizer,
        **opts,
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
    return _load_pickle(f)


def _base_config_dict(config: dict[str, Any], spec: AdapterSpec, path: Path) -> dict[str, Any]:
    if spec.nested_config is None:
        return config
    base = config.get(spec.nested_config)
    if not isinstance(base, dict):
        raise AdapterError(
            f"{path / 'config.json'}: field {spec.nested_config!r} (the base LM config) is missing"
        )
    return base


def _empty_model(
    path: Path, config: dict[str, Any], spec: AdapterSpec, dtype: torch.dtype, rows: int
) -> tuple[Any, Any]:
    """The HF model on the meta device (no memory), with ``rows`` embedding rows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(_base_config_dict(config, spec, path))
    arch = (base.get("architectures") or [None])[0]
    if spec.architectures and arch is not None and arch not in spec.architectures:
        raise AdapterError(
            f"{path / 'config.json'}: architecture {arch} is not one of {spec.name}'s "
            f"{', '.join(spec.architectures)}"
        )
    base["vocab_size"] = rows  # SIMS: the nested config may predate the resize
    model_type = base.pop("model_type", None)
    if model_type is None:
        raise AdapterError(f"{path / 'config.json'}: no model_type in the (base) config")
    hf_config = AutoConfig.for_model(model_type, **base)
    hf_config._attn_implementation = "eager"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model, hf_config


def _expected_keys(model: torch.nn.Module, tied: bool) -> set[str]:
    expected = set(model.state_dict())
    if tied:
        expected.discard("lm_head.weight")
    return expected


def _check_keys(path: Path, keys: set[str], expected: set[str], model: Any) -> None:
    missing = sorted(expected - keys)
    unexpected = sorted(k for k in keys - expected if "rotary_emb" not in k)
    if missing or unexpected:
        raise WeightFileError(
            f"weights in {path} do not match {model.config.model_type} config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )


def _strip_prefix(path: Path, spec: AdapterSpec, keys: list[str]) -> dict[str, str]:
    """Checkpoint key -> model key (SIMS stores the LM under ``lm.``)."""
    p = spec.weights_prefix
    if not p:
        return {k: k for k in keys}
    if not any(k.startswith(p) for k in keys):
        raise WeightFileError(f"weights in {path} have no keys with the {spec.name} prefix {p!r}")
    return {k: k[len(p) :] for k in keys if k.startswith(p)}


def _load_hf_model(
    path: Path, config: dict[str, Any], spec: AdapterSpec, dtype: torch.dtype
) -> torch.nn.Module:
    state = read_state_dict(path)
    names = _strip_prefix(path, spec, list(state))
    state = {names[k]: v for k, v in state.items() if k in names}
    emb = state.get("model.embed_tokens.weight")
    if emb is None:
        raise WeightFileError(f"weights in {path} have no model.embed_tokens.weight")
    model, hf_config = _empty_model(path, config, spec, dtype, int(emb.shape[0]))
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    expected = _expected_keys(model, tied)
    _check_keys(path, set(state), expected, model)
    state = {
        k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items() if k in expected
    }
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    # buffers created on meta (rotary inv_freq) must be rebuilt on a real device
    _materialize_buffers(model, hf_config)
    return model


def _materialize_buffers(model: torch.nn.Module, hf_config: Any, check: bool = True) -> None:
    for module in model.modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            with torch.device("cpu"):
                fresh = type(module)(config=hf_config)
            for bname, buf in fresh.named_buffers(recurse=False):
                module.register_buffer(bname, buf, persistent=False)
            if hasattr(fresh, "attention_scaling"):
                module.attention_scaling = fresh.attention_scaling
    leftovers = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if check and leftovers:
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
    # keyed by the base tokenizer's content; written whole then renamed (torchrun ranks race here)
    key = tokenizer_content_key(base_dir, added)
    cache = atomic_cache_dir(
        cache_root() / "tokenizers" / key, lambda d: tok.save_pretrained(str(d))
    )
    return _auto_tokenizer(cache), n_text


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
    base = _base_config_dict(config, spec, path)
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

    def block(name: str, u: UnitSpec, default_first: int | None) -> UnitBlock:
        first_tok = u.pattern.format(k=0)
        if first_tok not in vocab:
            raise AdapterError(f"unit token {first_tok!r} is missing from the tokenizer{at}")
        first = vocab[first_tok]
        expected = u.first_id if u.first_id is not None else default_first
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


# --------------------------------------------------------------------------------------------
# Device maps: one model split over several devices (accelerate dispatch, then the bridge)
# --------------------------------------------------------------------------------------------

AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
Device = int | str  # a CUDA index, "cpu", "mps" or "disk" (accelerate's spelling)
GiB = 2**30


@dataclass(frozen=True)
class DeviceUse:
    """Planned bytes on one device; ``budget`` None means unknown (not checked)."""

    device: str
    weights: int
    activations: int
    lens: int
    budget: int | None

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.lens

    def __str__(self) -> str:
        budget = "unknown" if self.budget is None else f"{self.budget / GiB:.3f} GiB"
        return (
            f"{self.device}: {self.total / GiB:.3f} GiB (weights {self.weights / GiB:.3f} + "
            f"activations {self.activations / GiB:.3f} + lens buffers {self.lens / GiB:.3f}) "
            f"of budget {budget}"
        )


@dataclass(frozen=True)
class DevicePlan:
    """Where every placement unit goes, and what each device must hold for a lens run."""

    device_map: dict[str, Device]
    main_device: Device
    uses: tuple[DeviceUse, ...]
    seq_len: int

    def __str__(self) -> str:
        return "; ".join(str(u) for u in self.uses)

    def check(self, where: str) -> None:
        over = [u for u in self.uses if u.budget is not None and u.total > u.budget]
        if over:
            raise AdapterError(
                f"{where} does not fit the device map at seq_len={self.seq_len}: "
                + "; ".join(f"device {u}" for u in over)
                + f" (plan: {self}); raise max_memory, map fewer modules there, use "
                "dtype=torch.bfloat16, fewer positions, or spill to disk with offload_folder="
            )


def parse_device_map(text: str | dict[str, Any] | None) -> str | dict[str, str | int] | None:
    """``--device-map`` value: ``auto`` (or another accelerate strategy) or a JSON object."""
    if text is None or isinstance(text, dict):
        return text
    if text.strip() in AUTO_DEVICE_MAPS:
        return text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterError(
            f"--device-map {text!r} is neither one of {', '.join(AUTO_DEVICE_MAPS)} nor JSON: {e}"
        ) from None
    if not isinstance(value, dict):
        raise AdapterError(f"--device-map {text!r}: JSON must be an object (module -> device)")
    return value


def parse_max_memory(text: str | dict[Any, Any] | None) -> dict[str | int, str | int] | None:
    """``--max-memory`` value: a JSON object from device to size, e.g. ``{"0": "70GiB"}``."""
    if text is None or isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterError(f"--max-memory {text!r} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise AdapterError(f'--max-memory {text!r}: expected an object like {{"0": "70GiB"}}')
    return value


def _normalize_device(what: str, value: Any, offload_folder: Path | None) -> Device:
    """Accelerate's device spelling (int for CUDA); refuses devices this machine does not have."""
    n_cuda = torch.cuda.device_count()
    here = f"this machine has {n_cuda} CUDA device(s)" + (f" (0..{n_cuda - 1})" if n_cuda else "")
    idx: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        idx = value
    elif isinstance(value, str):
        t = value.strip().lower()
        if t in ("cpu", "disk"):
            if t == "disk" and offload_folder is None:
                raise AdapterError(f"{what} = 'disk' needs offload_folder= (--offload-folder)")
            return t
        if t == "mps":
            if not torch.backends.mps.is_available():
                raise AdapterError(f"{what} = 'mps': no MPS device on this machine")
            return t
        if t.isdigit():
            idx = int(t)
        elif t == "cuda":
            idx = 0
        elif t.startswith("cuda:") and t[5:].isdigit():
            idx = int(t[5:])
    if idx is None:
        raise AdapterError(
            f"{what} = {value!r} is not a device: use a CUDA index (0, 'cuda:1'), 'cpu' or 'disk'"
        )
    if not 0 <= idx < n_cuda:
        raise AdapterError(f"{what} = {value!r}: no such device, {here}; or use 'cpu' / 'disk'")
    return idx


def _torch_device(d: Device) -> torch.device:
    return torch.device("cuda", d) if isinstance(d, int) else torch.device(d)


def _size_bytes(what: str, value: Any) -> int:
    from accelerate.utils import convert_file_size_to_int

    try:
        n = int(convert_file_size_to_int(value))
    except (ValueError, TypeError):
        raise AdapterError(
            f"{what} = {value!r} is not a size (e.g. '70GiB', '500MB', bytes)"
        ) from None
    if n < 0:
        raise AdapterError(f"{what} = {value!r} is negative")
    return n


def _budgets(max_memory: dict[Any, Any] | None, offload_folder: Path | None) -> dict[Device, int]:
    """Per-device budgets in bytes: as given, else the free memory of every device found."""
    if max_memory is not None:
        out: dict[Device, int] = {}
        for k, v in max_memory.items():
            d = _normalize_device(f"max_memory key {k!r}", k, offload_folder or Path("."))
            out[d] = _size_bytes(f"max_memory[{k!r}]", v)
        return out
    found: dict[Device, int] = {}
    for i in range(torch.cuda.device_count()):
        found[i] = int(torch.cuda.mem_get_info(i)[0])
    if found:  # TL 4.3 refuses GPU maps with CPU offload: name the CPU in max_memory to try
        return found
    cpu = _available_gb("cpu")
    if cpu is not None:
        found["cpu"] = int(cpu * GiB)
    return found


def _measured_budget(d: Device, offload_folder: Path | None) -> int | None:
    if isinstance(d, int):
        return int(torch.cuda.mem_get_info(d)[0])
    if d == "cpu":
        gb = _available_gb("cpu")
        return None if gb is None else int(gb * GiB)
    if d == "disk" and offload_folder is not None:
        import shutil

        p = offload_folder
        while not p.exists() and p != p.parent:
            p = p.parent
        return int(shutil.disk_usage(p).free)
    return None


def _placement_units(model: torch.nn.Module) -> list[str]:
    """Modules that go to one device whole: no-split blocks (decoder layers), and leaves
    with tensors. The lens calls the final norm and the unembedding directly, so each must
    carry its own accelerate hook, which a coarser map (``{"model": 0}``) would not give it."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    units: list[str] = []

    def walk(name: str, m: torch.nn.Module) -> None:
        own = any(True for _ in m.parameters(recurse=False)) or any(
            True for _ in m.buffers(recurse=False)
        )
        children = list(m.named_children())
        if type(m).__name__ in no_split or not children or own:
            if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
                units.append(name)
            return
        for c, cm in children:
            walk(f"{name}.{c}" if name else c, cm)

    walk("", model)
    return units


def _owner(name: str, keys: Any) -> str | None:
    owners = [k for k in keys if k == "" or name == k or name.startswith(k + ".")]
    return max(owners, key=len) if owners else None


def _expand_device_map(
    model: torch.nn.Module, dmap: dict[str, Any], offload_folder: Path | None
) -> dict[str, Device]:
    """A user's (or accelerate's) map, checked and rewritten at placement-unit granularity."""
    units = _placement_units(model)
    modules = dict(model.named_modules())
    bad = [k for k in dmap if k and k not in modules]
    if bad:
        raise AdapterError(
            f"device_map names no module of this model: {bad[:5]}; its modules are "
            f"{', '.join(units[:4])}, ..., {units[-1]} (or '' for all)"
        )
    out: dict[str, Device] = {}
    uncovered = []
    for u in units:
        inner = [k for k in dmap if k.startswith(u + ".")]
        if inner:
            raise AdapterError(
                f"device_map splits {u} ({type(modules[u]).__name__}, which stays on one device): "
                f"{inner[:3]}; map {u!r} as a whole"
            )
        key = _owner(u, dmap)
        if key is None:
            uncovered.append(u)
            continue
        out[u] = _normalize_device(f"device_map[{key!r}]", dmap[key], offload_folder)
    if uncovered:
        raise AdapterError(
            f"device_map places no device for {', '.join(uncovered[:5])}"
            f"{'...' if len(uncovered) > 5 else ''}; add them or a '' entry for the rest"
        )
    from accelerate.utils import find_tied_parameters

    for group in find_tied_parameters(model):
        devs = {out[k] for n in group if (k := _owner(n, out)) is not None}
        if len(devs) > 1:
            raise AdapterError(
                f"device_map puts the tied weights {', '.join(group)} on different devices "
                f"{sorted(map(str, devs))}; map them to one device"
            )
    return out


def _module_name(model: torch.nn.Module, module: Any) -> str:
    for n, m in model.named_modules():
        if m is module:
            return n
    raise AdapterError(f"module {type(module).__name__} is not part of the model")


def _main_device(dmap: dict[str, Device], embed_unit: str) -> Device:
    """Execution device of offloaded modules and of the inputs: the embedding's device when it
    is an accelerator, else the lowest-numbered GPU in the map, else the CPU."""
    emb = dmap[embed_unit]
    if emb not in ("cpu", "disk"):
        return emb
    gpus = sorted(d for d in dmap.values() if isinstance(d, int))
    return gpus[0] if gpus else ("mps" if "mps" in dmap.values() else "cpu")


def plan_devices(
    model: Any,
    dmap: dict[str, Device],
    base_config: dict[str, Any],
    dtype: torch.dtype,
    *,
    seq_len: int,
    budgets: dict[Device, int],
    offload_folder: Path | None,
) -> DevicePlan:
    """Bytes per device for a lens run at ``seq_len``: resident weights; one decoder layer's
    activations on each device that runs a layer; logits and lens buffers on the device that
    runs the unembedding; and, on the main device, the largest offloaded unit while it runs."""
    width = torch.finfo(dtype).bits // 8
    unit_bytes = dict.fromkeys(dmap, 0)
    for n, t in (*model.named_parameters(), *model.named_buffers()):
        u = _owner(n, dmap)
        if u is not None:
            w = width if t.is_floating_point() and isinstance(t, torch.nn.Parameter) else None
            unit_bytes[u] += t.numel() * (w or t.element_size())
    embed_unit = _owner(_module_name(model, model.get_input_embeddings()), dmap) or ""
    head_unit = _owner(_module_name(model, model.get_output_embeddings()), dmap) or ""
    main = _main_device(dmap, embed_unit)

    def runs_on(d: Device) -> Device:
        return main if d == "disk" or (d == "cpu" and main != "cpu") else d

    layer, logits, lens = _activation_parts(base_config, dtype, seq_len)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    modules = dict(model.named_modules())
    weights: dict[Device, int] = {}
    acts: dict[Device, int] = {}
    lens_on: dict[Device, int] = {}
    for u, d in dmap.items():
        weights[d] = weights.get(d, 0) + unit_bytes[u]
        acts.setdefault(runs_on(d), 0)
        if type(modules[u]).__name__ in no_split:
            acts[runs_on(d)] = layer
    head = runs_on(dmap[head_unit])
    acts[head] = acts.get(head, 0) + logits
    lens_on[head] = lens
    offloaded = [unit_bytes[u] for u, d in dmap.items() if runs_on(d) != d]
    if offloaded:
        acts[main] = acts.get(main, 0) + max(offloaded)
    devices = sorted({*weights, *acts}, key=lambda d: (isinstance(d, str), str(d)))
    uses = tuple(
        DeviceUse(
            device=f"cuda:{d}" if isinstance(d, int) else d,
            weights=weights.get(d, 0),
            activations=acts.get(d, 0),
            lens=lens_on.get(d, 0),
            budget=budgets[d] if d in budgets else _measured_budget(d, offload_folder),
        )
        for d in devices
    )
    return DevicePlan(device_map=dmap, main_device=main, uses=uses, seq_len=seq_len)


def _auto_device_map(
    model: torch.nn.Module,
    kind: str,
    budgets: dict[Device, int],
    base_config: dict[str, Any],
    dtype: torch.dtype,
    *,
    seq_len: int,
    offload_folder: Path | None,
    where: str,
) -> dict[str, Any]:
    """accelerate's placement within the budgets left after activations and lens buffers."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    if kind not in AUTO_DEVICE_MAPS:
        raise AdapterError(
            f"device_map={kind!r}: use one of {', '.join(AUTO_DEVICE_MAPS)} or a dict"
        )
    layer, logits, lens = _activation_parts(base_config, dtype, seq_len)
    reserve = layer + logits + lens
    left = {d: max(b - reserve, 0) for d, b in budgets.items() if d != "disk"}
    width = torch.finfo(dtype).bits // 8
    need = sum(
        p.numel() * (width if p.is_floating_point() else p.element_size())
        for p in model.parameters()
    )
    if offload_folder is None and need > sum(left.values()):
        rows = "; ".join(
            f"{'cuda:' if isinstance(d, int) else ''}{d}: budget {b / GiB:.3f} GiB - "
            f"{reserve / GiB:.3f} GiB activations and lens buffers = {left[d] / GiB:.3f} GiB for weights"
            for d, b in budgets.items()
            if d != "disk"
        )
        smaller = "use dtype=torch.bfloat16, " if width > 2 else ""
        raise AdapterError(
            f"{where} needs {need / GiB:.3f} GiB of weights ({dtype}) but the budgets hold "
            f"{sum(left.values()) / GiB:.3f} GiB at seq_len={seq_len} ({rows}); raise max_memory, "
            f"add devices, {smaller}or spill to disk with offload_folder="
        )
    no_split = list(getattr(model, "_no_split_modules", None) or ())
    gpus = [d for d in left if isinstance(d, int)]
    mm: dict[Any, int] = dict(left)
    if kind != "sequential" and len(gpus) > 1:
        mm = get_balanced_memory(
            model,
            max_memory=mm,
            no_split_module_classes=no_split,
            dtype=dtype,
            low_zero=kind == "balanced_low_0",
        )
    dmap = infer_auto_device_map(
        model, max_memory=mm, no_split_module_classes=no_split, dtype=dtype, clean_result=False
    )
    if "disk" in dmap.values() and offload_folder is None:
        spilled = [k for k, v in dmap.items() if v == "disk"]
        raise AdapterError(
            f"{where} does not fit the budgets {_fmt_budgets(left)} (weights {need / GiB:.3f} GiB; "
            f"accelerate also keeps room for the largest offloaded layer): {spilled[:3]}... would "
            f"go to disk; raise max_memory or pass offload_folder="
        )
    return dict(dmap)


def _fmt_budgets(b: dict[Device, int]) -> str:
    return ", ".join(
        f"{'cuda:' if isinstance(d, int) else ''}{d}={v / GiB:.3f} GiB" for d, v in b.items()
    )


def resolve_device_map(
    model: torch.nn.Module,
    device_map: str | dict[str, Any],
    *,
    base_config: dict[str, Any],
    dtype: torch.dtype,
    seq_len: int,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: Path | None = None,
    where: str = "the model",
) -> DevicePlan:
    """Check a device map against the (meta) model and the budgets; nothing is read or moved.

    Refuses, naming the device and the numbers, when a device cannot hold what is planned."""
    from speech_lens._tl import check_device_map_supported

    budgets = _budgets(max_memory, offload_folder)
    if isinstance(device_map, str):
        raw = _auto_device_map(
            model,
            device_map,
            budgets,
            base_config,
            dtype,
            seq_len=seq_len,
            offload_folder=offload_folder,
            where=where,
        )
    elif isinstance(device_map, dict):
        raw = dict(device_map)
    else:
        raise AdapterError(
            f"device_map must be a string or a dict, not {type(device_map).__name__}"
        )
    dmap = _expand_device_map(model, raw, offload_folder)
    try:
        check_device_map_supported(dmap.values())
    except ValueError as e:
        raise AdapterError(f"device map {_device_summary(dmap)} for {where}: {e}") from None
    plan = plan_devices(
        model,
        dmap,
        base_config,
        dtype,
        seq_len=seq_len,
        budgets=budgets,
        offload_folder=offload_folder,
    )
    plan.check(where)
    return plan


def _device_summary(dmap: dict[str, Any] | None) -> dict[str, int]:
    """Placement units per device, e.g. ``{"cuda:0": 9, "cuda:1": 8}``."""
    out: dict[str, int] = {}
    for d in (dmap or {}).values():
        k = f"cuda:{d}" if isinstance(d, int) else str(d)
        out[k] = out.get(k, 0) + 1
    return out


def input_device(hf: Any) -> torch.device:
    """Where input ids must go: the embedding's execution device."""
    return execution_device(hf.get_input_embeddings())


def execution_device(module: Any) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device when dispatched
    (its parameters may sit on ``meta`` or the CPU), else its first parameter's device."""
    module = getattr(module, "original_component", None) or module  # a TL bridge component
    hook = getattr(module, "_hf_hook", None)
    for h in [hook, *getattr(hook, "hooks", ())]:
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return _torch_device(dev) if isinstance(dev, int | str) else torch.device(dev)
    return next(module.parameters()).device


def _checkpoint_keys(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the weight files' headers (safetensors) or lazily mapped
    pickles: nothing is read into memory."""
    out: dict[str, tuple[int, ...]] = {}
    for f in _weight_files(path):
        if f.suffix == ".safetensors":
            out.update(_safetensors_items(f, lambda sf, k: tuple(sf.get_slice(k).get_shape())))
        else:
            out.update({k: tuple(v.shape) for k, v in _load_pickle(f, mmap=True).items()})
    return out


def _safetensors_items(f: Path, read: Callable[[Any, str], Any]) -> Iterator[tuple[str, Any]]:
    """``(name, read(handle, name))`` for each tensor of a safetensors file, opened lazily (one
    tensor or header at a time); a file that cannot be read is a ``WeightFileError`` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield k, read(sf, k)
    except Exception as e:
        raise WeightFileError(f"weight file {f} is corrupt or not safetensors: {e}") from e


def _load_pickle(f: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict, read with ``weights_only=True``: pickled code is refused, never run."""
    try:
        sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise WeightFileError(
            f"weight file {f} could not be loaded safely (weights_only=True refuses pickled code): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if not isinstance(sd, dict):
        raise WeightFileError(f"weight file {f} holds a {type(sd).__name__}, not a state dict")
    return sd


def iter_state_dict(path: Path) -> Any:
    """``(name, tensor)`` one at a time, file by file: at most one tensor is in memory."""
    for f in _weight_files(path):
        if f.suffix == ".safetensors":
            yield from _safetensors_items(f, lambda sf, k: sf.get_tensor(k))
        else:
            yield from _load_pickle(f, mmap=True).items()


def _plan_dispatch(
    path: Path,
    config: dict[str, Any],
    spec: AdapterSpec,
    dtype: torch.dtype,
    device_map: str | dict[str, Any],
    max_memory: dict[Any, Any] | None,
    folder: Path | None,
    seq_len: int,
) -> tuple[Any, Any, dict[str, str], DevicePlan]:
    """Meta model, checkpoint-key -> model-key map and the checked plan, from headers only."""
    shapes = _checkpoint_keys(path)
    names = _strip_prefix(path, spec, list(shapes))
    emb_key = next((k for k, v in names.items() if v == "model.embed_tokens.weight"), None)
    if emb_key is None:
        raise WeightFileError(f"weights in {path} have no model.embed_tokens.weight")
    model, hf_config = _empty_model(path, config, spec, dtype, int(shapes[emb_key][0]))
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    if tied:
        model.tie_weights()
    expected = _expected_keys(model, tied)
    _check_keys(path, set(names.values()), expected, model)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = [
        f"{k} {shapes[k]} (model: {model_shapes[n]})"
        for k, n in names.items()
        if n in expected and shapes[k] != model_shapes[n]
    ]
    if bad:
        raise WeightFileError(f"weights in {path} do not match the config's shapes: {bad[:3]}")
    base_config = {**_base_config_dict(config, spec, path), "vocab_size": int(shapes[emb_key][0])}
    plan = resolve_device_map(
        model,
        device_map,
        base_config=base_config,
        dtype=dtype,
        seq_len=seq_len,
        max_memory=max_memory,
        offload_folder=folder,
        where=str(path),
    )
    return model, hf_config, names, plan


def _load_dispatched(
    path: Path,
    config: dict[str, Any],
    spec: AdapterSpec,
    dtype: torch.dtype,
    *,
    device_map: str | dict[str, Any],
    max_memory: dict[Any, Any] | None,
    offload_folder: str | Path | None,
    seq_len: int,
    lora_dir: Path | None,
) -> tuple[torch.nn.Module, bool]:
    """Plan on the meta model, then read tensor by tensor onto its device (or into the offload
    folder), then let accelerate hook the model so activations follow the weights."""
    from accelerate import dispatch_model
    from accelerate.utils import offload_weight, set_module_tensor_to_device

    folder = Path(offload_folder) if offload_folder is not None else None
    model, hf_config, names, plan = _plan_dispatch(
        path, config, spec, dtype, device_map, max_memory, folder, seq_len
    )
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    expected = _expected_keys(model, tied)
    dmap = plan.device_map
    on_disk = "disk" in dmap.values()
    if lora_dir is not None and on_disk:
        raise AdapterError(
            f"{lora_dir} is a LoRA adapter: merging it needs every weight in memory, but the "
            f"device map sends {[k for k, v in dmap.items() if v == 'disk'][:3]} to disk; "
            "raise max_memory or merge the adapter once and save the merged checkpoint"
        )
    _materialize_buffers(model, hf_config, check=False)  # rotary inv_freq, rebuilt on the CPU
    index: dict[str, Any] = {}
    if on_disk and folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    head_on_disk = tied and dmap.get(_owner("lm_head.weight", dmap) or "") == "disk"
    for key, tensor in iter_state_dict(path):
        name = names.get(key)
        if name is None or name not in expected:
            continue
        value = tensor.to(dtype) if tensor.is_floating_point() else tensor
        dev = dmap[_owner(name, dmap) or ""]
        if dev == "disk":
            offload_weight(value, name, str(folder), index)
            if head_on_disk and name == "model.embed_tokens.weight":  # tied: hook reads lm_head's
                offload_weight(value, "lm_head.weight", str(folder), index)
        else:
            set_module_tensor_to_device(model, name, _torch_device(dev), value=value)
        del tensor, value
    if on_disk and folder is not None:
        # overwrite (accelerate's save_offload_index would merge into a stale index)
        tmp = folder / "index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, folder / "index.json")
    if tied:
        model.tie_weights()
    disk_units = [u for u, d in dmap.items() if d == "disk"]
    left = [
        n
        for n, t in (*model.named_parameters(), *model.named_buffers())
        if t.is_meta and _owner(n, disk_units) is None
    ]
    if left:
        raise WeightFileError(f"tensors left unloaded from {path}: {left[:5]}")
    if lora_dir is not None:
        model = _merge_lora(model, lora_dir)
    model.eval()
    import logging

    # accelerate warns of "offloaded to the cpu" for any "cpu" entry, also when the CPU is
    # where everything runs (nothing is offloaded then)
    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    if plan.main_device == "cpu" and not on_disk:
        log.setLevel(logging.ERROR)
    try:
        dispatch_model(
            model,
            device_map=dict(dmap),
            main_device=plan.main_device,
            offload_dir=str(folder) if on_disk else None,
            force_hooks=True,  # a hook per unit even on one device: the lens calls them directly
        )
    finally:
        log.setLevel(level)
    model.hf_device_map = dict(dmap)  # what TL (and from_pretrained) read
    return model, tied
