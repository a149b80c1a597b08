"""``bench`` under ``torchrun``: process group, control collectives, the split of the work, progress across ranks.

``torchrun --nproc_per_node N -m maskbench.benchmark bench ...`` (or ``make bench NPROC=N``) starts N processes;
:func:`init_from_env` joins them in one ``torch.distributed`` process group (NCCL with one CUDA device per
process, the local rank's; gloo on the CPU). Control traffic (barriers, the exchange of summaries) always goes
through a gloo group, so :func:`barrier` can use ``monitored_barrier``, which names the rank that did not arrive;
every collective has the run's timeout (``--dist-timeout``, ``$MASKBENCH_DIST_TIMEOUT``, default 1,800 s), so a
process that died ends the others with a message instead of a hang. (torchrun itself stops the surviving
processes when one fails and prints which rank it was.)

Waiting is not a collective: a rank that waits for the others (rank 0 training the classifier, a rank whose
share of EP takes an hour longer) must not time out, yet a dead rank must be found. So every rank beats a
heartbeat counter in the run's key-value store (torchrun's ``MASTER_ADDR:MASTER_PORT``) every
:data:`HEARTBEAT_EVERY` seconds from a thread, and :func:`barrier` waits for every rank's arrival key while it
watches the heartbeats of those still missing: one that has not moved for the heartbeat timeout
(``$MASKBENCH_HEARTBEAT_TIMEOUT``, default 60 s) ends the wait with an error naming that rank.

The work of every method is split by batches: the images still to do are cut into ``--batch-size`` batches
exactly as a one-process run cuts them, and the batches are dealt to the ranks in snake order (0, 1, ..., N-1,
N-1, ..., 0), which balances counts to within one batch and spreads costly stretches of the image list over
all ranks. Since every batch is the one a single process would form, every mask and row is the one a single
process would compute: the tables of an N-process run are those of a one-process run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from maskbench.core.errors import MaskbenchError
from maskbench.core.storage import atomic_write

DEFAULT_TIMEOUT = 1800.0  # seconds for any collective
HEARTBEAT_EVERY = 2.0  # seconds between a rank's heartbeats
DEFAULT_HEARTBEAT_TIMEOUT = 60.0  # seconds without a heartbeat after which a rank counts as dead
_CONTROL: Any = None  # the gloo group of the control collectives (the default group when it is gloo)
_TIMEOUT = DEFAULT_TIMEOUT
_STORE: Any = None  # this process's client of the run's key-value store (main thread)
_BEAT: Any = None  # (stop event, thread) of the heartbeat
_BARRIERS = 0  # barriers passed: names each one's keys


class DistributedError(MaskbenchError):
    """A collective of the run failed: another process died or stopped answering."""


def rank_world() -> tuple[int, int]:
    """(rank, world size) under ``torch.distributed``, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def timeout_seconds(option: float | None = None) -> float:
    """The collectives' timeout: ``option``, else ``$MASKBENCH_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT`."""
    value = option if option is not None else os.environ.get("MASKBENCH_DIST_TIMEOUT", DEFAULT_TIMEOUT)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise MaskbenchError(f"MASKBENCH_DIST_TIMEOUT must be a number of seconds, got {value!r}.") from None
    if seconds <= 0:
        raise MaskbenchError(f"The distributed timeout must be positive, got {seconds}.")
    return seconds


def init_from_env(device: str = "auto", timeout: float | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns (rank, world size)."""
    global _CONTROL, _TIMEOUT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    _TIMEOUT = timeout_seconds(timeout)
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device != "cpu" and not device.startswith("cpu")
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=_dt.timedelta(seconds=_TIMEOUT))
    _CONTROL = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    _start_heartbeat(dist.get_rank())
    return dist.get_rank(), dist.get_world_size()


def _client() -> Any:
    """A new client of the run's store, keys under ``maskbench/``."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=_dt.timedelta(seconds=_TIMEOUT))
    return dist.PrefixStore("maskbench/", store)


def _start_heartbeat(rank: int) -> None:
    global _STORE, _BEAT
    _STORE = _client()
    beat_store, stop = _client(), threading.Event()

    def beat() -> None:
        while True:
            try:
                beat_store.add(f"hb/{rank}", 1)
            except Exception:  # the store went away: the run is ending
                return
            if stop.wait(HEARTBEAT_EVERY):
                return

    thread = threading.Thread(target=beat, daemon=True, name="maskbench-heartbeat")
    thread.start()
    _BEAT = (stop, thread)


def heartbeat_timeout() -> float:
    value = os.environ.get("MASKBENCH_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_TIMEOUT)
    try:
        return max(float(value), 2 * HEARTBEAT_EVERY)
    except (TypeError, ValueError):
        raise MaskbenchError(f"MASKBENCH_HEARTBEAT_TIMEOUT must be a number of seconds, got {value!r}.") from None


def shutdown() -> None:
    global _CONTROL, _STORE, _BEAT
    if _BEAT is not None:  # the heartbeat thread ends before its store client is destroyed
        _BEAT[0].set()
        _BEAT[1].join()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL = _STORE = _BEAT = None


def barrier(what: str, poll: float = 0.2) -> None:
    """Wait, without a time limit, until every rank has arrived; a rank whose heartbeat stops for the heartbeat
    timeout is named in a :class:`DistributedError` (see the module docstring)."""
    global _BARRIERS
    rank, world = rank_world()
    if world == 1:
        return
    _BARRIERS += 1
    key = f"barrier/{_BARRIERS}"
    limit = heartbeat_timeout()
    try:
        _STORE.set(f"{key}/{rank}", "1")
        seen = {r: (None, time.monotonic()) for r in range(world)}  # last heartbeat count, when it changed
        while True:
            missing = [r for r in range(world) if not _STORE.check([f"{key}/{r}"])]
            if not missing:
                return
            now = time.monotonic()
            for r in missing:
                count = int(_STORE.get(f"hb/{r}")) if _STORE.check([f"hb/{r}"]) else 0
                last, since = seen[r]
                if count != last:
                    seen[r] = (count, now)
                elif now - since > limit:
                    raise DistributedError(
                        f"rank {rank}: {what}: rank {r} stopped answering (no heartbeat for {limit:.0f} s): it "
                        f"died or was killed. Rerun the same command (with any number of processes) to resume; "
                        f"finished (method, image) pairs are not recomputed.")
            time.sleep(poll)
    except DistributedError:
        raise
    except Exception as exc:  # the store itself is gone (torchrun's agent, or rank 0 holding it, ended)
        raise DistributedError(f"rank {rank}: {what}: lost the run's store ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); another process of the run "
                               f"ended. Rerun the same command to resume.") from None


def gather(obj: Any, what: str) -> list[Any]:
    """Every rank's ``obj``, in rank order (on every rank)."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    try:
        dist.all_gather_object(out, obj, group=_CONTROL)
    except RuntimeError as exc:
        raise DistributedError(f"rank {rank}: {what}: {str(exc).splitlines()[0]}. A process of the run failed or "
                               f"was killed: rerun the same command to resume.") from None
    return out


def any_rank(flag: bool, what: str) -> bool:
    """True when ``flag`` is true on some rank (a collective)."""
    return any(gather(bool(flag), what))


def my_batches(n_batches: int, rank: int, world: int) -> list[int]:
    """The batch indices of ``rank``: dealt in snake order 0..N-1, N-1..0, ... (see the module docstring)."""
    out = []
    for b in range(n_batches):
        lap, pos = divmod(b, world)
        if (pos if lap % 2 == 0 else world - 1 - pos) == rank:
            out.append(b)
    return out


class RankProgress:
    """Images done per rank for one method, through small files in ``folder`` (``<method>.rank<r>.json``): every
    rank writes its own count after each batch; on rank 0 a thread sums them into the one progress bar."""

    def __init__(self, folder: Path, method: str, rank: int, world: int, bar: Any = None, every: float = 1.0):
        self.folder, self.method, self.rank, self.world, self.bar = folder, method, rank, world, bar
        self.done = 0
        self._stop = threading.Event()
        self._thread = None
        if world > 1:
            folder.mkdir(parents=True, exist_ok=True)
            self.update(0)
            if rank == 0 and bar is not None:
                self._thread = threading.Thread(target=self._poll, args=(every,), daemon=True)
                self._thread.start()

    def _path(self, rank: int) -> Path:
        return self.folder / f"{self.method.replace('/', '_')}.rank{rank}.json"

    def update(self, done: int) -> None:
        self.done = done
        if self.world > 1:
            atomic_write(self._path(self.rank), json.dumps({"done": done, "pid": os.getpid(), "time": time.time()}))

    def total(self) -> int:
        n = 0
        for r in range(self.world):
            try:
                n += int(json.loads(self._path(r).read_text())["done"])
            except (OSError, ValueError, KeyError):
                continue  # not written yet, or being replaced: counted at the next poll
        return n

    def _poll(self, every: float) -> None:
        while not self._stop.wait(every):
            self.bar.n = self.total()
            self.bar.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.bar.n = self.total()
            self.bar.refresh()
        if self.world > 1:
            self._path(self.rank).unlink(missing_ok=True)
