"""The explained classifiers (the *Explanandum*): a registry, the architectures, training and caching.

Every classifier is a multi-label model returning logits (B, C) and exposes

* ``cam_layer``: the module whose output Grad-CAM style methods read (last convolutional stage);
* ``feature_layers``: multi-scale feature modules, shallow to deep (for decoders that read the classifier).

Registered: ``smallcnn`` (trained from scratch on the synthetic set by maskbench itself, on CPU), and
``vgg16`` / ``resnet50`` with multi-label heads as in Stalder et al. (NeurIPS 2022): torchvision ImageNet
backbones, frozen, with a new head trained with BCE (VGG-16: 25088-4096-4096-C MLP with dropout, Adam 1e-5;
ResNet-50: a linear layer, Adam 1e-4). Trained checkpoints are cached under the cache directory, keyed by
the data's content, architecture and recipe, and loaded with ``torch.load(..., weights_only=True)``; the
classifier of the published default run ships in ``classifiers/checkpoints/`` and is looked up first, so every
machine explains the same model (``--train-classifier`` trains one here instead). While explained
or scored a classifier is always in ``eval()`` with ``requires_grad`` off (:func:`freeze`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskbench.core.checkpoints import CheckpointError, save_checkpoint
from maskbench.core.checkpoints import load_checkpoint as load_state
from maskbench.core.errors import MaskbenchError, UnknownNameError
from maskbench.core.ranking import average_precision
from maskbench.core.registry import Registry
from maskbench.core.storage import file_sha256, read_json, stable_hash, write_json
from maskbench.datasets.base import stack_split

CLASSIFIERS: Registry = Registry("model")
# Checkpoints shipped with maskbench (the classifier of the published default run), looked up before the cache.
SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoints"


@dataclass(frozen=True)
class TrainRecipe:
    """How a classifier is trained on a data set's ``train`` split (model selection on ``val``).

    ``schedule``: ``onecycle`` (one-cycle learning rate, the synthetic set's recipe) or ``constant`` (NN-Explainer's:
    Adam at a fixed rate). ``monitor``: early stopping on the validation ``val_map`` (higher is better) or on the
    validation BCE ``val_loss`` (lower; an epoch improves when it beats the best by more than ``min_delta``, as
    PyTorch Lightning's ``EarlyStopping``); the weights of the best epoch are kept.
    """

    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    freeze_backbone: bool = False
    hflip: bool = True
    seed: int = 0
    patience: int = 5  # epochs without improvement before stopping
    schedule: str = "onecycle"
    monitor: str = "val_map"
    min_delta: float = 0.0


# Fields added to TrainRecipe after checkpoints were cached and shipped: part of a checkpoint's key only when they
# differ from these values, so the existing keys (the shipped smallcnn among them) stay valid.
_LATER_FIELDS = {"schedule": "onecycle", "monitor": "val_map", "min_delta": 0.0}


def recipe_key(recipe: TrainRecipe) -> dict[str, Any]:
    """The recipe as it enters a classifier checkpoint's cache key (see :data:`_LATER_FIELDS`)."""
    return {k: v for k, v in asdict(recipe).items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}


# NN-Explainer's classifier recipe (src/main.py, src/models/classifier.py; ../shared/reference): the ImageNet
# backbone frozen, a new multi-label head, BCE, Adam at a constant rate without weight decay, batch 16, seed 42,
# no augmentation, no epoch limit (PyTorch Lightning's 1,000), early stopping on the validation loss (min_delta
# 1e-3, patience 5; 2 in the COCO configs). Deliberate difference: the frozen backbone stays in eval() (PyTorch
# Lightning put it back in train mode, so ResNet-50's BatchNorm statistics drifted to VOC/COCO).
def neurips_recipe(lr: float) -> TrainRecipe:
    return TrainRecipe(epochs=1000, batch_size=16, lr=lr, weight_decay=0.0, freeze_backbone=True, hflip=False,
                       seed=42, patience=5, schedule="constant", monitor="val_loss", min_delta=1e-3)


class Classifier(nn.Module):
    """Base of the registered classifiers. ``probabilities``: how logits become class probabilities, ``sigmoid``
    for a multi-label classifier (one per class, trained with BCE), ``softmax`` for a single-label one
    (:mod:`maskbench.core.scores`: the methods' ``score="auto"`` and the metrics read it)."""

    probabilities: str = "sigmoid"
    num_classes: int
    cam_layer: nn.Module
    feature_layers: list[nn.Module]


class SmallCNN(Classifier):
    """A small, fast CNN for the synthetic set: four conv-BN-ReLU blocks, global average pool, linear.

    The first convolution has stride 2 and the first two blocks end in a 2x2 max-pool, so at 64 px the
    last two blocks work at 8x8 (the last one is Grad-CAM's layer). About 45 k parameters: small enough
    for the perturbation methods to run in the default CPU benchmark (measured speeds: ``make perf``).
    """

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 48, 64), dropout: float = 0.1,
                 stem_stride: int = 2, pools: tuple[bool, ...] = (True, True, False, False)):
        super().__init__()
        self.num_classes = num_classes
        blocks = []
        cin = 3
        for i, w in enumerate(widths):
            layers: list[nn.Module] = [
                nn.Conv2d(cin, w, 3, stride=stem_stride if i == 0 else 1, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(),
            ]
            if i < len(pools) and pools[i]:
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)

    @property
    def cam_layer(self) -> nn.Module:  # type: ignore[override]
        return self.blocks[-1]

    @property
    def feature_layers(self) -> list[nn.Module]:  # type: ignore[override]
        return list(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.blocks(x)
        return self.head(self.dropout(f.mean(dim=(2, 3))))


IMAGENET_WEIGHTS = {"vgg16": "VGG16_Weights.IMAGENET1K_V1", "resnet50": "ResNet50_Weights.IMAGENET1K_V1"}


def weights_file(arch: str) -> Path:
    """Where torchvision keeps (and, offline, expects) ``arch``'s ImageNet weights: ``<torch hub>/checkpoints/``."""
    import torchvision

    url = torchvision.models.get_weight(IMAGENET_WEIGHTS[arch]).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


class TorchvisionClassifier(Classifier):
    """A torchvision backbone with a multi-label head (see module docstring), or with ``imagenet_head`` the
    torchvision ImageNet model itself: its own 1,000-class head, no fine-tuning, softmax probabilities (the
    distribution-guided paper's classifiers)."""

    def __init__(self, arch: str, num_classes: int, pretrained_backbone: bool = True, imagenet_head: bool = False):
        super().__init__()
        import torchvision

        if imagenet_head and num_classes != 1000:
            raise MaskbenchError(f"{arch} with its ImageNet head has 1000 classes, not {num_classes}.")
        self.num_classes = num_classes
        self.arch = arch
        weights = IMAGENET_WEIGHTS[arch] if pretrained_backbone else None
        try:
            net = torchvision.models.get_model(arch, weights=weights)
        except Exception as exc:  # no internet, no cached weights
            raise MaskbenchError(
                f"Could not load the ImageNet weights of {arch} ({weights}): {type(exc).__name__}. Without "
                f"internet, torchvision expects the file {weights_file(arch)} (from "
                f"{torchvision.models.get_weight(weights).url}); or pass --checkpoint with a trained maskbench "
                f"checkpoint of this model."
            ) from None
        if arch == "vgg16":
            backbone = nn.Sequential(net.features, net.avgpool)
            cam = net.features[-1]  # last max-pool, 7x7 at 224 px (as NN-Explainer)
            features = [net.features[i] for i in (3, 8, 15, 22, 29)]
            new_head = [nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(4096, 4096),
                        nn.ReLU(True), nn.Dropout(0.5), nn.Linear(4096, num_classes)]
            imagenet = net.classifier
        elif arch == "resnet50":
            backbone = nn.Sequential(*list(net.children())[:-1])
            cam, features = net.layer4[-1], [net.layer1, net.layer2, net.layer3, net.layer4]
            new_head = [nn.Linear(2048, num_classes)]
            imagenet = net.fc
        else:  # pragma: no cover - guarded by the registry
            raise MaskbenchError(f"Unsupported torchvision architecture {arch}")
        if imagenet_head:  # torchvision's own 1,000-class head
            self.probabilities = "softmax"
        self.backbone = backbone
        self.head = nn.Sequential(nn.Flatten(), imagenet) if imagenet_head else nn.Sequential(nn.Flatten(), *new_head)
        self._cam, self._features = cam, features

    @property
    def cam_layer(self) -> nn.Module:  # type: ignore[override]
        return self._cam

    @property
    def feature_layers(self) -> list[nn.Module]:  # type: ignore[override]
        return list(self._features)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass(frozen=True)
class ClassifierSpec:
    """A registry entry: how to build the network and how to train it."""

    name: str
    build: Callable[..., Classifier]
    recipe: TrainRecipe
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    dataset_recipes: dict[str, dict[str, Any]] = field(default_factory=dict)  # per data set: recipe fields changed
    # a classifier made from another one's checkpoint (``grid-smallcnn``): replaces :func:`get_classifier`'s lookup
    # and training; called with get_classifier's arguments (``name`` first), returns (frozen model, manifest info)
    load: Callable[..., tuple[Classifier, dict[str, Any]]] | None = None


def _register(spec: ClassifierSpec) -> None:
    CLASSIFIERS.register(spec.name, spec, origin=getattr(spec.build, "__module__", None))


_register(
    ClassifierSpec(
        "smallcnn",
        lambda num_classes, **kw: SmallCNN(num_classes, **kw),
        TrainRecipe(epochs=20, batch_size=64, lr=3e-3, weight_decay=1e-4, patience=5),
        "4-block CNN trained from scratch (synthetic data)",
    )
)
_register(
    ClassifierSpec(
        "vgg16",
        lambda num_classes, **kw: TorchvisionClassifier("vgg16", num_classes, **kw),
        neurips_recipe(lr=1e-5),
        "VGG-16 ImageNet backbone (frozen) + 3-layer multi-label head, as NN-Explainer",
        dataset_recipes={"coco": {"patience": 2}},
    )
)
_register(
    ClassifierSpec(
        "resnet50",
        lambda num_classes, **kw: TorchvisionClassifier("resnet50", num_classes, **kw),
        neurips_recipe(lr=1e-4),
        "ResNet-50 ImageNet backbone (frozen) + linear multi-label head, as NN-Explainer",
        dataset_recipes={"coco": {"patience": 2}},
    )
)


def freeze(model: nn.Module) -> nn.Module:
    """Put the explained model in eval mode (no dropout, BatchNorm uses running stats) and stop its grads."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def class_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class average precision (N, C) -> (C,) over the N images (:func:`~maskbench.core.ranking.average_precision`
    with its tie rule), NaN for a class without positives."""
    return average_precision(scores.T, targets.T > 0).float()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    out = [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def train_classifier(
    model: Classifier,
    train_set: Any,
    val_set: Any,
    recipe: TrainRecipe,
    device: torch.device,
    progress: bool = True,
) -> dict[str, Any]:
    """Multi-label BCE training with Adam(W); keeps the weights of the best validation epoch (early stopping on
    ``recipe.monitor``, see :class:`TrainRecipe`).

    The training split is held in memory (the synthetic set is small); VOC/COCO-sized runs belong on a GPU.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    x_train, y_train = stack_split(train_set)
    x_val, y_val = stack_split(val_set)
    model.to(device)
    if recipe.freeze_backbone and isinstance(model, TorchvisionClassifier):
        for p in model.backbone_parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / recipe.batch_size)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch)
             if recipe.schedule == "onecycle" else None)
    loss_fn = nn.BCEWithLogitsLoss()
    sign = 1.0 if recipe.monitor == "val_map" else -1.0  # the monitored value, made "higher is better"
    best = (-math.inf, None, -1)
    history = []
    t0 = time.perf_counter()
    bar = tqdm(range(recipe.epochs), desc=f"train {type(model).__name__}", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        if recipe.freeze_backbone and isinstance(model, TorchvisionClassifier):
            model.backbone.eval()  # frozen backbone: BatchNorm statistics stay ImageNet's
        perm = torch.randperm(len(x_train), generator=gen)
        total = torch.zeros((), device=device)
        for i in range(0, len(perm), recipe.batch_size):
            idx = perm[i : i + recipe.batch_size]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            if recipe.hflip:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                xb = torch.where(flip.to(device)[:, None, None, None], xb.flip(-1), xb)
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.detach() * len(idx)
        model.eval()
        val_logits = predict(model, x_val, device)
        val_map = float(class_average_precision(val_logits, y_val).nanmean())
        val_loss = float(loss_fn(val_logits, y_val.float()))
        train_loss = float(total) / len(x_train)
        history.append({"epoch": epoch + 1, "train_loss": round(train_loss, 5), "val_map": round(val_map, 5),
                        "val_loss": round(val_loss, 5)})
        bar.set_postfix(loss=f"{train_loss:.4f}", val_mAP=f"{val_map:.4f}")
        value = sign * (val_map if recipe.monitor == "val_map" else val_loss)
        if value > best[0] + (recipe.min_delta if best[1] is not None else 0.0):
            best = (value, {k: v.detach().clone() for k, v in model.state_dict().items()}, epoch + 1)
        elif epoch + 1 - best[2] >= recipe.patience:
            break
    assert best[1] is not None
    model.load_state_dict(best[1])
    return {
        "train_seconds": round(time.perf_counter() - t0, 2),
        "best_epoch": best[2],
        "val_map": history[best[2] - 1]["val_map"],
        "val_loss": history[best[2] - 1]["val_loss"],
        "history": history,
    }


BUILD_OPTIONS = ("pretrained_backbone",)  # --classifier-param keys that change how the network is built


def classifier_settings(name: str, params: dict[str, Any] | None, dataset: str | None = None
                        ) -> tuple[TrainRecipe, dict[str, Any]]:
    """``name``'s training recipe on ``dataset`` (its ``dataset_recipes`` entry applied) and its build options, with
    the ``--classifier-param`` overrides applied last.

    Keys are :class:`TrainRecipe` fields (``epochs``, ``lr``, ...) or :data:`BUILD_OPTIONS` (``pretrained_backbone``:
    False builds a torchvision classifier from random weights, e.g. to exercise the code paths offline); anything
    else is an error listing the valid keys.
    """
    spec: ClassifierSpec = CLASSIFIERS.get(name)
    recipe_fields = [f.name for f in dataclass_fields(TrainRecipe)]
    params = dict(params or {})
    unknown = [k for k in params if k not in recipe_fields and k not in BUILD_OPTIONS]
    if unknown:
        raise UnknownNameError("--classifier-param key", unknown[0], [*recipe_fields, *BUILD_OPTIONS])
    build = {k: v for k, v in params.items() if k in BUILD_OPTIONS}
    if build and name == "smallcnn":
        raise MaskbenchError(f"--classifier-param {', '.join(build)}: smallcnn is always trained from scratch.")
    recipe = replace(spec.recipe, **spec.dataset_recipes.get(dataset or "", {}))
    recipe = replace(recipe, **{k: v for k, v in params.items() if k in recipe_fields})
    if recipe.schedule not in ("onecycle", "constant") or recipe.monitor not in ("val_map", "val_loss"):
        raise MaskbenchError(f"Classifier recipe of {name}: schedule must be onecycle or constant and monitor val_map "
                             f"or val_loss, got {recipe.schedule!r} and {recipe.monitor!r}.")
    return recipe, build


def build_classifier(name: str, num_classes: int, **options: Any) -> Classifier:
    spec: ClassifierSpec = CLASSIFIERS.get(name)
    return spec.build(num_classes, **{**spec.options, **options})


def load_checkpoint(model: nn.Module, path: str | Path, device: torch.device) -> None:
    """Load a classifier's weights (a state dict, or a dict with a ``state_dict`` entry) into ``model``."""
    if not Path(path).is_file():
        raise MaskbenchError(f"Classifier checkpoint not found: {path}")
    try:
        state = load_state(path, map_location=device)
    except CheckpointError as exc:
        raise MaskbenchError(f"Cannot load the classifier checkpoint {exc.path}: {exc.reason}. Delete it and rerun "
                             f"(a cached one is retrained), or pass a valid --checkpoint.") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise MaskbenchError(f"Checkpoint {path} does not fit this model: {exc}") from None


def imagenet_classifier(name: str, device: torch.device, params: dict[str, Any] | None = None,
                        seed: int = 0) -> tuple[Classifier, dict[str, Any]]:
    """torchvision's own ImageNet ``vgg16`` / ``resnet50`` (no fine-tuning, softmax), frozen, with its manifest
    entry (weights name and file, the file's SHA-256). ``params``: the run's ``--classifier-param``; only
    ``pretrained_backbone=False`` applies (random weights drawn with ``seed``: a code-path check, nothing more)."""
    if name not in IMAGENET_WEIGHTS:
        raise MaskbenchError(f"Classifier '{name}' has no ImageNet weights; on ImageNet use one of "
                             f"{', '.join(IMAGENET_WEIGHTS)} (torchvision's weights), or pass --checkpoint.")
    _, build = classifier_settings(name, params)
    recipe_only = sorted(set(params or {}) - set(build))
    if recipe_only:
        raise MaskbenchError(f"--classifier-param {', '.join(recipe_only)}: the ImageNet classifiers are "
                             f"torchvision's, not trained by maskbench.")
    if not build.get("pretrained_backbone", True):
        torch.manual_seed(seed)
        model = TorchvisionClassifier(name, 1000, pretrained_backbone=False, imagenet_head=True).to(device)
        info = {"model": name, "weights": f"none: random initialisation (seed {seed})", "checkpoint": None,
                "checkpoint_sha256": f"random-{name}-seed{seed}", "trained_here": False, "fine_tuned": False,
                "probabilities": "softmax"}
        return freeze(model), info
    model = TorchvisionClassifier(name, 1000, imagenet_head=True).to(device)
    path = weights_file(name)
    info = {"model": name, "weights": IMAGENET_WEIGHTS[name], "checkpoint": str(path),
            "checkpoint_sha256": file_sha256(path) if path.is_file() else "unknown", "trained_here": False,
            "fine_tuned": False, "probabilities": "softmax"}
    return freeze(model), info


def get_classifier(
    name: str,
    datasets: Callable[[str], Any],
    dataset_key: str,
    num_classes: int,
    device: torch.device,
    cache_dir: Path,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    train_new: bool = False,
    params: dict[str, Any] | None = None,
    dataset: str | None = None,
) -> tuple[Classifier, dict[str, Any]]:
    """Return the frozen classifier for a data set, training and caching it if needed.

    ``datasets(split)`` builds a split of the data set; ``dataset_key`` identifies the data (its content) for the
    cache. A checkpoint shipped with maskbench (:data:`SHIPPED_DIR`) whose key fits is used first, so every
    machine explains the same classifier; ``train_new`` skips it and uses one trained on this machine (cached).
    The returned info (checkpoint path and hash, test mAP, training time) goes into the run manifest.
    ``params``: ``--classifier-param`` overrides of the recipe and build options (:func:`classifier_settings`),
    part of the cache key.
    """
    spec: ClassifierSpec = CLASSIFIERS.get(name)
    if spec.load is not None:  # built from another classifier's checkpoint: its own lookup
        return spec.load(name, datasets, dataset_key, num_classes, device, cache_dir, checkpoint, progress,
                         train_new, params, dataset)
    recipe, build = classifier_settings(name, params, dataset)
    info: dict[str, Any] = {"model": name, "recipe": asdict(recipe), **({"build": build} if build else {})}
    if checkpoint is not None:
        model = spec.build(num_classes, **({"pretrained_backbone": False} if name != "smallcnn" else {}))
        load_checkpoint(model, checkpoint, device)
        info.update(checkpoint=str(checkpoint), checkpoint_sha256=file_sha256(checkpoint), trained_here=False)
    else:
        key = stable_hash({"model": name, "recipe": recipe_key(recipe), "data": dataset_key, "v": 1,
                           **({"build": build} if build else {})})
        path = cache_dir / "classifiers" / f"{name}-{key}.pt"
        shipped = SHIPPED_DIR / path.name
        if not train_new and shipped.is_file() and shipped.with_suffix(".json").is_file():
            path = shipped
        meta_path = path.with_suffix(".json")
        model = None
        if path.is_file() and meta_path.is_file():
            model = spec.build(num_classes, **({"pretrained_backbone": False} if name != "smallcnn" else {}))
            try:
                load_checkpoint(model, path, device)
                info.update(read_json(meta_path))
            except (MaskbenchError, ValueError) as exc:
                if path.parent == SHIPPED_DIR:
                    raise MaskbenchError(f"The shipped classifier {path} is damaged ({exc}); restore it with "
                                         f"`git checkout -- {path.name}` or pass --train-classifier.") from None
                # a damaged cached checkpoint costs one retraining, not the run
                print(f"maskbench: damaged cached classifier {path} ({exc}); retraining it", file=sys.stderr)
                model = None
            else:
                info["trained_here"] = False
                info["shipped"] = path.parent == SHIPPED_DIR
        if model is None:
            model = spec.build(num_classes, **build)
            train_info = train_classifier(model, datasets("train"), datasets("val"), recipe, device, progress)
            test = datasets("test")
            x_test, y_test = stack_split(test)
            freeze(model)
            ap = class_average_precision(predict(model, x_test, device), y_test)
            train_info["test_map"] = round(float(ap.nanmean()), 5)
            train_info["test_ap_per_class"] = [round(float(a), 5) for a in ap]
            save_checkpoint(path, model.state_dict())
            write_json(meta_path, train_info)
            info.update(train_info)
            info["trained_here"] = True
        info.update(checkpoint=str(path), checkpoint_sha256=file_sha256(path))
    model.to(device)
    freeze(model)
    return model, info
