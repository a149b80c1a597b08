"""How many intra-op threads torch uses, and ``maskbench perf-threads``, the measurement that chose the policy.

PyTorch's CPU kernels split work over ``torch.get_num_threads()`` threads that meet at a barrier after every
parallel region. Two processes that each use every core therefore wait at every region for a thread the other
process has preempted: on 2 cores, a second torch process with 2 threads slowed the default run 10-50x. The
policy (``--threads auto``, the default) gives torch the cores that are idle when the run starts: it reads
``/proc/stat`` twice 0.1 s apart, counts the busy cores (rounded) and uses ``cores - busy`` threads, at least 1
(``MASKBENCH_THREADS`` or ``--threads N`` fix the count; under ``torchrun`` each process uses
``cores // local world size``). The manifest records the threads used and why.

:func:`measure` times a fixed slice of the default run (the same images, methods and metrics, scored from an
empty mask cache) with 1 and 2 threads, alone and beside a neighbour process doing torch matrix products with
1 or 2 threads, each in a fresh process, and writes ``results/perf/threads.csv``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from maskbench.core.errors import MaskbenchError
from maskbench.core.storage import atomic_write


def _cpu_times() -> tuple[float, float] | None:
    try:
        with open("/proc/stat") as fh:
            fields = [float(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields), idle


def busy_cores(interval: float = 0.1) -> float | None:
    """Cores kept busy by other processes right now (from ``/proc/stat``), None where it cannot be read."""
    a = _cpu_times()
    time.sleep(interval)
    b = _cpu_times()
    if a is None or b is None or b[0] <= a[0]:
        return None
    busy_fraction = 1.0 - (b[1] - a[1]) / (b[0] - a[0])
    return busy_fraction * (os.cpu_count() or 1)


def choose_threads(spec: str | int | None = "auto") -> tuple[int, str]:
    """The intra-op thread count for this process and the reason (see the module docstring)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = os.environ.get("MASKBENCH_THREADS")
    if spec in (None, "auto") and env:
        spec = env
    if spec not in (None, "auto"):
        try:
            n = int(spec)
        except (TypeError, ValueError):
            raise MaskbenchError(f"--threads must be 'auto' or a positive integer, got {spec!r}.") from None
        if n < 1:
            raise MaskbenchError(f"--threads must be 'auto' or a positive integer, got {n}.")
        return n, "fixed"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world > 1:
        return max(1, cores // local_world), f"{cores} cores shared by {local_world} local processes"
    busy = busy_cores()
    if busy is None:
        return cores, f"{cores} cores"
    n = max(1, cores - int(round(busy)))
    return n, f"{cores} cores, {busy:.1f} busy with other processes at start"


def apply_threads(spec: str | int | None = "auto") -> dict[str, Any]:
    """Set torch's intra-op threads by :func:`choose_threads`; returns what the manifest records."""
    n, why = choose_threads(spec)
    torch.set_num_threads(n)
    return {"intra_op": torch.get_num_threads(), "policy": "auto" if spec in (None, "auto") else "fixed",
            "reason": why}


NEIGHBOUR = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(384, 384)
stop = time.time() + float(sys.argv[2])
while time.time() < stop:
    a = torch.tanh(a @ a / 20.0)
"""


def _bench(data_root: Path, threads: int, limit: int, methods: list[str]) -> dict[str, float]:
    """One timed run of the slice in a fresh process and a fresh cache; seconds spent in the methods."""
    with tempfile.TemporaryDirectory(prefix="maskbench-threads-") as tmp:
        cmd = [sys.executable, "-m", "maskbench.benchmark", "bench", "--data-root", str(data_root), "--cache",
               f"{tmp}/cache", "--results", f"{tmp}/results", "--limit", str(limit), "--methods",
               ",".join(methods), "--threads", str(threads), "--no-progress"]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            raise MaskbenchError(f"the timed run failed: {out.stderr.strip()[-500:]}")
        manifest = json.loads(next(Path(tmp, "results").rglob("manifest.json")).read_text())
    seconds = sum(m["seconds"] for m in manifest["methods"])
    return {"seconds": seconds, "wall_seconds": wall, "threads_recorded": manifest["threads"]["intra_op"]}


def measure(out_dir: Path, data_root: Path | None = None, limit: int = 24,
            methods: tuple[str, ...] = ("gradcam", "integrated-gradients", "rise", "extremal-perturbation",
                                        "meaningful-perturbation")) -> Path:
    """Time the slice for threads x neighbour (see the module docstring) and write ``threads.csv``."""
    import pandas as pd

    if data_root is None:
        from maskbench.datasets import build_dataset

        data_root = Path(build_dataset("synthetic", split="test").root)
    rows = []
    for neighbour in (0, 1, 2):
        for threads in (1, 2):
            proc = None
            if neighbour:
                proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(neighbour), "600"],
                                        stdout=subprocess.DEVNULL)
                time.sleep(1.0)
            try:
                r = _bench(Path(data_root), threads, limit, list(methods))
            finally:
                if proc is not None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            rows.append({"threads": threads, "neighbour_threads": neighbour, "images": limit,
                         "methods": " ".join(methods), **r, "images_per_second": limit / r["seconds"]})
    table = pd.DataFrame.from_records(rows)
    base = table.loc[(table["threads"] == 2) & (table["neighbour_threads"] == 0), "seconds"].iloc[0]
    table["slowdown_vs_2_alone"] = table["seconds"] / base
    path = Path(out_dir) / "threads.csv"
    atomic_write(path, table.to_csv(index=False, float_format="%.3f", lineterminator="\n"))
    return path
