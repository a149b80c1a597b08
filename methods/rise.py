"""RISE: Randomized Input Sampling for Explanation (Petsiuk, Das & Saenko, BMVC 2018).

Saliency of pixel x for class c (eq. 6 of the paper): S_c(x) = 1 / (N p) * sum_n f_c(I * M_n) M_n(x), with
N random masks M_n: an s x s binary grid whose cells are kept with probability p, upsampled bilinearly to
(s+1) * cell and cropped at a random shift in [0, cell), as the paper describes.

Implementation: the N masks are generated once, vectorised and seeded (on the CPU generator, so the same seed
gives the same masks on any device), kept on the model's device and shared by every image; the masked
images of a whole batch of images x masks go through the model in chunks of ``batch_size``, and only the
requested classes are accumulated (one einsum per chunk, no host synchronisation). ``batch_size`` (masked
images per pass) defaults to 128 on the CPU, where larger batches fall out of the cache, and 1,024 on a GPU
(``make perf`` measures it).

Choices, each also a field: the score f_c is the classifier's own class probability (``score="auto"``): the
class *sigmoid* of the multi-label VOC/COCO classifiers (TorchRay's ``rise``, which the NeurIPS 2022
evaluation used, does the same) and the softmax of a single-label ImageNet one (the original code's);
masking multiplies the normalised image (masked pixels take the mean colour, as in
the original code). The published setting (``paper`` preset) is TorchRay's default N = 8000, s = 7, p = 0.5
used for VOC/COCO in the NeurIPS 2022 paper; ``fast`` uses N = 1000 for the CPU run on 64 px images. The maps
are min-max normalised per (image, class) for the mask metrics, like the NeurIPS 2022 evaluation
(``normalize="none"`` keeps S_c, clamped to [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskbench.core.scores import METHOD_SCORES, resolve_score, scores_from_logits

from .base import AttributionMethod, check_choice, check_range, normalize_maps, register_method


def rise_masks(n: int, cells: int, p: float, size: tuple[int, int], seed: int) -> Tensor:
    """(n, H, W) float masks in [0, 1]: upsampled random grids with random shifts (CPU, seeded)."""
    h, w = size
    gen = torch.Generator().manual_seed(seed)
    grid = (torch.rand(n, 1, cells, cells, generator=gen) < p).float()
    ch, cw = math.ceil(h / cells), math.ceil(w / cells)
    up = F.interpolate(grid, size=((cells + 1) * ch, (cells + 1) * cw), mode="bilinear", align_corners=False)[:, 0]
    dy = torch.randint(0, ch, (n,), generator=gen)
    dx = torch.randint(0, cw, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, W)
    return up[torch.arange(n)[:, None, None], rows, cols]


@register_method("rise")
@dataclass
class RISE(AttributionMethod):
    num_masks: int = 8000
    num_cells: int = 7
    p: float = 0.5
    batch_size: int | None = None  # masked images per forward pass; None: 128 on the CPU, 1024 on a GPU
    not_in_key = ("batch_size",)  # memory knob: the masks do not depend on it
    seed: int = 0
    score: str = "auto"  # auto (the classifier's own probability: sigmoid or softmax) | sigmoid | softmax | logit
    normalize: str = "minmax"  # minmax | none

    label = "RISE"
    family = "perturbation"
    paper = "Petsiuk et al., BMVC 2018"
    presets = {"fast": {"num_masks": 1000}}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "num_masks", 1)
        check_range(self, "num_cells", 1)
        check_range(self, "p", 0, 1, low_open=True, high_open=True)  # p = 1 keeps every pixel: constant maps
        check_range(self, "batch_size", 1)
        check_range(self, "seed", 0)
        check_choice(self, "score", METHOD_SCORES)
        check_choice(self, "normalize", ("minmax", "none"))
        self._masks: dict[tuple, Tensor] = {}

    def masks(self, size: tuple[int, int], device: torch.device) -> Tensor:
        key = (size, str(device))
        if key not in self._masks:
            self._masks[key] = rise_masks(self.num_masks, self.num_cells, self.p, size, self.seed).to(device)
        return self._masks[key]

    @torch.no_grad()
    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch=None) -> Tensor:
        b, _, h, w = images.shape
        masks = self.masks((h, w), images.device)  # (N, H, W)
        n = masks.shape[0]
        per_pass = self.batch_size or (1024 if images.device.type == "cuda" else 128)
        chunk = max(1, per_pass // b)
        score = resolve_score(self.score, model)
        sal = torch.zeros(b, classes.shape[1], h, w, device=images.device, dtype=torch.float32)
        for i in range(0, n, chunk):
            m = masks[i : i + chunk]  # (n_c, H, W)
            x = (images[:, None] * m[None, :, None]).flatten(0, 1)  # (B * n_c, 3, H, W)
            s = scores_from_logits(model(x).float(), score).view(b, m.shape[0], -1)  # (B, n_c, C)
            s = torch.gather(s, 2, classes[:, None, :].expand(-1, m.shape[0], -1))  # (B, n_c, K)
            sal += torch.einsum("bnk,nhw->bkhw", s, m)
        sal /= n * self.p
        if self.normalize == "minmax":
            return normalize_maps(sal)
        return sal.clamp(0, 1)
