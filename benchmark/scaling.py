"""``maskbench perf-ranks``: throughput of 1 and 2 processes under torchrun (``results/perf/scaling-ranks.csv``).

Each configuration runs as its own command on the published default data and classifier, with a fresh cache
and results folder (nothing reused), one after the other, never two at once:

* a perturbation method: ``bench --methods extremal-perturbation`` (``fast`` preset) on the first ``images``
  test images in batches of 4; the time is the method's wall time in the manifest (explaining and scoring;
  rank 0's, which includes waiting for the other rank), images per second from it;
* a learned method: ``train explainer`` (``fast``: the small network) for ``steps`` optimiser steps; the time is
  the training record's ``train_seconds`` (validation included), images per second = steps x batch size x
  processes / seconds (each process takes its own batch: data parallel).

Processes run with one intra-op thread each (``--threads 1``), and one process also with two threads, the
default of a one-process run on this 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from maskbench.core.render import csv_text
from maskbench.core.storage import atomic_write

CONFIGS = ((1, 1), (2, 1), (1, 2))  # (processes, threads per process)


def _launch(procs: int, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-m", "maskbench.benchmark"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "-m", "maskbench.benchmark"]
    out = subprocess.run([*prefix, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} with {procs} process(es) failed:\n{out.stderr[-3000:]}")
    return out


def measure_ranks(out_dir: Path, images: int = 32, steps: int = 60) -> Path:
    from maskbench.datasets import build_dataset

    data = Path(build_dataset("synthetic", split="test").root)  # the default data (generated on first use)
    recs: list[dict[str, Any]] = []
    for procs, threads in CONFIGS:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        with tempfile.TemporaryDirectory(prefix="maskbench-ranks-") as tmp:
            common = ["--data-root", str(data), "--cache", f"{tmp}/cache", "--threads", str(threads),
                      "--no-progress"]
            _launch(procs, ["bench", *common, "--methods", "extremal-perturbation", "--limit", str(images),
                            "--batch-size", "4", "--results", f"{tmp}/results", "--run-name", "r"], env)
            manifest = json.loads(Path(f"{tmp}/results/synthetic/r/manifest.json").read_text())
            ep = manifest["methods"][0]
            recs.append({"method": "extremal-perturbation", "work": f"explain {images} images (fast)",
                         "processes": procs, "threads_per_process": threads, "seconds": ep["seconds"],
                         "images_per_second": round(images / ep["seconds"], 3)})
            _launch(procs, ["train", "explainer", *common, "--param", f"max_steps={steps}"], env)
            record = next(Path(f"{tmp}/cache/learned").glob("explainer-*.json"))
            info = json.loads(record.read_text())
            batch = 32  # the fast preset's batch size per process
            recs.append({"method": "explainer", "work": f"train {info.get('steps', steps)} steps (fast, batch "
                                                        f"{batch} per process)",
                         "processes": procs, "threads_per_process": threads, "seconds": info["train_seconds"],
                         "images_per_second": round(info.get("steps", steps) * batch * procs
                                                    / info["train_seconds"], 3)})
    table = pd.DataFrame.from_records(recs)
    base = table[(table["processes"] == 1) & (table["threads_per_process"] == 1)].set_index("method")
    table["speedup_vs_1x1"] = [round(r.images_per_second / base.loc[r.method, "images_per_second"], 3)
                               for r in table.itertuples()]
    return atomic_write(out_dir / "scaling-ranks.csv", csv_text(table))
