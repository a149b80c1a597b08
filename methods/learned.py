"""Shared machinery of the learned attribution methods: a network trained once against the frozen classifier,
then explaining any image (all classes at once) in one forward pass.

A subclass provides three hooks:

* ``build_network(num_classes, image_size, model)`` -> the trainable ``nn.Module``;
* ``training_loss(net, model, images, labels, generator)`` -> dict of named loss terms, with the total under
  ``"loss"`` (the other entries are logged on the progress bar and in the training history);
* ``predict(net, model, images)`` -> (B, C, H, W) masks in [0, 1] for every class.

:meth:`LearnedMethod.setup` trains (or loads) the network: Adam, mini-batches from the data set's ``train``
split (held in memory when it fits in 2 GB, read batch by batch otherwise, see
:class:`~maskbench.datasets.base.SplitView`), early stopping on the ``val`` loss (``patience``, ``min_delta``)
and a step limit (``max_steps``, which bounds the CPU ``fast`` presets), seeded. **What is computed never
depends on the machine's speed**: training always runs its step/epoch budget (``max_steps``, ``max_epochs``,
early stopping, all deterministic); no wall-clock limit ever shortens it.

*Progress and resumption.* Every ``checkpoint_every`` optimiser steps the training saves its progress to
``<cache>/learned/<name>-<key>.progress.pt`` (atomically, so an interruption, Ctrl-C included, leaves the last
one usable; loaded with ``torch.load(..., weights_only=True)``): network, optimiser and learning-rate schedule
states, the training generator's state and the global random states (dropout draws from them), epoch and step
counters, the current epoch's permutation and partial loss sums, the best validation loss, epoch and network,
the epochs without improvement and the history (see :class:`TrainingProgress`). ``setup`` resumes from it when
no finished checkpoint exists, and the finished network is the same as an uninterrupted training's (same
device and library versions); the file is deleted once the final checkpoint is written.
``max_train_seconds`` (optional, None in every preset) limits the wall time of one invocation: when training
runs over it, the progress is saved and :class:`~maskbench.core.errors.TrainingIncomplete` is raised
(the same command resumes it); a network trained for fewer steps than its budget is never returned. Neither
``checkpoint_every`` nor ``max_train_seconds`` is part of the training key (:data:`TRAINING_FIELDS`).

The final checkpoint is cached under ``<cache>/learned/`` keyed by method, configuration, data set and
classifier checkpoint hash, written atomically and loaded with ``torch.load(..., weights_only=True)``. Under
``torchrun`` (``torch.distributed`` initialised) the network is wrapped in DistributedDataParallel and each
process takes its shard of every epoch (gloo on CPU, NCCL on CUDA); rank 0 writes the checkpoint and the
progress file (with each process's generator, random states and partial sums), every process resumes from
that file (with the same number of processes), and the time-limit decision is taken jointly, so all stop at
the same step. The classifier stays frozen and in ``eval()`` throughout: its parameters get no gradient and its
BatchNorm statistics are not updated (the NeurIPS 2022 code let PyTorch Lightning put it back in train mode).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from maskbench.core.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from maskbench.core.errors import MaskbenchError, TrainingIncomplete
from maskbench.core.provenance import code_hash
from maskbench.core.storage import read_json, stable_hash, write_json
from maskbench.datasets.base import SplitView

from .base import AttributionMethod, MethodContext

# fields that do not change what a finished training means (not part of the training key)
TRAINING_FIELDS = ("max_train_seconds", "checkpoint_every")
PROGRESS_FORMAT = 1  # layout of the progress files (TrainingProgress)


def _dist() -> tuple[int, int]:
    """(rank, world size) under ``torch.distributed``, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    """Where tensors for a collective must live: the current CUDA device under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def clock() -> float:
    """Wall-clock seconds for the time limit and the training records (a test may replace it by a fake clock)."""
    return time.perf_counter()


def random_state(generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    """Every random state a training step may draw from: the training ``generator`` (data order, noise) and the
    global generators (dropout, e.g. DeepLabV3's head, draws from them): the CPU one and that of a CUDA
    ``device``. ByteTensors only (loadable with ``weights_only=True``)."""
    state = {"generator": generator.get_state(), "cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_random_state(generator: torch.Generator, state: dict[str, Tensor], device: torch.device) -> None:
    """Restore what :func:`random_state` saved."""
    generator.set_state(state["generator"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class TrainingProgress:
    """One invocation of a training: the progress file it resumes from and saves to, and its time limit.

    A progress file is a dict of tensors, dicts, lists, numbers, strings, booleans and None (it is loaded with
    ``torch.load(..., weights_only=True)``): ``format``, ``method``, ``key`` (the training key),
    ``world_size``, ``stage`` (the training stage saved: ``"fit"``, or DGMP's ``"filter"`` before it),
    ``state`` (what every process shares: network, optimiser, counters, ...), ``ranks`` (one entry per process:
    what may differ between processes, such as the random states and partial loss sums) and ``records`` (the
    records of the stages already finished, e.g. DGMP's filter stage). Rank 0 writes it atomically
    (:func:`~maskbench.core.storage.atomic_write`), so an interruption leaves the previous file intact.
    ``path`` None: nothing is saved or resumed (the time limit still raises).
    """

    def __init__(self, method: LearnedMethod, path: Path | None = None, key: str = "") -> None:
        self.method, self.path, self.key = method, path, key
        self.rank, self.world = _dist()
        self.started = clock()
        self.loaded: dict[str, Any] | None = None
        if path is not None and path.is_file():
            self.loaded = self._read(path)
        self.records: dict[str, dict[str, Any]] = dict(self.loaded["records"]) if self.loaded else {}
        if self.world > 1:  # every process has read the file before rank 0 may replace it
            torch.distributed.barrier()

    def _read(self, path: Path) -> dict[str, Any] | None:
        name = self.method.name
        try:
            data = load_checkpoint(path)
        except CheckpointError as exc:  # damaged: costs the steps it saved, not the run
            print(f"maskbench: {name}: damaged training progress file {path} ({type(exc).__name__}); starting "
                  f"this training over", file=sys.stderr)
            return None
        if (not isinstance(data, dict) or data.get("format") != PROGRESS_FORMAT or data.get("method") != name
                or (self.key and data.get("key") != self.key)):
            raise MaskbenchError(f"{name}: {path} is not a progress file of this training (format "
                                 f"{PROGRESS_FORMAT}, training key {self.key or '?'}); delete it to start over.")
        if data["world_size"] != self.world:
            raise MaskbenchError(f"{name}: the training progress in {path} was saved by {data['world_size']} "
                                 f"process(es); resume it with the same number of processes (now {self.world}), "
                                 f"or delete the file to start over.")
        return data

    def resume(self, stage: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The shared state and this process's own state saved in ``stage``; None when the file holds none."""
        if self.loaded is None or self.loaded["stage"] != stage:
            return None
        return self.loaded["state"], self.loaded["ranks"][self.rank]

    def save(self, stage: str, state: dict[str, Any], local: dict[str, Any]) -> None:
        """Save the progress of ``stage``: ``state`` as shared by every process, ``local`` this process's own.

        A collective under ``torch.distributed`` (every process calls it at the same step); rank 0 writes.
        """
        ranks: list[Any] = [local]
        if self.world > 1:
            ranks = [None] * self.world
            torch.distributed.all_gather_object(ranks, local)
        if self.rank == 0 and self.path is not None:
            save_checkpoint(self.path, {"format": PROGRESS_FORMAT, "method": self.method.name, "key": self.key,
                                        "world_size": self.world, "stage": stage, "state": state, "ranks": ranks,
                                        "records": self.records})

    def seconds(self) -> float:
        """Wall time of this invocation so far."""
        return clock() - self.started

    def out_of_time(self) -> bool:
        """Whether this invocation has run over ``max_train_seconds``; the same answer on every process."""
        limit = self.method.max_train_seconds
        if limit is None:
            return False
        late = self.seconds() > limit
        if self.world > 1:  # every process stops at the same step
            flag = torch.tensor(float(late), device=_comm_device())
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            late = bool(flag.item() > 0)
        return late

    def incomplete(self, what: str, steps: int, budget: int) -> TrainingIncomplete:
        """The exception to raise after the progress was saved because the time limit was reached."""
        if self.world > 1:  # the file is complete before any process stops (torchrun ends the others)
            torch.distributed.barrier()
        saved = (f"its progress is saved in {self.path}" if self.path is not None
                 else "no progress file was given, so nothing was saved")
        return TrainingIncomplete(
            f"{self.method.name}: {what} stopped by max_train_seconds={self.method.max_train_seconds:g} after "
            f"{steps} of at most {budget} optimiser steps; {saved}. Run the same command again to resume it "
            f"(the finished network is the same as an uninterrupted training's); a partly trained network is "
            f"never used.")


@dataclass
class _FitState:
    """Where :meth:`LearnedMethod.fit` stands; the fields are what the progress file's shared ``state`` holds
    besides the network, optimiser and schedule (``sums``/``history`` and the random states go per process)."""

    epoch: int = 0  # index of the current epoch
    batch: int = 0  # batches of the current epoch done
    steps: int = 0  # optimiser steps done
    perm: Tensor | None = None  # the current epoch's permutation of the training split (None between epochs)
    best_loss: float = math.inf
    best_state: dict[str, Tensor] | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    seconds: float = 0.0  # training time of the earlier invocations
    resumed_at: list[int] = field(default_factory=list)  # the steps at which the training was resumed

    def shared(self) -> dict[str, Any]:
        """The fields as a dict (the tensors not copied), for the progress file."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_shared(cls, state: dict[str, Any]) -> _FitState:
        """The state saved by :meth:`shared` (other entries of ``state`` are ignored)."""
        return cls(**{f.name: state[f.name] for f in fields(cls)})


@dataclass
class LearnedMethod(AttributionMethod):
    lr: float = 1e-5
    batch_size: int = 16
    max_epochs: int = 1000
    max_steps: int | None = None  # optimiser steps; with max_epochs, what bounds a fast preset reproducibly
    patience: int = 5
    min_delta: float = 1e-3
    # wall time of one invocation; when exceeded, progress is saved and TrainingIncomplete raised (resumable)
    max_train_seconds: float | None = None
    checkpoint_every: int | None = 200  # optimiser steps between progress saves (None: only at the time limit)
    seed: int = 42

    family = "learned"
    not_in_key = TRAINING_FIELDS

    def __post_init__(self) -> None:
        """Validate the training hyperparameters (subclasses call this first, then check their own)."""
        super().__post_init__()
        from .base import check_range

        check_range(self, "lr", 0, low_open=True)
        check_range(self, "batch_size", 1)
        check_range(self, "max_epochs", 1)
        check_range(self, "max_steps", 1)
        check_range(self, "patience", 1)
        check_range(self, "min_delta", 0)
        check_range(self, "max_train_seconds", 0)
        check_range(self, "checkpoint_every", 1)
        check_range(self, "seed", 0)

    # -- hooks ---------------------------------------------------------------------------------------------
    def build_network(self, num_classes: int, image_size: int, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def training_loss(self, net: nn.Module, model: nn.Module, images: Tensor, labels: Tensor,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, net: nn.Module, model: nn.Module, images: Tensor) -> Tensor:
        raise NotImplementedError

    def lr_scheduler(self, opt: torch.optim.Optimizer) -> Any:
        """An optional learning-rate schedule, stepped once per epoch (None: constant rate)."""
        return None

    # -- contract --------------------------------------------------------------------------------------------
    def training_key(self, ctx: MethodContext) -> str:
        """What the trained network depends on: method, version, configuration (without :data:`TRAINING_FIELDS`),
        the code that trains it (:func:`~maskbench.core.provenance.code_hash`), data set and classifier
        checkpoint. Names the checkpoint and progress files."""
        cfg = {k: v for k, v in self.config().items() if k not in TRAINING_FIELDS}
        return stable_hash({"method": self.name, "version": self.version, "config": cfg, "dataset": ctx.dataset,
                            "classifier": ctx.classifier_key, "code": code_hash(type(self))})

    def setup(self, ctx: MethodContext) -> dict[str, Any]:
        key = self.training_key(ctx)
        path = ctx.cache_dir / "learned" / f"{self.name}-{key}.pt"
        meta_path = path.with_suffix(".json")
        progress_path = path.with_name(f"{path.stem}.progress.pt")
        train, val = ctx.datasets("train"), ctx.datasets("val")
        image_size = int(train[0].image.shape[-1])

        def fresh() -> nn.Module:  # the seeded initial network a training starts from
            torch.manual_seed(self.seed)
            return self.build_network(ctx.num_classes, image_size, ctx.model).to(ctx.device)

        net = fresh()
        rank = _dist()[0]
        meta = None
        if path.is_file() and meta_path.is_file():
            try:  # a damaged checkpoint or record costs one retraining, never the run
                meta = read_json(meta_path)
                if "time_budget" in (meta.get("stopped"), meta.get("filter_stopped")):
                    meta = None  # cut short by the former wall-clock cap: fewer steps than its budget, train again
                else:
                    net.load_state_dict(load_checkpoint(path, ctx.device))
            except Exception as exc:
                print(f"maskbench: {self.name}: damaged cached network {path} ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); training it again", file=sys.stderr)
                meta = None
                net = fresh()  # a partly loaded state must not be the start of the new training
        if meta is not None:
            info = {**meta, "trained_here": False}
            if rank == 0:  # left over when interrupted between the final checkpoint and its deletion
                progress_path.unlink(missing_ok=True)
        else:
            info = self.fit(net, ctx, train, val, TrainingProgress(self, progress_path, key))
            if rank == 0:
                save_checkpoint(path, net.state_dict())
                write_json(meta_path, info)
                progress_path.unlink(missing_ok=True)
            info = {**info, "trained_here": True}
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self._net = net
        return {**{k: v for k, v in info.items() if k != "history"}, "checkpoint": str(path)}

    def fit(self, net: nn.Module, ctx: MethodContext, train: Any, val: Any,
            progress: TrainingProgress | None = None) -> dict[str, Any]:
        """Train ``net`` in place; returns the training record (times, epochs, losses).

        Resumes from ``progress`` when it holds a saved ``"fit"`` stage, saves there every ``checkpoint_every``
        steps, and raises :class:`TrainingIncomplete` (after saving) when ``max_train_seconds`` is exceeded.
        """
        from tqdm.auto import tqdm

        model = ctx.model
        if model.training or any(p.requires_grad for p in model.parameters()):
            raise MaskbenchError(f"{self.name}: the classifier must be frozen and in eval() before training")
        progress = progress if progress is not None else TrainingProgress(self)
        rank, world = progress.rank, progress.world
        train_split, val_split = SplitView(train), SplitView(val)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=self.lr)
        sched = self.lr_scheduler(opt)
        gen = torch.Generator().manual_seed(self.seed)
        per_rank = len(train_split) // world
        n_steps = max(per_rank // self.batch_size, 1)  # equal step counts on every rank (DDP)
        budget = n_steps * self.max_epochs if self.max_steps is None else min(self.max_steps,
                                                                               n_steps * self.max_epochs)
        st = _FitState()
        sums: dict[str, Tensor] = {}  # loss terms summed over the current epoch's batches (this process)
        history: list[dict[str, float]] = []
        resumed = progress.resume("fit")
        if resumed is not None:
            shared, mine = resumed
            net.load_state_dict(shared["net"])
            opt.load_state_dict(shared["optimizer"])
            if sched is not None:
                sched.load_state_dict(shared["scheduler"])
            set_random_state(gen, mine["random"], ctx.device)
            st = _FitState.from_shared(shared)
            st.resumed_at = [*st.resumed_at, st.steps]
            sums = {k: v.to(ctx.device) for k, v in mine["sums"].items()}
            history = list(mine["history"])
        train_net: nn.Module = net
        if world > 1:
            train_net = nn.parallel.DistributedDataParallel(net)
        t0 = clock()

        def save() -> None:
            shared = {"net": net.state_dict(), "optimizer": opt.state_dict(),
                      "scheduler": None if sched is None else sched.state_dict(),
                      **st.shared(), "seconds": st.seconds + clock() - t0}
            local = {"random": random_state(gen, ctx.device), "sums": {k: v.detach().cpu() for k, v in sums.items()},
                     "history": history}
            progress.save("fit", shared, local)

        def pause() -> None:
            """Save the progress when a checkpoint is due or the time is up; then stop if the time is up."""
            due = self.checkpoint_every is not None and st.steps % self.checkpoint_every == 0
            late = progress.out_of_time()  # collective under DDP: every process asks at the same points
            if due or late:
                save()
            if late:
                raise progress.incomplete("training", st.steps, budget)

        bar = tqdm(range(st.epoch, self.max_epochs), initial=st.epoch, total=self.max_epochs,
                   desc=f"train {self.name}", disable=not ctx.progress or rank != 0, leave=False)
        stopped = "max_epochs"
        for epoch in bar:
            st.epoch = epoch
            net.train()
            if st.perm is None:  # a new epoch (a resumed one goes on with its saved permutation and sums)
                st.perm, st.batch, sums = torch.randperm(len(train_split), generator=gen), 0, {}
            shard = st.perm[rank * per_rank : (rank + 1) * per_rank]
            out_of_steps = False
            while st.batch < n_steps:
                idx = shard[st.batch * self.batch_size : (st.batch + 1) * self.batch_size]
                xb, yb = train_split[idx]
                terms = self.training_loss(train_net, model, xb.to(ctx.device), yb.to(ctx.device), gen)
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                opt.step()
                st.steps += 1
                st.batch += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.detach()
                if self.max_steps is not None and st.steps >= self.max_steps:
                    out_of_steps = True
                    break
                if st.batch < n_steps:  # (after an epoch's last step: below, once it is validated)
                    pause()
            n_batches, st.perm = st.batch, None
            if sched is not None:
                sched.step()
            val_loss = self.validation_loss(net, model, val_split, ctx.device)
            record = {"epoch": epoch + 1, "val_loss": round(val_loss, 6),
                      **{f"train_{k}": round(float(v) / max(n_batches, 1), 6) for k, v in sums.items()}}
            history.append(record)
            bar.set_postfix({k.removeprefix("train_"): f"{v:.3g}" for k, v in record.items() if k != "epoch"})
            if val_loss < st.best_loss - self.min_delta:
                st.best_loss, st.best_epoch, st.bad_epochs = val_loss, epoch + 1, 0
                st.best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                st.bad_epochs += 1
            if out_of_steps:
                stopped = "max_steps"
                break
            if st.bad_epochs >= self.patience:
                stopped = "early_stopping"
                break
            if epoch + 1 < self.max_epochs:  # between two epochs: the next one starts with a new permutation
                st.epoch, st.batch = epoch + 1, 0
                pause()
        if st.best_state is not None:
            net.load_state_dict(st.best_state)
        return {
            "train_seconds": round(st.seconds + clock() - t0, 2),
            "epochs": len(history),
            "steps": st.steps,
            "best_epoch": st.best_epoch,
            "best_val_loss": round(st.best_loss, 6),
            "stopped": stopped,
            "world_size": world,
            "resumed_at_steps": st.resumed_at,
            "history": history,
        }

    @torch.no_grad()
    def validation_loss(self, net: nn.Module, model: nn.Module, split: SplitView, device: torch.device,
                        batch_size: int = 64) -> float:
        """Mean total loss on the validation split, with a fixed generator so epochs are comparable."""
        net.eval()
        gen = torch.Generator().manual_seed(self.seed + 1)
        total, n = 0.0, 0
        for i in range(0, len(split), batch_size):
            x, y = split[i : i + batch_size]
            terms = self.training_loss(net, model, x.to(device), y.to(device), gen)
            total += float(terms["loss"]) * len(x)
            n += len(x)
        return total / max(n, 1)

    @torch.no_grad()
    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch: Any = None) -> Tensor:
        if getattr(self, "_net", None) is None:
            raise MaskbenchError(f"{self.name}: call setup() (train or load the network) before explain()")
        masks = self.predict(self._net, model, images)  # (B, C, H, W), one pass for all classes
        idx = classes[:, :, None, None].expand(-1, -1, *masks.shape[-2:])
        return torch.gather(masks, 1, idx)
