"""``bench`` under torchrun: 2 gloo processes (one thread each) give the tables and per-image rows of one process;
a killed process ends the run with a message naming it, and the rerun recomputes no finished pair.

Both runs explain the same random-weight classifier (``--checkpoint``), with their own mask caches; the learned
methods' networks are trained by the one-process run and loaded by the two-process one (as a multi-process run
loads what rank 0 or an earlier run cached).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from mb_testutils import tiny_synthetic

from maskbench.benchmark import distributed as mdist
from maskbench.benchmark.config import DEFAULT_METHODS
from maskbench.classifiers import SmallCNN
from maskbench.core.checkpoints import save_checkpoint

pytestmark = pytest.mark.slow

CAPS = ["--param", "max_steps=4", "--param", "filter_images=64", "--param", "extremal-perturbation.max_iter=20",
        "--param", "igos++.iterations=2", "--param", "meaningful-perturbation.max_iter=10",
        "--param", "rise.num_masks=100", "--param", "integrated-gradients.steps=4", "--param", "smoothgrad.samples=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = tiny_synthetic(tmp_path_factory, n_test=16, seed=5)
    work = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    ckpt = work / "clf.pt"
    save_checkpoint(ckpt, SmallCNN(6).state_dict())
    return data, work, ckpt


def _args(data: Path, ckpt: Path, results: Path, cache: Path, methods: list[str], params: list[str]) -> list[str]:
    return ["bench", "--data-root", str(data), "--checkpoint", str(ckpt), "--results", str(results), "--cache",
            str(cache), "--methods", ",".join(methods), "--limit", "16", "--batch-size", "4", "--threads", "1",
            "--no-progress", "--run-name", "run", *params]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def test_the_batches_are_dealt_in_snake_order_and_cover_every_batch_once():
    shares = {r: mdist.my_batches(10, r, 3) for r in range(3)}
    assert shares == {0: [0, 5, 6], 1: [1, 4, 7], 2: [2, 3, 8, 9]}
    assert sorted(b for s in shares.values() for b in s) == list(range(10))
    assert mdist.my_batches(3, 0, 1) == [0, 1, 2]


def test_two_processes_give_the_tables_and_rows_of_one(setup):
    data, work, ckpt = setup
    one, two = work / "one", work / "two"
    cmd = [sys.executable, "-m", "maskbench.benchmark"]
    r1 = subprocess.run([*cmd, *_args(data, ckpt, one / "results", one / "cache", DEFAULT_METHODS, CAPS)],
                        capture_output=True, text=True, env=_env(), timeout=900)
    assert r1.returncode == 0, r1.stderr[-3000:]
    shutil.copytree(one / "cache" / "learned", two / "cache" / "learned")  # the trained networks, not the masks
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                         str(_free_port()), "-m", "maskbench.benchmark",
                         *_args(data, ckpt, two / "results", two / "cache", DEFAULT_METHODS, CAPS)],
                        capture_output=True, text=True, env=_env(), timeout=900)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    a, b = one / "results" / "synthetic" / "run", two / "results" / "synthetic" / "run"
    tables = sorted(p.name for p in a.glob("*.csv")) + sorted(p.name for p in a.glob("*.tex"))
    assert "segmentation.csv" in tables and sorted(p.name for p in b.glob("*.[ct][se][vx]")) == sorted(tables)
    timed = {"compute_time.csv", "compute_time.tex", "leaderboard.tex"}  # seconds and images/s of each run
    for name in tables:
        if name not in timed:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for rows in sorted((a / "per_image").glob("*.csv")):
        assert rows.read_bytes() == (b / "per_image" / rows.name).read_bytes(), rows.name
    curves = sorted((a / "per_image").glob("*.curves.npz"))  # the per-image curves, merged from both ranks
    assert len(curves) == len(DEFAULT_METHODS)
    for path in curves:
        assert path.read_bytes() == (b / "per_image" / path.name).read_bytes(), path.name
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["distributed"]["world_size"] == 2
    for m in manifest["methods"]:
        assert [s["rank"] for s in m["shares"]] == [0, 1] and sum(s["images"] for s in m["shares"]) == 16
        assert m["computed"] == 16 and m["failed"] == 0
        if m["method"] in ("explainer", "rtis", "dgmp-bf", "dgmp-cf"):
            assert m["setup"]["trained_here"] is False  # loaded from the cache on both ranks
    assert not (b / ".progress").exists() and not (b / "per_image" / ".shards").exists()
    assert (two / "results" / "logs" / "rank1.log").is_file()  # rank 1's own output


def _launch(rank: int, port: int, args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """One process of a 2-process run started as a scheduler would (no torchrun agent to end the others)."""
    dist_env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
    return subprocess.Popen([sys.executable, "-m", "maskbench.benchmark", *args], env=dist_env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_a_killed_process_is_named_by_the_survivor_and_the_rerun_recomputes_no_finished_pair(setup):
    data, work, ckpt = setup
    results, cache = work / "kill" / "results", work / "kill" / "cache"
    methods = ["constant-0", "gradcam", "extremal-perturbation"]
    args = _args(data, ckpt, results, cache, methods, ["--param", "extremal-perturbation.max_iter=400"])
    port = _free_port()
    env = {"MASKBENCH_HEARTBEAT_TIMEOUT": "5", "MASKBENCH_SAVE_EVERY": "0"}
    procs = [_launch(r, port, args, work / f"kill-rank{r}.log", **env) for r in (0, 1)]
    progress = results / "synthetic" / "run" / ".progress" / "extremal-perturbation.rank1.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # rank 1 has finished one EP batch of its two
        try:
            state = json.loads(progress.read_text())
            if state["done"] >= 4:
                break
        except (OSError, ValueError):
            pass
        assert all(p.poll() is None for p in procs), (work / "kill-rank0.log").read_text()[-2000:]
        time.sleep(0.2)
    os.kill(state["pid"], signal.SIGKILL)
    t_kill = time.monotonic()
    assert procs[0].wait(timeout=120) != 0
    survivor = (work / "kill-rank0.log").read_text()
    assert "rank 1 stopped answering" in survivor, survivor[-2000:]
    assert time.monotonic() - t_kill < 60  # its own share (at most one more EP batch) + 5 s without heartbeat
    procs[1].wait(timeout=10)
    # the rerun, with one process: the finished methods' rows and every cached mask are reused
    rerun = subprocess.run([sys.executable, "-m", "maskbench.benchmark", *args], capture_output=True, text=True,
                           env=_env(), timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = json.loads((results / "synthetic" / "run" / "manifest.json").read_text())
    by = {m["method"]: m for m in manifest["methods"]}
    assert by["constant-0"]["skipped"] == by["gradcam"]["skipped"] == 16  # finished before the kill
    ep = by["extremal-perturbation"]
    assert ep["skipped"] + ep["from_cache"] >= 8 + 4  # rank 0's share (scored), rank 1's first batch (cached)
    assert ep["computed"] == 16 - ep["skipped"] - ep["from_cache"] <= 4
    rows = pd.read_csv(results / "synthetic" / "run" / "per_image" / "extremal-perturbation.csv")
    assert rows["image_id"].nunique() == 16 and not (results / "synthetic" / "run" / "per_image" / ".shards").exists()
