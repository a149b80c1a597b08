"""Shared machinery of the learned attribution methods: a network trained once against the frozen classifier,
then explaining any image (all classes at once) in one forward pass.

A subclass provides three hooks:

* ``build_network(num_classes, image_size, model)`` -> the trainable ``nn.Module``;
* ``training_loss(net, model, images, labels, generator)`` -> dict of named loss terms, with the total under
  ``"loss"`` (the other entries are logged on the progress bar and in the training history);
* ``predict(net, model, images)`` -> (B, C, H, W) masks in [0, 1] for every class.

:meth:`LearnedMethod.setup` trains (or loads) the network: Adam, mini-batches from the data set's ``train``
split (held in memory when it fits in 2 GB, read batch by batch otherwise, see
:class:`~maskbench.datasets.base.SplitView`), early stopping on the ``val`` loss (``patience``, ``min_delta``),
a step limit (``max_steps``, which bounds the CPU ``fast`` presets reproducibly) and an optional wall-clock cap
(``max_train_seconds``), seeded. The checkpoint is cached under
``<cache>/learned/`` keyed by method, configuration, data set and classifier checkpoint hash, written atomically
and loaded with ``torch.load(..., weights_only=True)``. Under ``torchrun`` (``torch.distributed`` initialised)
the network is wrapped in DistributedDataParallel and each process takes its shard of every epoch (gloo on CPU,
NCCL on CUDA); rank 0 writes the checkpoint. The classifier stays frozen and in ``eval()`` throughout: its
parameters get no gradient and its BatchNorm statistics are not updated (the NeurIPS 2022 code let PyTorch
Lightning put it back in train mode).
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from maskbench.benchmark.errors import MaskbenchError
from maskbench.benchmark.storage import atomic_write, read_json, stable_hash, write_json
from maskbench.datasets.base import SplitView

from .base import AttributionMethod, MethodContext

TRAINING_FIELDS = ("max_train_seconds",)  # fields that do not change what a finished training means


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass
class LearnedMethod(AttributionMethod):
    lr: float = 1e-5
    batch_size: int = 16
    max_epochs: int = 1000
    max_steps: int | None = None  # optimiser steps; with max_epochs, what bounds a fast preset reproducibly
    patience: int = 5
    min_delta: float = 1e-3
    max_train_seconds: float | None = None  # a safety cap on wall time (then the result depends on the machine)
    seed: int = 42

    family = "learned"

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
        cfg = {k: v for k, v in self.config().items() if k not in TRAINING_FIELDS}
        return stable_hash({"method": self.name, "version": self.version, "config": cfg, "dataset": ctx.dataset,
                            "classifier": ctx.classifier_key})

    def setup(self, ctx: MethodContext) -> dict[str, Any]:
        key = self.training_key(ctx)
        path = ctx.cache_dir / "learned" / f"{self.name}-{key}.pt"
        meta_path = path.with_suffix(".json")
        train, val = ctx.datasets("train"), ctx.datasets("val")
        image_size = int(train[0].image.shape[-1])
        torch.manual_seed(self.seed)
        net = self.build_network(ctx.num_classes, image_size, ctx.model).to(ctx.device)
        if path.is_file() and meta_path.is_file():
            state = torch.load(path, map_location=ctx.device, weights_only=True)
            net.load_state_dict(state)
            info = {**read_json(meta_path), "trained_here": False}
        else:
            info = self.fit(net, ctx, train, val)
            if _dist()[0] == 0:
                buf = io.BytesIO()
                torch.save(net.state_dict(), buf)
                atomic_write(path, buf.getvalue())
                write_json(meta_path, info)
            info = {**info, "trained_here": True}
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self._net = net
        return {**{k: v for k, v in info.items() if k != "history"}, "checkpoint": str(path)}

    def fit(self, net: nn.Module, ctx: MethodContext, train: Any, val: Any) -> dict[str, Any]:
        """Train ``net`` in place; returns the training record (times, epochs, losses)."""
        from tqdm.auto import tqdm

        model = ctx.model
        if model.training or any(p.requires_grad for p in model.parameters()):
            raise MaskbenchError(f"{self.name}: the classifier must be frozen and in eval() before training")
        rank, world = _dist()
        train_split, val_split = SplitView(train), SplitView(val)
        train_net: nn.Module = net
        if world > 1:
            train_net = nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=self.lr)
        sched = self.lr_scheduler(opt)
        gen = torch.Generator().manual_seed(self.seed)
        best_loss, best_state, best_epoch, bad_epochs = math.inf, None, 0, 0
        history: list[dict[str, float]] = []
        t0 = time.perf_counter()
        steps = 0
        bar = tqdm(range(self.max_epochs), desc=f"train {self.name}", disable=not ctx.progress or rank != 0,
                   leave=False)
        stopped = "max_epochs"
        for epoch in bar:
            net.train()
            perm = torch.randperm(len(train_split), generator=gen)
            per_rank = len(perm) // world
            perm = perm[rank * per_rank : (rank + 1) * per_rank]
            sums: dict[str, Tensor] = {}
            n_batches = 0
            out_of_time = out_of_steps = False
            n_steps = max(len(perm) // self.batch_size, 1)  # equal step counts on every rank (DDP)
            for b in range(n_steps):
                idx = perm[b * self.batch_size : (b + 1) * self.batch_size]
                xb, yb = train_split[idx]
                terms = self.training_loss(train_net, model, xb.to(ctx.device), yb.to(ctx.device), gen)
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                opt.step()
                steps += 1
                n_batches += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.detach()
                if self.max_steps is not None and steps >= self.max_steps:
                    out_of_steps = True
                    break
                if self.max_train_seconds is not None:
                    late = time.perf_counter() - t0 > self.max_train_seconds
                    if world > 1:  # every rank stops at the same step
                        flag = torch.tensor(float(late))
                        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                        late = bool(flag.item() > 0)
                    if late:
                        out_of_time = True
                        break
            if sched is not None:
                sched.step()
            val_loss = self.validation_loss(net, model, val_split, ctx.device)
            record = {"epoch": epoch + 1, "val_loss": round(val_loss, 6),
                      **{f"train_{k}": round(float(v) / max(n_batches, 1), 6) for k, v in sums.items()}}
            history.append(record)
            bar.set_postfix({k.removeprefix("train_"): f"{v:.3g}" for k, v in record.items() if k != "epoch"})
            if val_loss < best_loss - self.min_delta:
                best_loss, best_epoch, bad_epochs = val_loss, epoch + 1, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                bad_epochs += 1
            if out_of_time:
                stopped = "time_budget"
                break
            if out_of_steps:
                stopped = "max_steps"
                break
            if bad_epochs >= self.patience:
                stopped = "early_stopping"
                break
        if best_state is not None:
            net.load_state_dict(best_state)
        return {
            "train_seconds": round(time.perf_counter() - t0, 2),
            "epochs": len(history),
            "steps": steps,
            "best_epoch": best_epoch,
            "best_val_loss": round(best_loss, 6),
            "stopped": stopped,
            "world_size": world,
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
