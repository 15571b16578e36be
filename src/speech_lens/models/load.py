"""Adapter specs (one TOML per checkpoint family) and the one loader that reads them.

``load_model(path)`` detects the family, reads the weights (converting SIMS ``lm.``-prefixed
weights and merging LoRA adapters where needed), rebuilds or loads the tokenizer without losing
added unit tokens (TL pitfall P1), checks every documented id, and boots a ``TransformerBridge``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from speech_lens._tl import TransformerBridge, boot_bridge
from speech_lens.models.build import (
    check_keys,
    empty_model,
    expected_keys,
    materialize_buffers,
    strip_prefix,
)
from speech_lens.models.checkpoint import (
    base_config_dict,
    has_tokenizer,
    lora_base_path,
    merge_lora,
    read_json,
    read_state_dict,
    spec_in_checkpoint,
)
from speech_lens.models.devices import (
    device_summary,
    execution_device,
    free_memory_gb,
    input_device,
)
from speech_lens.models.dispatch import load_dispatched
from speech_lens.models.layout import (
    build_layout,
    check_rebuilt_vocab,
    load_tokenizer,
    warn_if_unlike_release,
)
from speech_lens.models.memory import estimate_memory
from speech_lens.models.spec import AdapterError, AdapterSpec, WeightFileError
from speech_lens.vocab import VocabLayout

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
            **({"devices": device_summary(self.device_map)} if self.device_map else {}),
        }


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def check_placement_options(
    device: Any, device_map: Any, max_memory: Any, offload_folder: Any, memory_budget_gb: Any
) -> None:
    """Refuse option combinations ``load_model`` cannot honour, naming them."""
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


def check_fits(
    path: Path,
    base_cfg: dict[str, Any],
    dtype: torch.dtype,
    seq_len: int,
    device: Any,
    memory_budget_gb: float | None,
) -> None:
    """Refuse, before any weight is read, a model whose lens run at ``seq_len`` needs more than
    ``memory_budget_gb`` (default: the device's free memory)."""
    est = estimate_memory(base_cfg, dtype, seq_len=seq_len)
    budget = memory_budget_gb if memory_budget_gb is not None else free_memory_gb(device)
    if budget is not None and est.total_gb > budget:
        raise AdapterError(
            f"{path} needs about {est.total_gb:.1f} GiB ({est}) but the budget is {budget:.1f} GiB; "
            f"use a smaller dtype (dtype=torch.bfloat16), fewer positions, device_map='auto' "
            f"with max_memory= to split it over devices, or a machine with more memory"
        )


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
    check_placement_options(device, device_map, max_memory, offload_folder, memory_budget_gb)
    dtype = dtype or torch.float32
    lora_base = lora_base_path(path)
    weights_dir = lora_base or path
    config = read_json(weights_dir / "config.json")
    tok_dir = path if has_tokenizer(path) else weights_dir
    the_spec = spec_in_checkpoint(path, weights_dir, config, tok_dir, family, spec)

    hf: Any
    if device_map is not None:
        hf, tied = load_dispatched(
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
        base_cfg = base_config_dict(config, the_spec, weights_dir)
        check_fits(path, base_cfg, dtype, seq_len, device, memory_budget_gb)
        hf = _load_hf_model(weights_dir, config, the_spec, dtype)
        if lora_base is not None:
            hf = merge_lora(hf, path)
        tied = _is_tied(hf)
    hf.eval()

    tokenizer, n_text = load_tokenizer(tok_dir, the_spec, base_tokenizer)
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_hf_model(
    path: Path, config: dict[str, Any], spec: AdapterSpec, dtype: torch.dtype
) -> torch.nn.Module:
    state = read_state_dict(path)
    names = strip_prefix(path, spec, list(state))
    state = {names[k]: v for k, v in state.items() if k in names}
    emb = state.get("model.embed_tokens.weight")
    if emb is None:
        raise WeightFileError(f"weights in {path} have no model.embed_tokens.weight")
    model, hf_config = empty_model(path, config, spec, dtype, int(emb.shape[0]))
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    expected = expected_keys(model, tied)
    check_keys(path, set(state), expected, model)
    state = {
        k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items() if k in expected
    }
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    # buffers created on meta (rotary inv_freq) must be rebuilt on a real device
    materialize_buffers(model, hf_config)
    return model


def _is_tied(hf: Any) -> bool:
    out = hf.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
