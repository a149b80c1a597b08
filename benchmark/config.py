"""Run configuration: what ``maskbench bench`` runs, with sane defaults for every option.

The resolved configuration is written to the run manifest together with the git revision and library
versions, so every number in ``results/`` can be traced back to the code and settings that produced it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from maskbench.core.errors import MaskbenchError, UnknownNameError
from maskbench.datasets.base import check_image_size

# The default benchmark: reference rows first (the sanity rows of Table 2), then the methods.
REFERENCE_METHODS = [
    "constant-0",
    "constant-0.5",
    "constant-1",
    "ground-truth",
    "centre-gaussian",
    "random-uniform",
]
DEFAULT_METHODS = [
    *REFERENCE_METHODS,
    "gradcam",
    "gradcam++",
    "gradient",
    "smoothgrad",
    "integrated-gradients",
    "rise",
    "extremal-perturbation",
    "igos++",
    "meaningful-perturbation",
    "explainer",
    "rtis",
    "dgmp-bf",
    "dgmp-cf",
    "dgmp-cf-ft",
]

PRESETS = ("fast", "paper")

# The classifier explained by default on each data set.
DEFAULT_MODELS = {"synthetic": "smallcnn", "synthetic-coco": "smallcnn", "voc": "vgg16", "coco": "vgg16",
                  "imagenet": "resnet50", "synthetic-grid": "grid-smallcnn"}

# Classes every image is explained for besides its own (the class-specific masking table's targets).
DEFAULT_TABLE_CLASSES: dict[str, list[str] | str] = {
    "synthetic": "all",
    "synthetic-coco": "all",
    "voc": ["bottle", "car", "cat", "dog", "person"],
    "coco": ["bottle", "car", "cat", "dog", "person"],
    "imagenet": [],  # single-label: each image is explained for its class (the distribution-guided paper)
    # 2x2 grid, 24 classes "<cell>:<class>": two classes in every cell, so the class table's off-diagonal holds the
    # same class in another cell (which the disconnected classifier cannot see) as well as another class
    "synthetic-grid": [f"{cell}:{c}" for c in ("disc", "square") for cell in ("tl", "tr", "bl", "br")],
}


@dataclass
class RunConfig:
    dataset: str = "synthetic"
    model: str | None = None  # None: the data set's default classifier (DEFAULT_MODELS)
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    split: str = "test"
    limit: int | None = None
    batch_size: int = 32
    device: str = "auto"
    seed: int = 0
    preset: str = "fast"
    data_root: str | None = None
    image_size: int | None = None
    results_dir: str = "results"
    cache_dir: str | None = None
    plugins: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    table_classes: list[str] | str | None = None  # None: the data set's default
    method_params: dict[str, Any] = field(default_factory=dict)  # hyperparameter overrides for every method
    classifier_params: dict[str, Any] = field(default_factory=dict)  # recipe / build overrides of the classifier
    resume: bool = True
    progress: bool = True
    run_name: str | None = None  # the results folder <results>/<dataset>/<run_name>; None: named after the run
    train_classifier: bool = False  # train a new classifier even where a shipped or cached one fits
    overwrite: bool = False  # a named folder holding another run is replaced instead of refused
    extra_metrics: list[str] = field(default_factory=list)  # optional metrics (or their tables) to score too
    threads: str = "auto"  # torch intra-op threads: auto (the idle cores at start, see threads.py) or a number

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = DEFAULT_MODELS.get(self.dataset, "smallcnn")
        if self.preset not in PRESETS:
            raise UnknownNameError("preset", self.preset, PRESETS)
        if self.limit is not None and self.limit <= 0:
            raise MaskbenchError(f"--limit must be positive, got {self.limit}")
        if self.batch_size <= 0:
            raise MaskbenchError(f"--batch-size must be positive, got {self.batch_size}")
        check_image_size(self.image_size, "--image-size")

    def run_label(self, classifier_sha256: str | None = None) -> str:
        """The results folder's name: the classifier, then what differs from the data set's default run.

        The default run (test split, every image, preset ``fast``, native size, default table classes and
        classifier, no overrides) is ``<model>``; a partial or different run gets its own folder, e.g.
        ``smallcnn-limit50`` or ``vgg16-split-val-paper``, so it never writes into the published results.
        ``classifier_sha256``: the ``--checkpoint``'s hash when the caller has it (else the file is hashed).
        """
        from maskbench.core.storage import file_sha256, stable_hash

        parts = [str(self.model)]
        if self.split != "test":
            parts.append(f"split-{self.split}")
        if self.limit:
            parts.append(f"limit{self.limit}")
        if self.preset != "fast":
            parts.append(self.preset)
        if self.image_size:
            parts.append(f"size{self.image_size}")
        if self.table_classes is not None:
            parts.append("classes-" + stable_hash(self.table_classes, 6))
        if self.checkpoint:
            sha = classifier_sha256 or (file_sha256(self.checkpoint) if Path(self.checkpoint).is_file() else "x")
            parts.append("ckpt-" + sha[:8])
        elif self.train_classifier:
            parts.append("retrained")
        if self.classifier_params:
            parts.append("clf-" + stable_hash(self.classifier_params, 6))
        params = self.mask_params()
        if params:
            parts.append("params-" + stable_hash(params, 6))
        if self.seed != 0:
            parts.append(f"seed{self.seed}")
        return "-".join(parts)

    def mask_params(self) -> dict[str, Any]:
        """The ``--param`` overrides that change masks: memory knobs and training limits (a method's
        ``not_in_key`` fields, e.g. ``max_batch``) leave the run in its folder, as they leave the cache keys."""
        from dataclasses import fields

        from maskbench.methods import METHODS

        names = [m if m in METHODS or "." not in m else m.rpartition(".")[0] for m in self.methods]
        classes = {n: METHODS.get(n) for n in names if n in METHODS}
        out = {}
        for key, value in self.method_params.items():
            method, dot, name = key.rpartition(".")
            owners = ([classes[method]] if method in classes else []) if dot else [
                c for c in classes.values() if name in {f.name for f in fields(c)}]
            if not owners or any(name not in c.not_in_key for c in owners):
                out[key] = value
        return out

    def run_dir(self, classifier_sha256: str | None = None) -> Path:
        return Path(self.results_dir) / self.dataset / (self.run_name or self.run_label(classifier_sha256))

    def resolved_table_classes(self) -> list[str] | str:
        if self.table_classes is not None:
            return self.table_classes
        return DEFAULT_TABLE_CLASSES.get(self.dataset, [])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
