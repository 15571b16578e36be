"""Loading a checkpoint across devices (accelerate dispatch, disk offload)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import dispatch_model
from accelerate.utils import offload_weight, set_module_tensor_to_device

from speech_lens.models.build import (
    expected_keys,
    materialize_buffers,
)
from speech_lens.models.checkpoint import (
    iter_state_dict,
    merge_lora,
)
from speech_lens.models.devices import torch_device
from speech_lens.models.placement import owner, plan_dispatch
from speech_lens.models.spec import AdapterError, AdapterSpec, WeightFileError


def load_dispatched(
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

    folder = Path(offload_folder) if offload_folder is not None else None
    model, hf_config, names, plan = plan_dispatch(
        path, config, spec, dtype, device_map, max_memory, folder, seq_len
    )
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    expected = expected_keys(model, tied)
    dmap = plan.device_map
    on_disk = "disk" in dmap.values()
    if lora_dir is not None and on_disk:
        raise AdapterError(
            f"{lora_dir} is a LoRA adapter: merging it needs every weight in memory, but the "
            f"device map sends {[k for k, v in dmap.items() if v == 'disk'][:3]} to disk; "
            "raise max_memory or merge the adapter once and save the merged checkpoint"
        )
    materialize_buffers(model, hf_config, check=False)  # rotary inv_freq, rebuilt on the CPU
    place_weights(model, path, names, expected, dmap, dtype, tied, folder)
    if tied:
        model.tie_weights()
    disk_units = [u for u, d in dmap.items() if d == "disk"]
    left = [
        n
        for n, t in (*model.named_parameters(), *model.named_buffers())
        if t.is_meta and owner(n, disk_units) is None
    ]
    if left:
        raise WeightFileError(f"tensors left unloaded from {path}: {left[:5]}")
    if lora_dir is not None:
        model = merge_lora(model, lora_dir)
    model.eval()

    hook_devices(model, dmap, plan.main_device, folder, on_disk)
    return model, tied


def place_weights(
    model: torch.nn.Module,
    path: Path,
    names: dict[str, str],
    expected: set[str],
    dmap: dict[str, Any],
    dtype: torch.dtype,
    tied: bool,
    folder: Path | None,
) -> None:
    """Read the checkpoint tensor by tensor onto each one's device, or into the offload folder
    (with its ``index.json``) for the units mapped to ``"disk"``."""
    on_disk = "disk" in dmap.values()
    index: dict[str, Any] = {}
    if on_disk and folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    head_on_disk = tied and dmap.get(owner("lm_head.weight", dmap) or "") == "disk"
    for key, tensor in iter_state_dict(path):
        name = names.get(key)
        if name is None or name not in expected:
            continue
        value = tensor.to(dtype) if tensor.is_floating_point() else tensor
        dev = dmap[owner(name, dmap) or ""]
        if dev == "disk":
            offload_weight(value, name, str(folder), index)
            if head_on_disk and name == "model.embed_tokens.weight":  # tied: hook reads lm_head's
                offload_weight(value, "lm_head.weight", str(folder), index)
        else:
            set_module_tensor_to_device(model, name, torch_device(dev), value=value)
        del tensor, value
    if on_disk and folder is not None:
        # overwrite (accelerate's save_offload_index would merge into a stale index)
        tmp = folder / "index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, folder / "index.json")


def hook_devices(
    model: Any,
    dmap: dict[str, Any],
    main_device: Any,
    folder: Path | None,
    on_disk: bool,
) -> None:
    """accelerate's hooks, so activations follow the weights (and offloaded units load)."""
    # accelerate warns of "offloaded to the cpu" for any "cpu" entry, also when the CPU is
    # where everything runs (nothing is offloaded then)
    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    if main_device == "cpu" and not on_disk:
        log.setLevel(logging.ERROR)
    try:
        dispatch_model(
            model,
            device_map=dict(dmap),
            main_device=main_device,
            offload_dir=str(folder) if on_disk else None,
            force_hooks=True,  # a hook per unit even on one device: the lens calls them directly
        )
    finally:
        log.setLevel(level)
    model.hf_device_map = dict(dmap)  # what TL (and from_pretrained) read
