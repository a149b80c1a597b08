"""Where each method deliberately differs from its published runs: one list per method, in one place.

Each entry is one short sentence; the module docstring of the method gives the reasons in full. Tables name the
methods that have entries in their captions, and every run folder gets ``deviations.md`` with the lists
(``maskbench.benchmark.tables``). Implementation choices that change no number (batching, seeding, speed) are
not deviations and are not listed. This module is data only: no method imports it, so editing it changes no
cache key.
"""

from __future__ import annotations

DEVIATIONS: dict[str, tuple[str, ...]] = {
    "explainer": (
        "the classifier stays in eval() while the Explainer trains (the published code let PyTorch Lightning put "
        "it back in train mode: dropout on, BatchNorm statistics updated)",
        "each true class counts once (the code repeated a class once per object)",
        "the class-area bound B is averaged over the image's true classes, as eq. 6 writes (the code summed it)",
    ),
    "rtis": (
        "colour noise with standard deviation 0.11, as Dabkowski & Gal intended (the NeurIPS code drew mean 0.11, "
        "standard deviation 1: a bug)",
        "the classifier stays in eval(); each true class counts once",
    ),
    "extremal-perturbation": (
        "the area is measured on the mask over the image, as the paper defines it (TorchRay measures it on its "
        "whole generated grid, margin included; area_domain='full' reproduces that)",
        "the classifier stays in eval() (the NeurIPS 2022 code left dropout on)",
        "each class's map is min-max rescaled before the metrics merge the classes (the NeurIPS 2022 pipeline "
        "merged the classes' masks first and rescaled the merged mask)",
    ),
    "igos++": (
        "15 iterations of 20 integration steps, the documented values (the reference's main.py swaps them)",
        "noise drawn once per iteration and shared by the gradient and every line-search step (the reference "
        "draws new noise for every evaluation)",
        "no step is taken when no line-search step passes (the reference takes one below its minimum step)",
        "bilateral weights as the paper writes them (the reference averages channels differently per direction)",
    ),
    "dgmp-bf": (
        "on a multi-label classifier every (image, true class) pair is explained with the BCE of the class's own "
        "sigmoid (the paper's objective, the softmax cross-entropy of the predicted class, is used on softmax "
        "classifiers such as its ImageNet ResNet-50)",
        "'a variance of 10' of the blur substrate read as sigma = 10 px at 224 px",
        "the basic transformer's unbounded output is divided by its maximum at inference (the benchmark needs "
        "[0, 1])",
    ),
    "dgmp-cf": (
        "on a multi-label classifier every (image, true class) pair is explained with the BCE of the class's own "
        "sigmoid (the paper's objective, the softmax cross-entropy of the predicted class, is used on softmax "
        "classifiers such as its ImageNet ResNet-50)",
        "'a variance of 10' of the blur substrate read as sigma = 10 px at 224 px",
    ),
    "dgmp-cf-ft": (
        "on a multi-label classifier every (image, true class) pair is explained with the BCE of the class's own "
        "sigmoid (the paper's objective, the softmax cross-entropy of the predicted class, is used on softmax "
        "classifiers such as its ImageNet ResNet-50)",
        "'a variance of 10' of the blur substrate read as sigma = 10 px at 224 px",
    ),
}


def deviations(method: str) -> tuple[str, ...]:
    """The deviations of a stored method name (``rise.paper`` is ``rise``'s); () when it has none."""
    if method in DEVIATIONS:
        return DEVIATIONS[method]
    return DEVIATIONS.get(method.rpartition(".")[0], ())
