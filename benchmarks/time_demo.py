"""Time ``speech-lens demo`` and its ``--dry-run`` estimate on this machine, one artifact.

    .venv/bin/python benchmarks/time_demo.py --name demo_timing

runs ``speech-lens demo --dry-run`` (prints a plan and a time estimate, writes nothing), then
``speech-lens demo --out DIR`` (the full demo, a few minutes), and writes
``benchmarks/results/<name>.json`` atomically: the dry run's printed plan and estimate, the
demo's wall time (process start to exit, as a user waits for it) and the seconds the demo itself
records in ``demo.json``, with machine, versions, threads and load average. On a machine loaded by
other jobs, torch's default of one thread per core can be many times slower for these small
models (threads waiting on each other's descheduled peers): ``--threads 1`` then measures the
work rather than the contention. The install that ``make demo``
also does is not timed here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_meta

UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0}


def parse_estimate(text: str) -> float:
    """Seconds from the dry run's ``estimated time: 2.7 min`` line."""
    m = re.search(r"estimated time: ([0-9.]+) (s|min|h)\b", text)
    if m is None:
        raise ValueError(f"no 'estimated time:' line in the dry run's output:\n{text}")
    return float(m.group(1)) * UNITS[m.group(2)]


def _run(argv: list[str], threads: int | None) -> tuple[float, str, list[float], list[float]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    load0, t0 = bench_meta.load_average(), time.perf_counter()
    out = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=env)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {out.returncode}:\n{out.stdout[-3000:]}")
    return seconds, out.stdout, load0, bench_meta.load_average()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--name", default="demo_timing", help="benchmarks/results/<name>.json")
    ap.add_argument("--out", type=Path, help="the demo's output directory (default: temp)")
    ap.add_argument("--out-dir", type=Path, default=bench_meta.RESULTS)
    ap.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS for the demo (default: torch's own choice, as make demo runs it)",
    )
    args = ap.parse_args()
    cli = str(Path(sys.executable).with_name("speech-lens"))
    out = args.out or Path(tempfile.mkdtemp(prefix="speech-lens-demo-"))
    doc: dict[str, Any] = {
        **bench_meta.run_header("time_demo"),
        "threads": args.threads or "torch default",
    }
    path = args.out_dir / f"{args.name}.json"

    dry_s, dry_text, l0, l1 = _run([cli, "demo", "--dry-run", "--out", str(out)], args.threads)
    doc["dry_run"] = {
        "command": "speech-lens demo --dry-run",
        "estimate_seconds": parse_estimate(dry_text),
        "wall_seconds": round(dry_s, 1),
        "printed": dry_text.splitlines(),
        "load_average_start": l0,
        "load_average_end": l1,
    }
    bench_meta.write_json_atomic(path, bench_meta.finish(doc))
    demo_s, _, l0, l1 = _run([cli, "demo", "--out", str(out)], args.threads)
    recorded = json.loads((out / "demo.json").read_text())
    doc["demo"] = {
        "command": "speech-lens demo --out DIR",
        "wall_seconds": round(demo_s, 1),
        "demo_json_seconds": recorded["seconds"],
        "organisms": len(recorded["organisms"]),
        "load_average_start": l0,
        "load_average_end": l1,
    }
    bench_meta.write_json_atomic(path, bench_meta.finish(doc))
    print(json.dumps({k: doc[k] for k in ("dry_run", "demo")}, indent=1))


if __name__ == "__main__":
    main()
