"""Device maps and memory budgets: parse, normalize and summarize placements."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import convert_file_size_to_int

from speech_lens.models.spec import AdapterError


def free_memory_gb(device: str | torch.device) -> float | None:
    if torch.device(device).type != "cpu":
        return None  # accelerators: the user's device_map decides
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


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


def normalize_device(what: str, value: Any, offload_folder: Path | None) -> Device:
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


def torch_device(d: Device) -> torch.device:
    return torch.device("cuda", d) if isinstance(d, int) else torch.device(d)


def _size_bytes(what: str, value: Any) -> int:

    try:
        n = int(convert_file_size_to_int(value))
    except (ValueError, TypeError):
        raise AdapterError(
            f"{what} = {value!r} is not a size (e.g. '70GiB', '500MB', bytes)"
        ) from None
    if n < 0:
        raise AdapterError(f"{what} = {value!r} is negative")
    return n


def device_budgets(
    max_memory: dict[Any, Any] | None, offload_folder: Path | None
) -> dict[Device, int]:
    """Per-device budgets in bytes: as given, else the free memory of every device found."""
    if max_memory is not None:
        out: dict[Device, int] = {}
        for k, v in max_memory.items():
            d = normalize_device(f"max_memory key {k!r}", k, offload_folder or Path("."))
            out[d] = _size_bytes(f"max_memory[{k!r}]", v)
        return out
    found: dict[Device, int] = {}
    for i in range(torch.cuda.device_count()):
        found[i] = int(torch.cuda.mem_get_info(i)[0])
    if found:  # TL 4.3 refuses GPU maps with CPU offload: name the CPU in max_memory to try
        return found
    cpu = free_memory_gb("cpu")
    if cpu is not None:
        found["cpu"] = int(cpu * GiB)
    return found


def measured_budget(d: Device, offload_folder: Path | None) -> int | None:
    if isinstance(d, int):
        return int(torch.cuda.mem_get_info(d)[0])
    if d == "cpu":
        gb = free_memory_gb("cpu")
        return None if gb is None else int(gb * GiB)
    if d == "disk" and offload_folder is not None:
        p = offload_folder
        while not p.exists() and p != p.parent:
            p = p.parent
        return int(shutil.disk_usage(p).free)
    return None


def fmt_budgets(b: dict[Device, int]) -> str:
    return ", ".join(
        f"{'cuda:' if isinstance(d, int) else ''}{d}={v / GiB:.3f} GiB" for d, v in b.items()
    )


def device_summary(dmap: dict[str, Any] | None) -> dict[str, int]:
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
            return torch_device(dev) if isinstance(dev, int | str) else torch.device(dev)
    return next(module.parameters()).device
