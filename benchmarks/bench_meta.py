"""What every benchmark artifact records beside its numbers: machine, load, versions, command.

Imported by the scripts in ``benchmarks/`` (run as ``python benchmarks/<script>.py``, so this
directory is on ``sys.path``). The machine these numbers come from is shared with other jobs, so
the load average at the start and end of a run is part of every artifact.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)),
        "memory_gb": round(mem_kb / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def versions() -> dict[str, Any]:
    found = {}
    for dist in ("torch", "transformers", "transformer-lens", "speech-lens", "numpy"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    found["speech_lens_commit"] = _git("rev-parse", "HEAD")
    found["speech_lens_tree_dirty"] = bool(dirty) if dirty != "unknown" else None
    return found


def run_header(name: str) -> dict[str, Any]:
    """The fields an artifact starts with; ``finish`` adds the end time and load."""
    argv = [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]
    return {
        "benchmark": name,
        "command": shlex.join([".venv/bin/python", *argv]),
        "started": now(),
        "machine": machine(),
        "versions": versions(),
        "load_average_start": load_average(),
        "note": "machine shared with other jobs: absolute times are noisy; see load_average_*",
    }


def finish(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "finished": now(), "load_average_end": load_average()}


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write to a temporary file beside ``path`` and rename: a crash leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so RSS before a call is what is live."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS may hold freed pages
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_kb(key: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def add_run_args(ap: argparse.ArgumentParser, *, threads: int, rounds: bool = True) -> None:
    """The options every benchmark script shares (threads, rounds, where the random checkpoints
    and the results go, a smoke mode, and the hidden ``--worker`` that measures in a subprocess)."""
    ap.add_argument("--threads", type=int, default=threads)
    if rounds:
        ap.add_argument("--rounds", type=int, default=5, help="measured rounds after the warm-up")
    ap.add_argument("--root", type=Path, help="where the random checkpoints go (default: temp)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="tiny widths, to check the script runs")
    ap.add_argument("--worker", help=argparse.SUPPRESS)


def ran_as_worker(args: argparse.Namespace, worker: Callable[[dict[str, Any]], Any]) -> bool:
    """In a ``--worker`` subprocess: measure, print the JSON result and say so (the caller
    returns). Otherwise check the shared options."""
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return True
    if getattr(args, "rounds", 1) < 1:
        raise SystemExit("--rounds must be >= 1")
    return False
