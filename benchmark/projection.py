"""Projected GPU times of the published settings (``maskbench project``, ``results/perf/projection.csv``).

**A projection, not a measurement**: this machine has no GPU. It multiplies what was measured here by the
per-pass time of the NeurIPS 2022 authors' own GPU:

* **passes per method**: the classifier passes each method needs at its ``paper`` preset, counted by
  :class:`~maskbench.benchmark.perf.PassRecorder` during ``make perf`` (``results/perf/methods.csv``, one class
  per image): forward+backward and forward-only rows. RISE's forwards are per image (all classes share the
  8,000 masks); every other method's are per explained (image, class) pair. The learned methods' inference is
  one pass of their own network (plus, for DGMP-CF-FT, ``ft_points`` classifier forwards per pair), their
  training is listed apart.
* **passes per metric**: the classifier rows the registered metrics need per scored image at 224 px, counted
  here (:func:`metric_passes`) on the synthetic test images resized to 224 px.
* **time per pass**: the authors' Tesla P100 (NeurIPS 2022 Table 3): RISE takes 8,000 forwards per image, and its
  210 VOC images took 1:15:29 with VGG-16 and 0:46:21 with ResNet-50, i.e. 2.70 ms and 1.66 ms per forward. A
  forward+backward costs :func:`backward_factor` forwards, measured here on the CPU (batch 8, 224 px).
* **classes per image**: a run explains every true class and the five table classes (bottle, car, cat, dog,
  person) of each VOC / COCO image: about ``classes`` pairs per image (:data:`SETTINGS`, an estimate: VOC-2007
  images hold about 1.5 classes, COCO about 2.9, and person is often one of them); ImageNet one.

A newer GPU divides these times by its speed-up over a P100 (several times for an A100); batching across
images, which our implementations do and the authors' scripts did not, is already in the pass counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from maskbench.core.render import csv_text
from maskbench.core.storage import atomic_write

# ms per forward pass on the authors' P100: NeurIPS 2022 Table 3, RISE (8,000 forwards per image, 210 images)
P100_FORWARD_MS = {"vgg16": (1 * 3600 + 15 * 60 + 29) / (210 * 8000) * 1000,
                   "resnet50": (46 * 60 + 21) / (210 * 8000) * 1000}
PER_IMAGE = {"rise"}  # methods whose passes do not grow with the classes explained


@dataclass(frozen=True)
class Setting:
    model: str
    dataset: str
    images: int  # the published evaluation set
    classes: float  # (image, class) pairs explained per image (true classes and table classes; an estimate)
    true_classes: float  # true classes per image (the pairs the faithfulness and localisation metrics score)
    command: str
    downloads: str


SETTINGS = (
    Setting("vgg16", "voc", 210, 6.0, 1.5, "make download DATASET=voc && make bench DATASET=voc ARGS=\"--model vgg16 "
            "--preset paper\"", "VOC-2007 trainval + test (439 MB + 431 MB), VGG-16 ImageNet weights (528 MB)"),
    Setting("resnet50", "voc", 210, 6.0, 1.5, "make download DATASET=voc && make bench DATASET=voc ARGS=\"--model "
            "resnet50 --preset paper\"", "VOC-2007 (870 MB), ResNet-50 ImageNet weights (98 MB)"),
    Setting("vgg16", "coco", 1000, 7.0, 2.9, "make download DATASET=coco && make bench DATASET=coco ARGS=\"--model "
            "vgg16 --preset paper\"", "COCO-2014 annotations, val and train (241 MB + 6.2 GB + 13 GB), VGG-16 "
            "weights (528 MB)"),
    Setting("resnet50", "coco", 1000, 7.0, 2.9, "make download DATASET=coco && make bench DATASET=coco ARGS=\"--model "
            "resnet50 --preset paper\"", "COCO-2014 (19.4 GB), ResNet-50 weights (98 MB)"),
    Setting("resnet50", "imagenet", 10000, 1.0, 1.0, "make bench DATASET=imagenet ARGS=\"--data-root <root> --model "
            "resnet50 --preset paper\"", "nothing: ImageNet is put in place by hand (validation 6.3 GB + boxes; the "
            "learned methods also train on the 138 GB training set), ResNet-50 weights (98 MB)"),
)


def backward_factor(arch: str, batch: int = 8, size: int = 224) -> float:
    """Measured here: the time of a forward+backward pass over that of a forward pass (untrained ``arch``)."""
    import torchvision

    model = torchvision.models.get_model(arch).eval()
    x = torch.randn(batch, 3, size, size, requires_grad=True)

    def best(fn, repeats: int = 2) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.no_grad():
        model(x[:1])
        fwd = best(lambda: model(x))
    fwd_bwd = best(lambda: model(x).sum().backward())
    return fwd_bwd / fwd


def metric_passes(images: int = 4, size: int = 224) -> dict[str, float]:
    """Classifier rows per scored (image, true class) pair of every registered metric, counted on the first
    ``images`` synthetic test images resized to ``size`` px with a constant 0.5 mask (the counts do not depend
    on the model or the mask)."""
    from maskbench.benchmark.perf import PassRecorder
    from maskbench.classifiers import SmallCNN, freeze
    from maskbench.datasets import build_dataset, collate
    from maskbench.metrics import METRICS, MetricInputs

    test = build_dataset("synthetic", split="test", image_size=size)
    batch = collate([test.load(i) for i in test.image_ids[:images]])
    classes = torch.stack([torch.nonzero(lab).flatten()[:1] for lab in batch.labels])  # one true class each
    masks = torch.full((images, 1, size, size), 0.5)
    recorder = PassRecorder(freeze(SmallCNN(test.num_classes)))
    out = {}
    for name in METRICS.list():
        recorder.calls.clear()
        METRICS.get(name).fn(MetricInputs(recorder, batch.images, masks, classes, batch))
        out[name] = sum(n for n, _ in recorder.calls) / images
    return out


def project(methods_csv: Path, metrics: dict[str, float], factors: dict[str, float]) -> pd.DataFrame:
    """Hours per (setting, method) on a P100: explaining the evaluation set, and scoring it with every metric."""
    measured = pd.read_csv(methods_csv)
    measured = measured[measured["variant"].fillna("pixel") == "pixel"]  # EP: TorchRay's pixel resolution
    score_rows = sum(metrics.values())  # forward rows per scored (image, true class) pair
    recs: list[dict[str, Any]] = []
    for s in SETTINGS:
        fwd_ms = P100_FORWARD_MS[s.model]
        bwd_ms = fwd_ms * factors[s.model]
        for r in measured.itertuples():
            per = r.images * r.classes_per_image
            unit = s.images if r.method in PER_IMAGE else s.images * s.classes
            ms = unit * (r.passes_with_backward / per * bwd_ms + r.passes_forward_only / per * fwd_ms)
            recs.append({"setting": f"{s.model}-{s.dataset}", "method": r.method, "images": s.images,
                         "pairs_per_image": s.classes if r.method not in PER_IMAGE else 1,
                         "passes_backward_per_unit": r.passes_with_backward / per,
                         "passes_forward_per_unit": r.passes_forward_only / per,
                         "projected_hours": round(ms / 3.6e6, 3)})
        recs.append({"setting": f"{s.model}-{s.dataset}", "method": "scoring (all metrics, per method)",
                     "images": s.images, "pairs_per_image": s.true_classes, "passes_backward_per_unit": 0.0,
                     "passes_forward_per_unit": score_rows,
                     "projected_hours": round(s.images * s.true_classes * score_rows * fwd_ms / 3.6e6, 3)})
    return pd.DataFrame.from_records(recs)


def write_projection(out_dir: Path) -> Path:
    """Measure the metric passes and backward factors, project, write ``projection.csv`` next to methods.csv."""
    factors = {arch: round(backward_factor(arch), 2) for arch in ("vgg16", "resnet50")}
    table = project(out_dir / "methods.csv", metric_passes(), factors)
    table.attrs["factors"] = factors
    path = atomic_write(out_dir / "projection.csv", csv_text(table))
    atomic_write(out_dir / "projection-factors.csv",
                 csv_text(pd.DataFrame([{"model": k, "forward_backward_over_forward": v,
                                         "p100_forward_ms": round(P100_FORWARD_MS[k], 3)}
                                        for k, v in factors.items()])))
    return path
