"""Placement: which module goes on which device (explicit, balanced or auto maps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate.utils import find_tied_parameters, get_balanced_memory, infer_auto_device_map

from speech_lens._tl import check_device_map_supported
from speech_lens.models.build import (
    check_keys,
    empty_model,
    expected_keys,
    strip_prefix,
)
from speech_lens.models.checkpoint import (
    base_config_dict,
    checkpoint_keys,
)
from speech_lens.models.devices import (
    AUTO_DEVICE_MAPS,
    Device,
    DevicePlan,
    DeviceUse,
    GiB,
    device_budgets,
    device_summary,
    fmt_budgets,
    measured_budget,
    normalize_device,
)
from speech_lens.models.spec import AdapterError, AdapterSpec, WeightFileError
from speech_lens.options import DEFAULT_CHUNK_ELEMENTS


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


def owner(name: str, keys: Any) -> str | None:
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
        key = owner(u, dmap)
        if key is None:
            uncovered.append(u)
            continue
        out[u] = normalize_device(f"device_map[{key!r}]", dmap[key], offload_folder)
    if uncovered:
        raise AdapterError(
            f"device_map places no device for {', '.join(uncovered[:5])}"
            f"{'...' if len(uncovered) > 5 else ''}; add them or a '' entry for the rest"
        )

    for group in find_tied_parameters(model):
        devs = {out[k] for n in group if (k := owner(n, out)) is not None}
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
        u = owner(n, dmap)
        if u is not None:
            w = width if t.is_floating_point() and isinstance(t, torch.nn.Parameter) else None
            unit_bytes[u] += t.numel() * (w or t.element_size())
    embed_unit = owner(_module_name(model, model.get_input_embeddings()), dmap) or ""
    head_unit = owner(_module_name(model, model.get_output_embeddings()), dmap) or ""
    main = _main_device(dmap, embed_unit)

    def runs_on(d: Device) -> Device:
        return main if d == "disk" or (d == "cpu" and main != "cpu") else d

    layer, logits, lens = activation_parts(base_config, dtype, seq_len)
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
            budget=budgets[d] if d in budgets else measured_budget(d, offload_folder),
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

    if kind not in AUTO_DEVICE_MAPS:
        raise AdapterError(
            f"device_map={kind!r}: use one of {', '.join(AUTO_DEVICE_MAPS)} or a dict"
        )
    layer, logits, lens = activation_parts(base_config, dtype, seq_len)
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
            f"{where} does not fit the budgets {fmt_budgets(left)} (weights {need / GiB:.3f} GiB; "
            f"accelerate also keeps room for the largest offloaded layer): {spilled[:3]}... would "
            f"go to disk; raise max_memory or pass offload_folder="
        )
    return dict(dmap)


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

    budgets = device_budgets(max_memory, offload_folder)
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
        raise AdapterError(f"device map {device_summary(dmap)} for {where}: {e}") from None
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


def plan_dispatch(
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
    shapes = checkpoint_keys(path)
    names = strip_prefix(path, spec, list(shapes))
    emb_key = next((k for k, v in names.items() if v == "model.embed_tokens.weight"), None)
    if emb_key is None:
        raise WeightFileError(f"weights in {path} have no model.embed_tokens.weight")
    model, hf_config = empty_model(path, config, spec, dtype, int(shapes[emb_key][0]))
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    if tied:
        model.tie_weights()
    expected = expected_keys(model, tied)
    check_keys(path, set(names.values()), expected, model)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = [
        f"{k} {shapes[k]} (model: {model_shapes[n]})"
        for k, n in names.items()
        if n in expected and shapes[k] != model_shapes[n]
    ]
    if bad:
        raise WeightFileError(f"weights in {path} do not match the config's shapes: {bad[:3]}")
    base_config = {**base_config_dict(config, spec, path), "vocab_size": int(shapes[emb_key][0])}
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


def activation_parts(
    config: dict[str, Any], dtype: torch.dtype, seq_len: int, lens_chunk: int | None = None
) -> tuple[int, int, int]:
    """Bytes of (one decoder layer's activations, the fp32 logits, the lens buffers: up to
    three fp32 ``[chunk, vocab]`` blocks, chunk as the streaming lens picks it by default)."""

    d = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    ff = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    width = torch.finfo(dtype).bits // 8
    # eager attention holds one layer's [heads, pos, pos] scores; logits [pos, vocab] in fp32
    layer = heads * seq_len * seq_len * width * 2 + seq_len * (4 * d + 2 * ff) * width
    chunk = lens_chunk or min(seq_len, max(1, DEFAULT_CHUNK_ELEMENTS // vocab))
    return layer, seq_len * vocab * 4, 3 * chunk * vocab * 4
