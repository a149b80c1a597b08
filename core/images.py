"""Image operations shared by methods and metrics: perturbations (blur, colour noise) and per-image seeding.

All functions work on batched (B, C, H, W) tensors in the data set's *normalised* space (so a value of 0 is
the data set's mean colour), on any device, and draw every random number from an explicit
:class:`torch.Generator` (on the CPU, so the same seed gives the same perturbation on every device).

* :func:`gaussian_kernel1d` / :func:`gaussian_blur`: separable Gaussian blur, as TorchRay's ``imsmooth``
  (used by Fong et al., ICCV 2019, and by the adapted RTIS of Stalder et al., NeurIPS 2022): a kernel of
  half-width ``ceil(truncate * sigma)`` (``truncate`` = 4 as TorchRay), normalised to sum 1, applied along
  rows then columns, with zero padding by default (TorchRay's ``padding_mode="constant"``: the border fades to
  the mean colour) or ``"reflect"`` / ``"replicate"``.
* :func:`colour_noise`: the "random colour" alternative of Dabkowski & Gal (NeurIPS 2017, Sec. 4): Gaussian
  noise of standard deviation ``std`` plus one uniform offset in (-offset, offset) per image and channel.
* :func:`scaled_sigma`: rescales a blur width published for 224 px images to another image size.
* :func:`image_seed` / :func:`image_class_seed`: per-image (per-row) seeds from the image's bytes, so that a
  method's random draws do not depend on batching.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

REFERENCE_SIZE = 224  # image side for which the published blur widths were chosen


def scaled_sigma(sigma: float, image_size: int, reference_size: int = REFERENCE_SIZE) -> float:
    """``sigma * image_size / reference_size``: the same blur relative to the image (10 px at 224 -> 2.86 px at 64)."""
    return float(sigma) * float(image_size) / float(reference_size)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> Tensor:
    """Normalised 1-D Gaussian of standard deviation ``sigma`` on [-r, r], r = ceil(truncate * sigma)."""
    if sigma <= 0:
        raise ValueError(f"gaussian_kernel1d needs sigma > 0, got {sigma}")
    radius = max(int(math.ceil(truncate * sigma)), 1)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(x: Tensor, sigma: float, truncate: float = 4.0, padding: str = "constant") -> Tensor:
    """Separable Gaussian blur of every channel of a (B, C, H, W) tensor; ``sigma`` in pixels.

    ``padding``: ``"constant"`` (zeros, TorchRay's default: in normalised space the image fades to the mean
    colour at the border), ``"reflect"`` or ``"replicate"``. ``sigma`` <= 0 returns ``x`` unchanged. The kernel
    may be wider than the image (zero padding then simply averages with the mean colour); ``"reflect"`` needs
    the radius to be smaller than the image side and falls back to ``"replicate"`` when it is not.
    """
    if x.dim() != 4:
        raise ValueError(f"gaussian_blur expects (B, C, H, W), got shape {tuple(x.shape)}")
    if sigma <= 0:
        return x
    if padding not in ("constant", "reflect", "replicate"):
        raise ValueError(f"gaussian_blur padding must be constant, reflect or replicate, not {padding!r}")
    b, c, h, w = x.shape
    k = gaussian_kernel1d(sigma, truncate, dtype=x.dtype, device=x.device)
    r = (k.numel() - 1) // 2
    if padding == "reflect" and r >= min(h, w):
        padding = "replicate"
    y = x.reshape(b * c, 1, h, w)
    y = F.pad(y, (r, r, r, r), mode=padding)
    y = F.conv2d(y, k.view(1, 1, 1, -1))  # along W
    y = F.conv2d(y, k.view(1, 1, -1, 1))  # along H
    return y.reshape(b, c, h, w)


def colour_noise(shape: tuple[int, ...] | torch.Size, std: float = 0.11, offset: float = 0.33, *,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """A (B, C, H, W) "random colour" image: N(0, std^2) noise plus a U(-offset, offset) offset per (image, channel).

    Dabkowski & Gal (NeurIPS 2017) fill removed regions with this (std 0.11, offset 0.33). The random numbers
    are drawn on the CPU from ``generator`` and then moved to ``device``.
    """
    b, c = int(shape[0]), int(shape[1])
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32) * std
    shift = (torch.rand(b, c, 1, 1, generator=generator, dtype=torch.float32) * 2 - 1) * offset
    return (noise + shift).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------- seeding
# A method's random draws depend on the image, never on its position in a batch or on the batch size: each
# image (or (image, class) row) gets its own CPU generator seeded from the method's ``seed`` and the image's bytes.


def image_digest(image: Tensor) -> bytes:
    """SHA-256 of one (C, H, W) image's float32 values, read on the CPU."""
    return hashlib.sha256(image.detach().float().cpu().contiguous().numpy().tobytes()).digest()


def image_seed(image: Tensor, seed: int) -> int:
    """Seed of one image's generator: ``seed`` XOR the first 8 bytes of :func:`image_digest` (little endian)."""
    return seed ^ int.from_bytes(image_digest(image)[:8], "little")


def image_class_seed(image: Tensor, seed: int, cls: int, *, sep: str = "|", bits: int = 64) -> int:
    """Seed of one (image, class) row's generator: the first 8 bytes of SHA-256 of ``"<seed><sep><image hex
    digest><sep><class>"``, kept to its low ``bits`` bits. ``sep`` and ``bits`` keep the draws of the stored runs:
    the random-uniform row used ``"|"`` and 64 bits, meaningful perturbation ``":"`` and 63 bits."""
    key = f"{seed}{sep}{image_digest(image).hex()}{sep}{cls}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << bits) - 1)


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (CPU draws are the same on every device)."""
    return torch.Generator().manual_seed(seed)
