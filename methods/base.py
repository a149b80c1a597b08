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
import difflib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from maskbench.core.errors import MaskbenchError, MethodError, UnknownNameError
from maskbench.core.provenance import code_hash
from maskbench.core.registry import Registry
from maskbench.core.storage import stable_hash


def _adopt_entry_point(name: str, obj: Any) -> Any:
    """An entry-point class is registered under its entry-point name, decorated or not, and never as ""."""
    if not (isinstance(obj, type) and issubclass(obj, AttributionMethod)):
        raise MaskbenchError(f"Entry point '{name}' in group 'maskbench.methods' points to {obj!r}, which is "
                             f"not a subclass of maskbench.methods.AttributionMethod.")
    if obj.name and obj.name != name:
        raise MaskbenchError(f"Entry point '{name}' in group 'maskbench.methods' points to {obj.__qualname__}, "
                             f"which is registered as '{obj.name}'; use the same name in both places.")
    if not obj.name:
        obj.name = name
    if not dataclasses.is_dataclass(obj) or "__dataclass_fields__" not in obj.__dict__:
        obj = dataclass(obj)
    return obj


METHODS: Registry = Registry("method", entry_point_group="maskbench.methods", adopt=_adopt_entry_point)


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
    # the published runs' values per setting "<classifier>-<data set>" (e.g. "resnet50-voc"), applied on top of
    # the ``paper`` preset when a run of that setting builds the method at ``paper``
    settings: ClassVar[dict[str, dict[str, Any]]] = {}
    # fields that do not change the masks (memory knobs, limits on how long training may run): not in the key
    not_in_key: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        """Validate the hyperparameters when the method is built: the field types here (:func:`check_types`);
        a subclass checks its ranges and choices in its own ``__post_init__``, after ``super().__post_init__()``,
        with :func:`check_range` and :func:`check_choice` (raising :class:`HyperparameterError`)."""
        check_types(self)

    def setup(self, ctx: MethodContext) -> dict[str, Any]:
        """Prepare the method (e.g. train it). Returns information for the run manifest."""
        return {}

    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch: Any = None) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def cache_key(self) -> str:
        """What the masks depend on: name, version, hyperparameters and the code (:func:`code_hash`)."""
        config = {k: v for k, v in self.config().items() if k not in self.not_in_key}
        return stable_hash({"name": self.name, "version": self.version, "config": config,
                            "code": code_hash(type(self))})

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


def build_method(spec: str, preset: str = "paper", setting: str | None = None, **overrides: Any) -> AttributionMethod:
    """Build a method from ``"name"`` or ``"name.preset"`` (the dotted preset wins over ``preset``). At the
    ``paper`` preset, ``setting`` (``"<classifier>-<data set>"``, e.g. ``"resnet50-coco"``) adds the method's
    published values for that setting (:attr:`AttributionMethod.settings`); overrides come last."""
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
    published = cls.settings.get(setting, {}) if chosen == "paper" and setting else {}
    params = {**presets[chosen], **published, **overrides}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise MaskbenchError(
            f"Unknown hyperparameter(s) {unknown} for method '{name}'. Valid: {sorted(valid) or '(none)'}."
        )
    method = cls(**params)
    method.preset = chosen  # type: ignore[attr-defined]
    method.setting = setting if published else None  # type: ignore[attr-defined]
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


# -- hyperparameter validation ------------------------------------------------------------------------------------


class HyperparameterError(MaskbenchError, ValueError):
    """A method's hyperparameter of the wrong type or outside its valid range or choices; raised when the method is
    built. The message names the method, the parameter, the bad value and what is valid."""


_TYPE_NAMES: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}
_KIND_TEXT = {bool: "True or False", int: "an int", float: "a number", str: "a string", type(None): "None"}


def _method_label(method: Any) -> str:
    if isinstance(method, str):
        return method
    return getattr(method, "name", "") or type(method).__name__


def hyperparameter_error(method: Any, name: str, value: Any, expected: str) -> HyperparameterError:
    """The error for ``name=value`` of ``method`` (an instance or a name), ``expected`` saying what is valid."""
    return HyperparameterError(
        f"Invalid hyperparameter {name}={value!r} for method '{_method_label(method)}': expected {expected}."
    )


def _annotation_types(annotation: Any) -> tuple[type, ...] | None:
    """The plain types a field annotation allows (``int``, ``float | None``, ...); None when it is anything else
    (``list[float]``, a class): such fields are left to the method's own checks."""
    if isinstance(annotation, str):
        parts = [p.strip() for p in annotation.replace("Optional[", "").rstrip("]").split("|")]
        kinds = [_TYPE_NAMES.get(p) for p in parts]
        return None if any(k is None for k in kinds) else tuple(k for k in kinds if k is not None)
    if annotation in _KIND_TEXT:
        return (annotation,)
    args = getattr(annotation, "__args__", None)
    if args and type(annotation).__name__ in ("UnionType", "_UnionGenericAlias"):
        kinds = [_annotation_types(a) for a in args]
        return None if any(k is None for k in kinds) else tuple(t for k in kinds if k for t in k)
    return None


def _is_kind(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_types(method: Any) -> None:
    """Check every dataclass field of ``method`` annotated with a plain type (int, float, bool, str, None or a
    union of them) against its value: an int field refuses 2.5, "8" and True, a bool field refuses "maybe" and 1, a
    float field accepts ints. Fields with other annotations are not checked here."""
    for f in dataclasses.fields(method):
        kinds = _annotation_types(f.type)
        if not kinds:
            continue
        value = getattr(method, f.name)
        if not any(_is_kind(value, k) for k in kinds):
            expected = " or ".join(_KIND_TEXT[k] for k in kinds)
            raise hyperparameter_error(method, f.name, value, expected)


def _field_types(method: Any, name: str) -> tuple[type, ...]:
    """The plain types the annotation of field ``name`` allows; () when unknown."""
    for f in dataclasses.fields(method):
        if f.name == name:
            return _annotation_types(f.type) or ()
    return ()


def check_range(method: Any, name: str, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Require the field ``name`` of ``method`` to be a finite number in the interval from ``low`` to ``high``
    (closed ends unless ``low_open``/``high_open``; None: unbounded). None passes when the field's annotation
    allows it (``int | None``)."""
    value = getattr(method, name)
    kinds = _field_types(method, name)
    if value is None and type(None) in kinds:
        return
    what = "an int" if int in kinds and float not in kinds else "a number"
    if low is not None and high is not None:
        expected = f"{what} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        expected = f"{what} {'>' if low_open else '>='} {low}"
    elif high is not None:
        expected = f"{what} {'<' if high_open else '<='} {high}"
    else:
        expected = f"{what} (finite)"
    if type(None) in kinds:
        expected += " or None"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise hyperparameter_error(method, name, value, expected)


def check_choice(method: Any, name: str, choices: Sequence[Any]) -> None:
    """Require the field ``name`` of ``method`` to be one of ``choices`` (suggesting the closest for a typo)."""
    value = getattr(method, name)
    if isinstance(value, bool) or value not in choices:
        expected = "one of " + ", ".join(repr(c) for c in choices)
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
        if close:
            expected += f" (did you mean {close[0]!r}?)"
        raise hyperparameter_error(method, name, value, expected)
