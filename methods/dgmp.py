"""Distribution-guided mask predictor (DGMP): "Distribution-Guided Local Explanation for Black-Box Classifiers"
(anonymous ICLR submission; /work/shared/papers/distribution-guided-local-explanation.md), built on the mask
generator of Dabkowski & Gal ("Real Time Image Saliency for Black Box Classifiers", NeurIPS 2017).

The predictor (Fig. 1b, Sec. 3):

* **Mask generator G** (Sec. 3.1, App. A.1). The frozen classifier's multi-scale feature maps (forward hooks on
  ``model.feature_layers``, read under ``no_grad``: only the generator is trained) feed a U-Net style decoder.
  The deepest map X goes through the class feature filter (eq. 10) ``Y_ij = X_ij * sigmoid(X_ij^T C_s)``, with
  ``C_s`` a learned embedding of the explained class s, so every mask is class-specific; then transposed
  convolutions (kernel 4, stride 2) upsample it and residual bottleneck blocks merge it with each shallower
  map (concatenation), down to a coarse single-channel map ``M^g`` per (image, class) at ``mask_scale`` of the
  input side. 1/4 is the paper's 56 x 56 at 224 px, and at 64 px it gives 16 x 16, the finest feature map of
  ``SmallCNN`` (its first block), so on the synthetic set all four blocks are used (8x8: blocks 4, 3, 2; 16x16:
  block 1) through three bottleneck blocks as in the paper. Maps finer than the coarse scale are not used
  (VGG-16's 224 and 112 px maps); if the finest used map is coarser than the target, transposed convolutions
  continue without skip. Decoder width: ``decoder_width`` channels at the coarse scale, doubled per halving of
  the resolution (at most 8x), which is D&G's 64/128/256 for ResNet-50.
* **Distribution controller C** (Sec. 3.2.2) at the coarse scale: instance normalisation of each map,
  ``z = (M^g - E[M^g]) / sqrt(Var[M^g] + eps)`` (biased variance, eps = 1e-5 as ``nn.InstanceNorm2d``), then the
  *basic transformer* ``ReLU(z)`` (eq. 5, ``dgmp-bf``) or the *customised transformer* ``sigmoid(eta z)^h``
  (eq. 6, ``dgmp-cf``; eta = 1.5, h = 2.5 as Sec. 3.2.3). Both are monotonic, so ranks are those of ``M^g``.
  Then bilinear upsampling (``align_corners=False``) to the input size: ``M = upsample(C(M^g))`` (eq. 4).
* **Training** with the classification loss only (eq. 4) on the preserved image ``phi(I, M) = I*M + A*(1-M)``
  (eq. 1): no area, smoothness or destroyer term.
* **Fine-tuning** (Sec. 3.3, ``dgmp-cf-ft``): pixels ranked by score; the insertion curve ``q_i`` = class
  probability of the image whose top-i pixels are kept and the others perturbed, sampled at ``ft_points``
  uniformly spaced i (0 = fully perturbed ... H*W = the original), monotonised ``q_i = max_{j<=i} q_j``,
  linearly interpolated to every i; ``v_i = q_max - q_i``; ``r'_i = r_i * v_i``, rescaled to [0, 1].

Choices and deviations (each with its reason):

1. **Objective** (``objective``). On a single-label (softmax) classifier, the paper's published setting
   (ResNet-50, ImageNet), it is the paper's: each training image explains the classifier's predicted class
   (top-1 on the clean image; "no ground truth is introduced and only the outputs of the classifier are
   utilized") with the softmax cross-entropy ``-log softmax(f(phi(I, M_c)))_c``, and the feature filter learns
   the predicted class too. On our multi-label (sigmoid) classifiers images hold several objects, so every
   (image, true class) pair is explained: ``loss = mean over pairs of -log sigmoid(f_c(phi(I, M_c)))``, the
   BCE of the explained class's own sigmoid, and the filter learns the true labels. True labels there (not
   the classifier's predictions): the benchmark explains true classes, and it keeps the pair set independent
   of the classifier's mistakes. ``objective="auto"`` (the default) picks by the classifier's
   :func:`~maskbench.core.scores.probability_kind`; ``multilabel`` / ``predicted`` force one. The pairs are
   found with ``torch.nonzero``, one host synchronisation per training step (the exact set of true pairs; a
   fixed-size alternative would run the decoder on padding pairs).
2. **Substrate A** (Sec. 4): with probability 1/2 per pair, a Gaussian blur of I, otherwise a random colour
   image plus Gaussian noise. "A variance of 10" is read as sigma = 10 px at 224 px: the code the paper builds
   on (D&G) blurs with sigma = 11 at 224 px, and a literal variance of 10 (sigma = 3.2 px) would leave
   ImageNet objects recognisable. The width scales with the image (:func:`scaled_sigma`: 2.86 px at 64 px),
   zero padding in normalised space (the border fades to the mean colour). The random colour image is D&G's
   (:func:`colour_noise`: N(0, 0.11^2) noise plus a U(-0.33, 0.33) offset per channel, in normalised units).
   Both come from :mod:`maskbench.core.images`. Every random choice (which substrate, colours,
   noise) is drawn from the ``generator`` passed by the training loop, so the validation loss is
   deterministic.
3. **Feature-filter pretraining** (App. A.1, "two-stage scheme" of Sec. 4). Before the decoder is trained,
   only the class embeddings are trained for ``filter_images`` images (paper: 250,000; batches of
   ``batch_size``, Adam ``filter_lr``; the paper gives no learning rate, 1e-3 is D&G's selector rate): for
   every image and class s, ``a_s = mean_ij sigmoid(X_ij^T C_s)`` is pushed up for true classes and down for the
   others with the binary cross-entropy ``BCE(a_s, y_s)`` (the log-likelihood form of "maximise / minimise the
   mean"; all classes of every image instead of D&G's one real-or-fake label). The embeddings are then
   frozen while the decoder is trained ("then optimize other parts of the mask predictor"). The stage always
   runs its ``ceil(filter_images / batch_size)`` steps (no wall-clock cap shortens it) and is checkpointed and
   resumed exactly like the decoder's training (:class:`~maskbench.methods.learned.TrainingProgress`, stage
   ``"filter"``; once it has finished, its record travels in the decoder's progress file and it is not run
   again); it counts against ``max_train_seconds`` (one invocation's wall time: progress saved, then
   :class:`~maskbench.core.errors.TrainingIncomplete`). Re-running it instead of resuming it would be
   deterministic too, but not cheap in the ``paper`` preset (3,907 steps). Its record is in the manifest
   (``filter_*``).
4. **Basic transformer range.** ``ReLU(z)`` is unbounded; training uses it as the paper writes it (``phi``
   then extrapolates beyond I where M > 1). The benchmark needs [0, 1]: at inference each upsampled map is
   divided by its maximum (ranks and zeros kept; an all-zero map stays zero).
5. **Fine-tuning details.** Perturbation = the same blurred image as the training substrate. The curve is
   sampled at ``ft_points`` points including i = 0 and i = H*W, monotonised at the samples, then linearly
   interpolated (monotone samples give a monotone interpolant). ``r'`` is divided by its maximum (``v >= 0``,
   so 0 stays "irrelevant"); when the curve is flat (``r' = 0`` everywhere: the fully perturbed image already
   scores the maximum) the untuned map is kept rather than returning no ranking at all. ``r'`` preserves the
   order of ``r`` weakly (pixels with ``v = 0`` tie at 0); pixels with equal scores share the mean of their
   ``v`` (ties are otherwise broken arbitrarily, which made the output depend on 1e-7 differences between a
   batched and a single-image pass). ``q`` is the classifier's class probability (sigmoid or softmax).
   All (image, class, point) insertion images are batched (chunks of ``FT_CHUNK`` images). The raw masks are
   computed one image per pass (all its classes together): a ranking is discontinuous, and a convolution's
   result changes in the last bits with the batch size, so batched and single-image explanations would
   otherwise differ where scores nearly tie.
6. **Learning-rate schedule.** The paper halves Adam's rate every 3 epochs (``lr_decay_every``,
   ``lr_decay``). :meth:`lr_scheduler` returns that ``StepLR``, which ``LearnedMethod.fit`` steps once per
   epoch.
7. **Only the requested classes are decoded** in :meth:`explain` (``predict`` decodes all classes, as the
   hook requires); masks are identical either way.
8. ``dgmp-cf-ft`` trains nothing: its :meth:`~DGMPCFFT.setup` sets up a ``dgmp-cf`` with the same training
   fields and uses that network (same training key and checkpoint file), so the two share one training.

``paper`` preset = the paper's settings (Adam lr 1e-2, batch 64, 10 epochs, eta 1.5, h 2.5, 250k filter
images, no early stopping); ``fast`` = the CPU run on the 64 px synthetic set (100 filter steps, then 8 epochs
= 600 decoder steps, see ``FAST``; no wall-clock cap, so the network never depends on the machine's speed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskbench.core.errors import MaskbenchError
from maskbench.core.images import colour_noise, gaussian_kernel1d, scaled_sigma
from maskbench.core.scores import class_probabilities, probability_kind
from maskbench.datasets.base import SplitView

from .base import MethodContext, register_method
from .learned import LearnedMethod, TrainingProgress, clock, random_state, set_random_state

PAPER = ("Distribution-Guided Local Explanation for Black-Box Classifiers (ICLR submission), after Dabkowski & Gal, "
         "NeurIPS 2017")
FAST: dict[str, Any] = {
    "lr": 3e-3,  # constant (item 6), within the paper's decayed range 1e-2..1.25e-3; 1e-2 was as good but noisier
    "max_epochs": 8,  # 600 decoder steps: bounds the run reproducibly (~2.3 min with the filter stage, idle CPU)
    "filter_images": 6_400,  # 100 steps of 64
    "filter_lr": 1e-2,  # converges in ~100 steps (val BCE 0.26 vs 0.30 after 300 steps at 1e-3)
    "decoder_width": 16,  # SmallCNN's maps have 16-64 channels: 16 at 16x16, 32 at 8x8 (25 k parameters)
}


OBJECTIVES = ("auto", "multilabel", "predicted")


def training_targets(objective: str, model: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, bool]:
    """The (B, C) 0/1 targets a training batch explains and whether the loss is the softmax cross-entropy:
    the true labels (``multilabel``) or the one-hot top-1 class of the clean images (``predicted``); ``auto``
    is ``predicted`` for a softmax classifier and ``multilabel`` for a sigmoid one (item 1)."""
    if objective == "auto":
        objective = "predicted" if probability_kind(model) == "softmax" else "multilabel"
    if objective == "multilabel":
        return labels, False
    with torch.no_grad():
        top = model(images).argmax(1)
    return F.one_hot(top, labels.shape[1]).to(labels.dtype), True


# -- distribution controller (eq. 5, 6) and fine-tuning (Sec. 3.3): pure functions -------------------------------
def instance_normalize(maps: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalise each (h, w) map of a (..., h, w) tensor to zero mean and unit (biased) variance."""
    mean = maps.mean(dim=(-2, -1), keepdim=True)
    var = maps.var(dim=(-2, -1), keepdim=True, unbiased=False)
    return (maps - mean) / torch.sqrt(var + eps)


def basic_transform(z: Tensor) -> Tensor:
    """Eq. 5: ``ReLU(z)``."""
    return F.relu(z)


def customised_transform(z: Tensor, eta: float = 1.5, h: float = 2.5) -> Tensor:
    """Eq. 6: ``sigmoid(eta * z) ** h``, in (0, 1)."""
    return torch.sigmoid(eta * z).pow(h)


def class_feature_filter(x: Tensor, embedding: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 10: ``Y_ij = X_ij * sigmoid(X_ij^T C_s)`` for (P, C, h, w) features and (P, C) class embeddings.

    Returns ``(Y, act)`` with ``act`` the (P, h, w) logits ``X_ij^T C_s``.
    """
    act = torch.einsum("pchw,pc->phw", x, embedding)
    return x * torch.sigmoid(act)[:, None], act


def monotone_curve(q: Tensor) -> Tensor:
    """``q_i = max_{j <= i} q_j`` along the last dimension."""
    return torch.cummax(q, dim=-1).values


def extra_importance(q: Tensor) -> Tensor:
    """``v_i = q_max - max_{j <= i} q_j`` along the last dimension (Sec. 3.3)."""
    mono = monotone_curve(q)
    return mono[..., -1:] - mono


def insertion_points(n_pixels: int, points: int) -> Tensor:
    """``points`` numbers of kept pixels, uniformly spaced from 0 to ``n_pixels`` (both included), long."""
    if points < 2:
        raise MaskbenchError(f"ft_points must be at least 2 (got {points})")
    return torch.linspace(0, n_pixels, points, dtype=torch.float64).round().long()


def interpolate_curve(values: Tensor, positions: Tensor, n: int) -> Tensor:
    """Linear interpolation of a curve sampled at increasing integer ``positions`` (P,) with ``values`` (..., P)
    at every i = 0..n; returns (..., n + 1). Repeated positions are allowed (the later value wins)."""
    pos = positions.to(values.device, torch.float64)
    i = torch.arange(n + 1, device=values.device, dtype=torch.float64)
    seg = (torch.searchsorted(pos, i, right=True) - 1).clamp(0, pos.numel() - 2)
    lo, hi = pos[seg], pos[seg + 1]
    t = torch.where(hi > lo, (i - lo) / (hi - lo).clamp_min(1e-12), torch.ones_like(i)).clamp(0, 1).to(values.dtype)
    v_lo, v_hi = values[..., seg], values[..., seg + 1]
    return v_lo + t * (v_hi - v_lo)


def fine_tune_scores(scores: Tensor, q: Tensor, positions: Tensor) -> Tensor:
    """Sec. 3.3 on flattened maps: ``scores`` (..., N), ``q`` (..., P) class probabilities of the insertion images
    keeping the top ``positions[p]`` pixels. Returns ``r' = r * v`` rescaled by its maximum to [0, 1] (..., N);
    a map whose ``r'`` is all zero keeps ``scores`` (divided by their maximum).

    The pixel of rank j (0-based) is the (j + 1)-th kept, so it gets ``v_{j+1}``; pixels with equal scores (e.g.
    the border pixels replicated by bilinear upsampling) share the mean ``v`` of their ranks, so the result does
    not depend on how ties are broken.
    """
    n = scores.shape[-1]
    v = extra_importance(interpolate_curve(monotone_curve(q), positions, n))[..., 1:]  # (..., N): v_1 .. v_N
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranked = torch.gather(scores, -1, order)
    new_group = torch.ones_like(ranked, dtype=torch.bool)
    new_group[..., 1:] = ranked[..., 1:] != ranked[..., :-1]
    group = new_group.long().cumsum(-1) - 1
    v_group = torch.zeros_like(v).scatter_reduce(-1, group, v, reduce="mean", include_self=False)
    tuned = torch.empty_like(scores).scatter_(-1, order, ranked * torch.gather(v_group, -1, group))
    peak = tuned.amax(-1, keepdim=True)
    fallback = scores / scores.amax(-1, keepdim=True).clamp_min(1e-12)
    return torch.where(peak > 1e-12, tuned / peak.clamp_min(1e-12), fallback)


def blur_matrix(n: int, sigma: float, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> Tensor:
    """(n, n) matrix B with ``B @ v`` = the 1-D Gaussian blur of ``v`` with zero padding (kernel of
    :func:`~maskbench.core.images.gaussian_kernel1d`, truncated at 4 sigma)."""
    k = gaussian_kernel1d(sigma, dtype=torch.float64)
    r = (k.numel() - 1) // 2
    offset = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # j - i
    inside = offset.abs() <= r
    mat = torch.where(inside, k[(offset + r).clamp(0, 2 * r)], torch.zeros((), dtype=torch.float64))
    return mat.to(dtype=dtype, device=device)


def blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) images, zero padding; same result as
    ``maskbench.core.images.gaussian_blur(images, sigma)`` but as two matrix products (``B_h X B_w^T``), which
    on the CPU is much faster than the two 1-D convolutions at small image sizes."""
    if sigma <= 0:
        return images
    h, w = images.shape[-2:]
    bh = blur_matrix(h, sigma, dtype=images.dtype, device=images.device)
    bw = bh if w == h else blur_matrix(w, sigma, dtype=images.dtype, device=images.device)
    return bh @ images @ bw.T


# -- the mask generator -------------------------------------------------------------------------------------------
class _StopForward(Exception):
    pass


@torch.no_grad()
def classifier_features(model: nn.Module, images: Tensor) -> list[Tensor]:
    """The outputs of ``model.feature_layers`` (shallow to deep) for ``images``, without gradient.

    Forward hooks catch the maps; the forward pass stops after the deepest feature layer (the head is skipped).
    """
    layers = list(model.feature_layers)
    out: list[Tensor | None] = [None] * len(layers)

    def hook(i: int):
        def fn(_module: nn.Module, _inp: Any, output: Tensor) -> None:
            out[i] = output
            if all(o is not None for o in out):
                raise _StopForward

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        model(images)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if any(o is None for o in out):
        raise MaskbenchError("the classifier's forward pass did not run all of its feature_layers")
    return [o.float() for o in out]  # type: ignore[union-attr]


class Bottleneck(nn.Module):
    """Residual bottleneck: ReLU(proj(x) + conv1x1-conv3x3-conv1x1(x)), batch-normalised."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = max(cout // 2, 4)
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.proj(x) + self.body(x))


def _up(cin: int, cout: int) -> nn.Module:
    """x2 transposed convolution (kernel 4, stride 2, padding 1), BN, ReLU."""
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class MaskGenerator(nn.Module):
    """G: class feature filter on the deepest map, then a U-Net decoder over the shallower maps.

    ``channels`` / ``sizes``: channels and spatial side of the used feature maps, shallow to deep;
    ``mask_size``: side of the coarse mask; ``width``: decoder channels at the coarse scale.
    """

    def __init__(self, channels: list[int], sizes: list[int], num_classes: int, mask_size: int, width: int):
        super().__init__()
        self.num_classes = num_classes
        c_deep = channels[-1]
        self.embedding = nn.Parameter(torch.randn(num_classes, c_deep) / math.sqrt(c_deep))  # as D&G

        def width_at(side: int) -> int:
            return width * min(max(round(mask_size / max(side, 1)), 1), 8)

        cur_c, cur_s = c_deep, sizes[-1]
        self.skips: list[int] = []
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for j in range(len(sizes) - 2, -1, -1):
            ups: list[nn.Module] = []
            while cur_s * 2 <= sizes[j]:
                ups.append(_up(cur_c, width_at(cur_s * 2)))
                cur_s *= 2
                cur_c = width_at(cur_s)
            self.ups.append(nn.Sequential(*ups))
            self.blocks.append(Bottleneck(cur_c + channels[j], width_at(sizes[j])))
            self.skips.append(j)
            cur_c, cur_s = width_at(sizes[j]), sizes[j]
        tail: list[nn.Module] = []
        while cur_s * 2 <= mask_size:
            tail.append(_up(cur_c, width_at(cur_s * 2)))
            cur_s *= 2
            cur_c = width_at(cur_s)
        self.tail = nn.Sequential(*tail)
        self.head = nn.Conv2d(cur_c, 1, 1)

    def filter_scores(self, deep: Tensor) -> Tensor:
        """(B, C) ``mean_ij sigmoid(X_ij^T C_s)`` of every image and class (App. A.1)."""
        return torch.sigmoid(torch.einsum("bchw,kc->bkhw", deep, self.embedding)).mean(dim=(-2, -1))

    def forward(self, feats: list[Tensor], image_idx: Tensor, cls: Tensor, mask_size: int) -> Tensor:
        """Coarse maps M^g (P, mask_size, mask_size) for the (image, class) pairs ``(image_idx[p], cls[p])``."""
        x, _ = class_feature_filter(feats[-1][image_idx], self.embedding[cls])
        for ups, block, j in zip(self.ups, self.blocks, self.skips, strict=True):
            x = ups(x)
            skip = feats[j][image_idx]
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        x = self.head(self.tail(x))
        if x.shape[-1] != mask_size or x.shape[-2] != mask_size:
            x = F.interpolate(x, size=(mask_size, mask_size), mode="bilinear", align_corners=False)
        return x[:, 0]


# -- the methods --------------------------------------------------------------------------------------------------
@dataclass
class DGMP(LearnedMethod):
    """Shared machinery of ``dgmp-bf`` / ``dgmp-cf`` / ``dgmp-cf-ft`` (see the module docstring)."""

    lr: float = 1e-2
    batch_size: int = 64
    max_epochs: int = 10
    patience: int = 10  # the paper trains a fixed 10 epochs: no early stopping (the best val epoch is kept)
    lr_decay_every: int = 3  # epochs
    lr_decay: float = 0.5
    mask_scale: float = 0.25  # coarse mask side / input side (56 / 224)
    decoder_width: int = 64
    blur_sigma: float = 10.0  # at 224 px, scaled with the image side
    blur_probability: float = 0.5
    filter_images: int = 250_000
    filter_lr: float = 1e-3
    objective: str = "auto"  # auto (by the classifier's probabilities) | multilabel | predicted (item 1)

    family = "learned"
    version = "2"  # 2: the step decay of the learning rate is applied
    paper = PAPER
    presets: ClassVar[dict[str, dict[str, Any]]] = {"fast": FAST}
    PAIR_CHUNK: ClassVar[int] = 512  # (image, class) pairs per decoder pass at inference

    def __post_init__(self) -> None:
        super().__post_init__()
        from .base import check_choice, check_range

        check_range(self, "lr_decay_every", 1)
        check_range(self, "lr_decay", 0, 1, low_open=True)
        check_range(self, "mask_scale", 0, 1, low_open=True)
        check_range(self, "decoder_width", 1)
        check_range(self, "blur_sigma", 0, low_open=True)
        check_range(self, "blur_probability", 0, 1)
        check_range(self, "filter_images", 0)  # 0: no class-filter pre-training stage
        check_range(self, "filter_lr", 0, low_open=True)
        check_choice(self, "objective", OBJECTIVES)

    # -- controller ------------------------------------------------------------------------------------------
    def transform(self, z: Tensor) -> Tensor:
        """The distribution transformer applied to the instance-normalised maps (training form)."""
        raise NotImplementedError

    def to_unit(self, md: Tensor) -> Tensor:
        """Map the upsampled transformer output to [0, 1] at inference, keeping ranks (identity when bounded)."""
        return md

    def controller(self, coarse: Tensor) -> Tensor:
        """C(M^g): instance normalisation then the transformer, at the coarse scale."""
        return self.transform(instance_normalize(coarse))

    def coarse_size(self, image_size: int) -> int:
        return max(int(round(image_size * self.mask_scale)), 1)

    # -- hooks -----------------------------------------------------------------------------------------------
    def build_network(self, num_classes: int, image_size: int, model: nn.Module) -> nn.Module:
        device = next(model.parameters()).device
        feats = classifier_features(model, torch.zeros(1, 3, image_size, image_size, device=device))
        mask_size = self.coarse_size(image_size)
        used = [i for i, f in enumerate(feats) if f.shape[-1] <= mask_size] or [len(feats) - 1]
        if used[-1] != len(feats) - 1:
            raise MaskbenchError(f"{self.name}: the deepest feature map is finer than the {mask_size} px mask")
        self._used = used
        return MaskGenerator([feats[i].shape[1] for i in used], [feats[i].shape[-1] for i in used], num_classes,
                             mask_size, self.decoder_width)

    def _features(self, model: nn.Module, images: Tensor) -> list[Tensor]:
        feats = classifier_features(model, images)
        used = getattr(self, "_used", None)
        if used is None:  # network loaded without build_network on this instance: recompute the selection
            used = [i for i, f in enumerate(feats) if f.shape[-1] <= self.coarse_size(images.shape[-1])]
        return [feats[i] for i in used]

    def masks(self, net: nn.Module, feats: list[Tensor], image_idx: Tensor, cls: Tensor,
              size: tuple[int, int]) -> Tensor:
        """Training-form masks M = upsample(C(M^g)) (P, H, W) for (image, class) pairs."""
        coarse = net(feats, image_idx, cls, self.coarse_size(size[-1]))
        md = self.controller(coarse)
        return F.interpolate(md[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    def substrate(self, images: Tensor, image_idx: Tensor, generator: torch.Generator | None) -> Tensor:
        """A per pair: the blurred image (probability ``blur_probability``) or a random colour image + noise."""
        blurred = blur(images, scaled_sigma(self.blur_sigma, images.shape[-1]))[image_idx]
        p = image_idx.shape[0]
        noise = colour_noise((p, *images.shape[1:]), generator=generator, device=images.device, dtype=images.dtype)
        use_blur = (torch.rand(p, generator=generator) < self.blur_probability).to(images.device)
        return torch.where(use_blur[:, None, None, None], blurred, noise)

    def training_loss(self, net: nn.Module, model: nn.Module, images: Tensor, labels: Tensor,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        targets, softmax = training_targets(self.objective, model, images, labels)
        feats = self._features(model, images)
        image_idx, cls = torch.nonzero(targets > 0, as_tuple=True)  # every (image, explained class) pair
        m = self.masks(net, feats, image_idx, cls, images.shape[-2:])[:, None]  # (P, 1, H, W)
        a = self.substrate(images, image_idx, generator)
        x = images[image_idx]
        logits = model(x * m + a * (1 - m))
        n = max(cls.numel(), 1)
        if softmax:  # -log softmax(f(phi(I, M_c)))_c
            log_p = torch.log_softmax(logits.float(), dim=1).gather(1, cls[:, None])[:, 0]
            return {"loss": -log_p.sum() / n, "prob": log_p.exp().sum().detach() / n, "mask": m.mean().detach()}
        logit = logits.gather(1, cls[:, None])[:, 0].float()
        loss = F.softplus(-logit).sum() / n  # -log sigmoid(f_c(phi(I, M_c)))
        return {"loss": loss, "prob": torch.sigmoid(logit).sum().detach() / n, "mask": m.mean().detach()}

    def unit_masks(self, net: nn.Module, model: nn.Module, images: Tensor, classes: Tensor) -> Tensor:
        """(B, K, H, W) masks in [0, 1] of the given classes (inference form)."""
        b, k = classes.shape
        h, w = images.shape[-2:]
        feats = self._features(model, images)
        image_idx = torch.arange(b, device=images.device).repeat_interleave(k)
        cls = classes.reshape(-1).to(images.device)
        out = []
        for i in range(0, b * k, self.PAIR_CHUNK):
            sl = slice(i, i + self.PAIR_CHUNK)
            md = self.controller(net(feats, image_idx[sl], cls[sl], self.coarse_size(w)))
            up = F.interpolate(md[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            out.append(self.to_unit(up))
        return torch.cat(out).view(b, k, h, w).clamp(0, 1)

    def predict(self, net: nn.Module, model: nn.Module, images: Tensor) -> Tensor:
        classes = torch.arange(net.num_classes, device=images.device).expand(images.shape[0], -1)
        return self.unit_masks(net, model, images, classes)

    @torch.no_grad()
    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch: Any = None) -> Tensor:
        if getattr(self, "_net", None) is None:
            raise MaskbenchError(f"{self.name}: call setup() (train or load the network) before explain()")
        return self.unit_masks(self._net, model, images, classes)

    # -- training: feature-filter pretraining, then the decoder (LearnedMethod.fit) ----------------------------
    def lr_scheduler(self, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """The paper's step decay (halve every 3 epochs); to be stepped once per epoch by the training loop."""
        return torch.optim.lr_scheduler.StepLR(opt, step_size=self.lr_decay_every, gamma=self.lr_decay)

    def pretrain_filter(self, net: MaskGenerator, model: nn.Module, train: SplitView, val: SplitView,
                        device: torch.device, progress: TrainingProgress | None = None) -> dict[str, Any]:
        """App. A.1: train the class embeddings alone with BCE(mean_ij sigmoid(X_ij^T C_s), y_s), then freeze them
        (``y``: the true labels, or the predicted class under the ``predicted`` objective, item 1).

        Always runs its ``ceil(filter_images / batch_size)`` steps. Like :meth:`LearnedMethod.fit` it saves its
        progress (stage ``"filter"``: network, optimiser, generator and global random states, step, permutation,
        losses) every ``checkpoint_every`` steps and, before raising :class:`TrainingIncomplete`, when
        ``max_train_seconds`` is exceeded, and resumes from such a file exactly.
        """
        progress = progress if progress is not None else TrainingProgress(self)
        t0 = clock()
        steps = math.ceil(self.filter_images / self.batch_size) if self.filter_images > 0 else 0
        opt = torch.optim.Adam([net.embedding], lr=self.filter_lr)
        gen = torch.Generator().manual_seed(self.seed + 2)
        per_epoch = max(len(train) // self.batch_size, 1)
        losses = torch.zeros(steps, device=device)  # kept on the device: no host sync per step
        done, seconds = 0, 0.0
        resumed = progress.resume("filter")
        if resumed is None:
            perm = torch.randperm(len(train), generator=gen)
        else:
            shared, mine = resumed
            net.load_state_dict(shared["net"])
            opt.load_state_dict(shared["optimizer"])
            set_random_state(gen, mine["random"], device)
            done, perm, seconds = shared["steps"], shared["perm"], shared["seconds"]
            losses[:done] = shared["losses"].to(device)

        def save() -> None:
            progress.save("filter", {"net": net.state_dict(), "optimizer": opt.state_dict(), "steps": done,
                                     "perm": perm, "losses": losses[:done].cpu(), "seconds": seconds + clock() - t0},
                          {"random": random_state(gen, device)})

        while done < steps:
            step = done
            if step % per_epoch == 0 and step:
                perm = torch.randperm(len(train), generator=gen)
            idx = perm[(step % per_epoch) * self.batch_size : (step % per_epoch + 1) * self.batch_size]
            xb, yb = train[idx]
            xb = xb.to(device)
            yb, _ = training_targets(self.objective, model, xb, yb.to(device))
            deep = self._features(model, xb)[-1]
            scores = net.filter_scores(deep).clamp(1e-6, 1 - 1e-6)
            loss = F.binary_cross_entropy(scores, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[step] = loss.detach()
            done += 1
            if done < steps:
                if self.checkpoint_every is not None and done % self.checkpoint_every == 0:
                    save()
                if progress.out_of_time():
                    save()
                    raise progress.incomplete("feature-filter pretraining", done, steps)
        net.embedding.requires_grad_(False)
        with torch.no_grad():
            val_scores, val_labels = [], []
            for i in range(0, len(val), 256):
                xb, yb = val[i : i + 256]
                xb = xb.to(device)
                val_scores.append(net.filter_scores(self._features(model, xb)[-1]).cpu())
                val_labels.append(training_targets(self.objective, model, xb, yb.to(device))[0].cpu())
            scores = torch.cat(val_scores).clamp(1e-6, 1 - 1e-6) if val_scores else None
            val_loss = float(F.binary_cross_entropy(scores, torch.cat(val_labels))) if val_scores else math.nan
        k = min(20, done)
        return {
            "filter_steps": done,
            "filter_seconds": round(seconds + clock() - t0, 2),
            "filter_loss_first": round(float(losses[:k].mean()), 5) if done else None,
            "filter_loss_last": round(float(losses[-k:].mean()), 5) if done else None,
            "filter_val_loss": round(val_loss, 5),
        }

    def fit(self, net: nn.Module, ctx: MethodContext, train: Any, val: Any,
            progress: TrainingProgress | None = None) -> dict[str, Any]:
        """The feature-filter stage (skipped when the progress file records it as finished), then the decoder."""
        progress = progress if progress is not None else TrainingProgress(self)
        train, val = SplitView(train), SplitView(val)  # loaded once, shared with LearnedMethod.fit
        filter_info = progress.records.get("filter")
        if filter_info is None:
            filter_info = self.pretrain_filter(net, ctx.model, train, val, ctx.device,  # type: ignore[arg-type]
                                               progress)
            progress.records["filter"] = filter_info  # saved with the decoder's progress from now on
        net.embedding.requires_grad_(False)  # type: ignore[union-attr]  # frozen while the decoder trains
        info = super().fit(net, ctx, train, val, progress)
        return {**info, **filter_info, "train_seconds": round(filter_info["filter_seconds"] + info["train_seconds"], 2),
                "decoder_seconds": info["train_seconds"]}


@register_method("dgmp-bf")
@dataclass
class DGMPBF(DGMP):
    """DGMP with the basic transformer ReLU(z) (eq. 5); maps divided by their maximum at inference."""

    label = "DGMP-BF"

    def transform(self, z: Tensor) -> Tensor:
        return basic_transform(z)

    def to_unit(self, md: Tensor) -> Tensor:
        return md / md.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


@register_method("dgmp-cf")
@dataclass
class DGMPCF(DGMP):
    """DGMP with the customised transformer sigmoid(eta z)^h (eq. 6)."""

    eta: float = 1.5
    h: float = 2.5

    label = "DGMP-CF"

    def __post_init__(self) -> None:
        super().__post_init__()
        from .base import check_range

        check_range(self, "eta", 0, low_open=True)
        check_range(self, "h", 0, low_open=True)

    def transform(self, z: Tensor) -> Tensor:
        return customised_transform(z, self.eta, self.h)


@register_method("dgmp-cf-ft")
@dataclass
class DGMPCFFT(DGMPCF):
    """``dgmp-cf`` masks fine-tuned per image with the insertion curve (Sec. 3.3); reuses dgmp-cf's network."""

    ft_points: int = 32

    label = "DGMP-CF-FT"
    FT_CHUNK: ClassVar[int] = 1024  # insertion images per classifier pass

    def __post_init__(self) -> None:
        super().__post_init__()
        from .base import check_range

        check_range(self, "ft_points", 2)  # the insertion curve needs both ends

    def base_method(self) -> DGMPCF:
        """The ``dgmp-cf`` whose network this method uses (same training fields)."""
        return DGMPCF(**{f.name: getattr(self, f.name) for f in fields(DGMPCF)})

    def training_key(self, ctx: MethodContext) -> str:
        return self.base_method().training_key(ctx)

    def setup(self, ctx: MethodContext) -> dict[str, Any]:
        base = self.base_method()
        info = base.setup(ctx)
        self._net = base._net
        self._used = base._used
        return {**info, "network_of": base.name}

    def raw_masks(self, net: nn.Module, model: nn.Module, images: Tensor, classes: Tensor) -> Tensor:
        """The dgmp-cf masks, one image per pass: the ranking is discontinuous, so the masks must not depend on
        the batch (a convolution's result changes in the last bits with the batch size, which reorders ties)."""
        return torch.cat([self.unit_masks(net, model, images[i : i + 1], classes[i : i + 1])
                          for i in range(images.shape[0])])

    @torch.no_grad()
    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch: Any = None) -> Tensor:
        if getattr(self, "_net", None) is None:
            raise MaskbenchError(f"{self.name}: call setup() (train or load the network) before explain()")
        return self.fine_tune(model, images, classes, self.raw_masks(self._net, model, images, classes))

    def predict(self, net: nn.Module, model: nn.Module, images: Tensor) -> Tensor:
        classes = torch.arange(net.num_classes, device=images.device).expand(images.shape[0], -1)
        return self.fine_tune(model, images, classes, self.raw_masks(net, model, images, classes))

    @torch.no_grad()
    def fine_tune(self, model: nn.Module, images: Tensor, classes: Tensor, masks: Tensor) -> Tensor:
        """Sec. 3.3 for (B, K, H, W) masks: insertion curves of all (image, class) pairs, batched."""
        b, k, h, w = masks.shape
        n = h * w
        scores = masks.reshape(b * k, n)
        positions = insertion_points(n, self.ft_points).to(images.device)
        p = positions.numel()
        blurred = blur(images, scaled_sigma(self.blur_sigma, w))
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=images.device).expand_as(order))
        pair_img = torch.arange(b, device=images.device).repeat_interleave(k)
        pair_cls = classes.reshape(-1).to(images.device)
        flat = torch.arange(b * k * p, device=images.device)  # (pair, point), point fastest
        q = []
        for i in range(0, flat.numel(), self.FT_CHUNK):
            idx = flat[i : i + self.FT_CHUNK]
            pair, point = idx // p, idx % p
            keep = (rank[pair] < positions[point][:, None]).view(-1, 1, h, w)
            img = pair_img[pair]
            x = torch.where(keep, images[img], blurred[img])
            q.append(class_probabilities(model, model(x).float()).gather(1, pair_cls[pair][:, None])[:, 0])
        q_curve = torch.cat(q).view(b * k, p)
        return fine_tune_scores(scores, q_curve, positions).view(b, k, h, w)
