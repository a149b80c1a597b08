"""Run configuration: what ``maskbench bench`` runs, with sane defaults for every option.

The resolved configuration is written to the run manifest together with the git revision and library
versions, so every number in ``results/`` can be traced back to the code and settings that produced it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import MaskbenchError, UnknownNameError

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
DEFAULT_MODELS = {"synthetic": "smallcnn", "synthetic-coco": "smallcnn", "voc": "vgg16", "coco": "vgg16"}

# Classes every image is explained for besides its own (the class-specific masking table's targets).
DEFAULT_TABLE_CLASSES: dict[str, list[str] | str] = {
    "synthetic": "all",
    "synthetic-coco": "all",
    "voc": ["bottle", "car", "cat", "dog", "person"],
    "coco": ["bottle", "car", "cat", "dog", "person"],
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
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = DEFAULT_MODELS.get(self.dataset, "smallcnn")
        if self.preset not in PRESETS:
            raise UnknownNameError("preset", self.preset, PRESETS)
        if self.limit is not None and self.limit <= 0:
            raise MaskbenchError(f"--limit must be positive, got {self.limit}")
        if self.batch_size <= 0:
            raise MaskbenchError(f"--batch-size must be positive, got {self.batch_size}")

    def run_dir(self) -> Path:
        return Path(self.results_dir) / self.dataset / self.model

    def resolved_table_classes(self) -> list[str] | str:
        if self.table_classes is not None:
            return self.table_classes
        return DEFAULT_TABLE_CLASSES.get(self.dataset, [])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
