"""The method contract, the method registry and plugin loading.

An attribution method is a dataclass whose fields are its hyperparameters. It implements

    explain(model, images, classes, *, batch=None) -> masks

* ``model``: the frozen classifier (``eval()``, no parameter gradients), on the images' device;
* ``images``: (B, 3, H, W) normalised images;
* ``classes``: (B, K) long, the classes to explain for each image (a class may repeat within a row);
* returns (B, K, H, W) float masks in [0, 1] at input resolution, on the images' device; 1 = relevant.

``batch`` (the :class:`~maskbench.datasets.base.Batch`) is passed only to reference rows that declare
``uses_ground_truth = True`` (the ground-truth oracle). Methods that must be trained (learned explainers)
override :meth:`setup`, which the runner calls once before explaining.

Register a method with :func:`register_method`; external packages add methods through the entry-point group
``maskbench.methods`` or by a module imported with ``--plugin``. Presets are named override sets: ``paper`` is
the published setting (the dataclass defaults), ``fast`` fits the default CPU run; ask for one with
``rise.paper`` or ``--preset paper``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from maskbench.benchmark.errors import MaskbenchError, MethodError, UnknownNameError
from maskbench.benchmark.registry import Registry
from maskbench.benchmark.storage import stable_hash

METHODS: Registry = Registry("method", entry_point_group="maskbench.methods")


@dataclass
class MethodContext:
    """What :meth:`AttributionMethod.setup` may use."""

    model: nn.Module
    dataset: str
    datasets: Any  # callable: split name -> AttributionDataset of the same data set
    num_classes: int
    device: torch.device
    cache_dir: Path
    seed: int = 0
    progress: bool = True
    classifier_key: str = ""
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # the data set's normalisation: input = (pixel - mean) / std
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


@dataclass
class AttributionMethod:
    """Base class of every method. Subclasses are dataclasses: their fields are the hyperparameters."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # short name for table rows (defaults to ``name``)
    family: ClassVar[str] = ""  # reference | gradient | perturbation | learned | plugin
    paper: ClassVar[str] = ""  # citation of the defining paper
    version: ClassVar[str] = "1"  # bump when outputs change: part of every cache key
    uses_ground_truth: ClassVar[bool] = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def setup(self, ctx: MethodContext) -> dict[str, Any]:
        """Prepare the method (e.g. train it). Returns information for the run manifest."""
        return {}

    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch: Any = None) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def cache_key(self) -> str:
        return stable_hash({"name": self.name, "version": self.version, "config": self.config()})

    @classmethod
    def display_name(cls) -> str:
        return cls.label or cls.name


def register_method(name: str | None = None, **meta: Any):
    """Class decorator: ``@register_method("rise")`` on an :class:`AttributionMethod` dataclass."""

    def wrapper(cls: type[AttributionMethod]) -> type[AttributionMethod]:
        if not (isinstance(cls, type) and issubclass(cls, AttributionMethod)):
            raise MaskbenchError(f"{cls!r} must subclass maskbench.methods.AttributionMethod to be registered")
        if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
            cls = dataclass(cls)
        key = name or cls.name
        if not key:
            raise MaskbenchError(f"{cls.__name__} has no name; pass one: @register_method('my-method')")
        cls.name = key
        METHODS.register(key, cls, **meta)
        return cls

    return wrapper


def method_presets(cls: type[AttributionMethod]) -> dict[str, dict[str, Any]]:
    """Every method has ``paper`` (its defaults); ``fast`` falls back to ``paper`` when not defined."""
    presets = {"paper": {}, **cls.presets}
    presets.setdefault("fast", presets["paper"])
    return presets


def build_method(spec: str, preset: str = "paper", **overrides: Any) -> AttributionMethod:
    """Build a method from ``"name"`` or ``"name.preset"`` (the dotted preset wins over ``preset``)."""
    if spec in METHODS or "." not in spec:  # a plain name, possibly with a dot (constant-0.5)
        name, dotted = spec, ""
    else:
        name, _, dotted = spec.rpartition(".")
    cls: type[AttributionMethod] = METHODS.get(name)
    presets = method_presets(cls)
    chosen = dotted or preset
    if chosen not in presets:
        raise UnknownNameError(f"preset of method '{name}'", chosen, presets)
    valid = {f.name for f in fields(cls)}
    params = {**presets[chosen], **overrides}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise MaskbenchError(
            f"Unknown hyperparameter(s) {unknown} for method '{name}'. Valid: {sorted(valid) or '(none)'}."
        )
    method = cls(**params)
    method.preset = chosen  # type: ignore[attr-defined]
    return method


def check_masks(masks: Tensor, images: Tensor, classes: Tensor, method: str) -> Tensor:
    """Validate a method's output; return a (B,) bool tensor that is True where an image's maps contain NaN.

    Wrong shape or values outside [0, 1] break the contract and raise :class:`MethodError`; NaN maps are
    reported to the caller, which counts them as failed images instead of scoring them.
    """
    b, _, h, w = images.shape
    expected = (b, classes.shape[1], h, w)
    if not isinstance(masks, Tensor) or tuple(masks.shape) != expected:
        got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise MethodError(f"Method '{method}' returned masks of shape {got}; expected (B, K, H, W) = {expected}.")
    if not masks.is_floating_point():
        raise MethodError(f"Method '{method}' returned {masks.dtype} masks; expected floating point in [0, 1].")
    nan = torch.isnan(masks).flatten(1).any(1)
    finite = masks[~torch.isnan(masks)]
    if finite.numel() and (bool((finite < -1e-5).any()) or bool((finite > 1 + 1e-5).any())):
        raise MethodError(
            f"Method '{method}' returned values in [{float(finite.min()):.4g}, {float(finite.max()):.4g}]; "
            f"masks must lie in [0, 1]."
        )
    return nan


def image_class_pairs(images: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
    """One row per (image, class), image-major: the images repeated K times (a fresh leaf that requires grad,
    for gradient methods) and the flat class targets."""
    x = images.detach().repeat_interleave(classes.shape[1], dim=0).requires_grad_(True)
    return x, classes.reshape(-1)


def normalize_maps(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Min-max normalise each (H, W) map of a (..., H, W) tensor to [0, 1].

    A constant map has no ranking to normalise: it becomes all ones if its value is positive and all zeros
    otherwise (no division by zero, no NaN). The runner counts constant maps in the manifest.
    """
    flat = maps.flatten(-2)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    span = hi - lo
    out = torch.where(span > eps, (flat - lo) / span.clamp_min(eps), (hi > 0).to(flat.dtype).expand_as(flat))
    return out.view_as(maps)
