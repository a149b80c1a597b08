"""Faithfulness of attribution maps by ranked pixel reveal: DGMP's M_F (eq. 8) and RISE insertion / deletion.

Each true class of an image (:func:`~maskbench.metrics.base.true_class_slots`, each class once) is scored with
its own map; an image's value is the mean over its true classes of the per-class values that are defined, NaN
if none is. Class probability q(x): the classifier's own (:func:`~maskbench.core.scores.class_probabilities`),
sigmoid(logit_c(x)) for the multi-label VOC/COCO classifiers trained with BCE, the softmax for a single-label
ImageNet classifier, as both papers used (RISE scores the model's top-1 class; here every true class is scored).

**Ranked reveal.** Pixels are revealed in decreasing order of the map, each pixel either fully revealed or not
(as RISE and DGMP do). A cached map is float16 and often flat (zero outside an object, saturated at 1 inside,
a clipped gradient plateau), so ties are common: :func:`pixel_ranks` orders tied pixels by a random permutation
seeded by the image id and the class (:func:`tie_seed`), the same in every run and batch, so no pixel position
is favoured (a stable sort would reveal a plateau top rows first) and a constant map is revealed in a random
order, like the random-uniform row. (Revealing every tied pixel *fractionally*, the expected reveal over random
orders, is not the expected score since q is not linear in the image; measured on the default run before we
dropped it, constant maps then scored deletion 37.5 against 59.6 for random maps.)

**M_F, DGMP eq. 8** ("Distribution-guided local explanation for black-box classifiers", anonymous ICLR
submission, Sec. 3.4 eq. 8 and Sec. 4.1). The image x is perturbed towards the substrate A = Gaussian blur of x
with "a variance of 10" at 224 px, read as sigma = 10 px at 224 px as in our DGMP training substrate
(``methods/dgmp.py``: the code DGMP builds on blurs with sigma = 11 at 224 px, and a literal variance of 10,
sigma = 3.2 px, leaves objects recognisable: measured on the default synthetic run, 42% of the (image, class)
pairs then lose less than 0.05 of their probability under the full blur and M_F would be undefined for them,
against 9% at sigma = 10), scaled to the image size (:func:`~maskbench.core.images.scaled_sigma`:
2.86 px at 64 px), kernel radius ceil(4 sigma), zero padding (the border fades to the mean colour).
With Delta = 1/32 and revealed fractions f_k = k/32, k = 0..32,
x_k = A + r_k * (x - A), r_k the 0 / 1 ranked reveal of the class's map; q_F = q(x_0) = q(A) (fully perturbed),
q_O = q(x_32) = q(x) (unperturbed). We read eq. 8 as the right Riemann sum over the 32 revealed fractions (the
paper's sum over i gives no bounds; k = 0 would add one more map-independent q_F term):

    M_F = 100 * sum_{k=1}^{32} q_k / (q_O - q_F) * Delta          (``mf``, label "M_F (eq. 8)").

Eq. 8 as written has a floor of about 100 * q_F / (q_O - q_F) that depends on the classifier and the image, not
on the map, and it is unbounded as the gap q_O - q_F -> 0. We therefore also report the clipped, normalised form

    M_F clipped = 100 * sum_{k=1}^{32} clamp((q_k - q_F) / (q_O - q_F), 0, 1) * Delta   (``mf_clipped``),

in [0, 100], 100 meaning that revealing the first 1/32 of the pixels already restores q_O (the leaderboard shows
this one; when q_F <= q_k <= q_O throughout, M_F = M_F clipped + 100 q_F / (q_O - q_F)). Both are undefined
(NaN) when q_O - q_F < ``MIN_GAP`` = 0.05: blurring the whole image then does not lower the class probability
enough for the normalisation to mean anything.

**Insertion / deletion, RISE** (Petsiuk et al., BMVC 2018; eclique/RISE ``evaluation.py``): pixels in
decreasing saliency order, ``step`` = W pixels per step (RISE: 224 per step at 224 x 224), so n = ceil(HW / W) = H
steps and n + 1 evaluations, at revealed counts min(k W, HW), k = 0..n (ranked reveal). *Insertion* starts
from a blurred image and restores original pixels. RISE blurs with a Gaussian kernel of length 11 and sigma 5 at
224 px; here sigma = scaled_sigma(5, H) with truncate 1.0, so the radius is 5 px * H / 224 rounded up, with zero
padding (RISE's kernel is scipy's ``gaussian_filter`` of an 11 x 11 delta, whose reflected tails make it slightly
flatter than the truncated, renormalised Gaussian used here). *Deletion* starts from the image and sets the
removed pixels to 0 in normalised space (the mean colour, RISE's ``torch.zeros_like``). Score = the trapezoid
area on a normalised x axis, 100 * (sum_k q_k - q_0/2 - q_n/2) / n (``insertion``, higher is better;
``deletion``, lower is better). RISE evaluated the top-1 class; we evaluate each true class (see above).

**Curves** (``curves``, stored beside the rows, for figures): per image and x = k/32, k = 0..32, the mean over
its scored true classes of the insertion and deletion curves (q at revealed fraction x; RISE's own grid, k W
pixels, resampled linearly onto k/32, which at 64 and 224 px is a subset of it) and of the normalised M_F curve
clamp((q_k - q_F) / (q_O - q_F), 0, 1), whose right Riemann sum is ``mf_clipped``.

All five metrics come from one computation per :class:`MetricInputs` (cached on that object): the endpoint
images (x, the two blurs, the all-zero image) are forwarded once per image, the interior steps of the three
curves once per scored class, insertion and deletion sharing one reveal; perturbed images are built and
forwarded chunk by chunk (about ``CHUNK_BYTES`` of temporaries at a time).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from maskbench.core.images import gaussian_blur, scaled_sigma
from maskbench.core.scores import class_probabilities

from .base import (
    Curves,
    MetricInputs,
    TableSpec,
    forward_in_chunks,
    memo_on_inputs,
    metric_statistic,
    register_metric,
    register_table,
    true_class_slots,
)

MF_STEPS = 32  # DGMP Sec. 4.1: Delta = 1/32
MF_SIGMA_224 = 10.0  # DGMP Sec. 4: blur "with a variance of 10" (at 224 px), read as sigma = 10 px
MF_TRUNCATE = 4.0  # kernel radius ceil(4 sigma), as TorchRay's imsmooth
MIN_GAP = 0.05  # M_F undefined when q_O - q_F < MIN_GAP
RISE_SIGMA_224 = 5.0  # RISE evaluation: Gaussian klen = 11, sigma = 5 at 224 px
RISE_TRUNCATE = 1.0  # radius = 5 px at 224 = 1 sigma
PADDING = "constant"  # zero padding: the blurred border fades to the mean colour
CHUNK_BYTES = 256 * 2**20  # temporaries per chunk of perturbed images / reveal maps
_BYTES_PER_ROW_PIXEL = 3 * 4 * 2 + 8 + 1  # two (3, H, W) float32 images per row + the ranks read + a bool reveal
_CACHE_ATTR = "_maskbench_faithfulness_cache"


# ----------------------------------------------------------------------------------------------------------------
# ranked reveal with seeded tie-breaking


def tie_seed(image_id: str, cls: int) -> int:
    """Seed of the tie-breaking order of one (image, class) map: stable across runs, batches and machines."""
    return zlib.crc32(f"{image_id}/{int(cls)}".encode())


def pixel_ranks(scores: Tensor, seeds: Sequence[int] | None = None) -> Tensor:
    """(N, P) long: the reveal rank of every pixel of maps ``scores`` (N, P), 0 = revealed first.

    Pixels are ordered by decreasing score; NaN scores rank last; pixels with equal scores are ordered by a
    random permutation drawn from ``seeds[i]`` for map i (default 0), so no pixel position is favoured and the
    same map always gets the same order. One stable sort after one random permutation per map.
    """
    n, p = scores.shape
    flat = scores.float()
    flat = torch.where(torch.isnan(flat), torch.full_like(flat, -math.inf), flat)
    seeds = [0] * n if seeds is None else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"pixel_ranks got {len(seeds)} seeds for {n} maps")
    keys = torch.stack([torch.rand(p, generator=torch.Generator().manual_seed(int(sd))) for sd in seeds]) \
        if n else torch.empty(0, p)
    shuffle = keys.to(flat.device).argsort(1)  # a random permutation per map
    order = torch.gather(flat, 1, shuffle).argsort(dim=1, descending=True, stable=True)
    order = torch.gather(shuffle, 1, order)  # pixel indices from first to last revealed
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(p, device=flat.device).expand(n, p))
    return ranks


def reveal_fractions(scores: Tensor, fractions: Tensor | Sequence[float], seeds: Sequence[int] | None = None) -> Tensor:
    """Ranked reveal: (N, S, H, W) of 0 / 1 for maps ``scores`` (N, H, W) and ``fractions`` (S,).

    For fraction f, the first n = round(f * H * W) pixels in :func:`pixel_ranks` order are revealed (1), the
    others not (0). Ties are broken by the seeded random order of each map (``seeds``, default 0).
    """
    if scores.dim() != 3:
        raise ValueError(f"reveal_fractions expects scores (N, H, W), got shape {tuple(scores.shape)}")
    n, h, w = scores.shape
    f = torch.as_tensor(fractions, dtype=torch.float64, device=scores.device).reshape(-1)
    counts = torch.round(f * h * w).long().clamp(0, h * w)
    ranks = pixel_ranks(scores.reshape(n, h * w), seeds)
    return (ranks[:, None, :] < counts[None, :, None]).float().view(n, -1, h, w)


# ----------------------------------------------------------------------------------------------------------------
# scores from probability curves


def mf_eq8(curve: Tensor) -> Tensor:
    """DGMP eq. 8 from curves (..., 33) of q at revealed fractions k/32: 100 * sum_{k>=1} q_k / (q_O - q_F) / 32.

    q_F = curve[..., 0], q_O = curve[..., -1]; NaN where q_O - q_F < ``MIN_GAP``.
    """
    steps = curve.shape[-1] - 1
    gap = curve[..., -1] - curve[..., 0]
    value = 100.0 * (curve[..., 1:] / gap[..., None]).sum(-1) / steps
    return torch.where(gap >= MIN_GAP, value, torch.full_like(value, math.nan))


def mf_clipped(curve: Tensor) -> Tensor:
    """Clipped M_F from curves (..., 33): 100 * sum_{k>=1} clamp((q_k - q_F) / (q_O - q_F), 0, 1) / 32, in [0, 100].

    NaN where q_O - q_F < ``MIN_GAP``.
    """
    steps = curve.shape[-1] - 1
    q_f, gap = curve[..., :1], curve[..., -1:] - curve[..., :1]
    value = 100.0 * ((curve[..., 1:] - q_f) / gap).clamp(0.0, 1.0).sum(-1) / steps
    return torch.where(gap[..., 0] >= MIN_GAP, value, torch.full_like(value, math.nan))


def auc_trapezoid(curve: Tensor) -> Tensor:
    """RISE's ``auc``: 100 * (sum_k q_k - q_0 / 2 - q_n / 2) / n for curves (..., n + 1) on a normalised x axis."""
    n = curve.shape[-1] - 1
    return 100.0 * (curve.sum(-1) - curve[..., 0] / 2 - curve[..., -1] / 2) / n


def resample(curve: Tensor, x_from: Tensor, x_to: Tensor) -> Tensor:
    """Curves (..., S) given at increasing ``x_from`` (S,), linearly interpolated at ``x_to`` (T,) in its range."""
    hi = torch.searchsorted(x_from, x_to).clamp(1, len(x_from) - 1)
    lo = hi - 1
    t = ((x_to - x_from[lo]) / (x_from[hi] - x_from[lo])).to(curve.dtype)
    return curve[..., lo] * (1 - t) + curve[..., hi] * t


# ----------------------------------------------------------------------------------------------------------------
# curves of one batch


@dataclass
class FaithfulnessResult:
    """All faithfulness outputs of one batch.

    ``curves``: name -> (B, K, S) class probabilities along each curve ("mf": 33 fractions k/32; "insertion" and
    "deletion": H + 1 steps), NaN for slots that are not scored (not a true class, a repeated class, or, for
    "mf", q_O - q_F < MIN_GAP). ``per_slot``: metric name -> (B, K) values; ``per_image``: metric name -> (B,)
    mean over each image's defined true-class values (NaN if none).
    """

    curves: dict[str, Tensor]
    per_slot: dict[str, Tensor]
    per_image: dict[str, Tensor]


def _class_prob(model: nn.Module, logits: Tensor, cls: Tensor) -> Tensor:
    """The class probability (:func:`~maskbench.core.scores.class_probabilities`: sigmoid or softmax, as the
    classifier's) of class ``cls`` (M,) in ``logits`` (M, S, C) -> (M, S)."""
    probs = class_probabilities(model, logits)
    return torch.gather(probs, 2, cls[:, None, None].expand(-1, logits.shape[1], 1))[..., 0]


def _interior_curves(model: nn.Module, ranks: Tensor, img: Tensor, cls: Tensor, counts: Tensor,
                     paths: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """Class probabilities (M, S) along each path (start, finish) of (B, 3, H, W) images at ``counts`` (S,).

    Slot m (image ``img[m]``, class ``cls[m]``, pixel ranks ``ranks[m]``) sees start where its pixels are not
    yet revealed and finish where they are; all paths share the reveal. Chunked over slots and steps so the
    temporaries stay near ``CHUNK_BYTES``.
    """
    m, n_pix = ranks.shape
    s = counts.numel()
    h, w = paths[0][0].shape[-2:]
    out = [torch.empty(m, s, device=ranks.device) for _ in paths]
    if m == 0 or s == 0:
        return out
    budget = max(1, CHUNK_BYTES // (n_pix * _BYTES_PER_ROW_PIXEL * len(paths)))
    step_rows = min(s, budget)
    slot_rows = max(1, budget // step_rows)
    for i in range(0, m, slot_rows):
        sl = slice(i, i + slot_rows)
        b_idx, c_idx = img[sl], cls[sl]
        for j in range(0, s, step_rows):
            cnt = counts[j : j + step_rows]
            r = (ranks[sl][:, None, :] < cnt[None, :, None]).view(-1, len(cnt), 1, h, w)  # (m', s', 1, H, W)
            for p, (start, finish) in enumerate(paths):
                a, z = start[b_idx][:, None], finish[b_idx][:, None]
                x = torch.where(r, z, a).flatten(0, 1)  # (m' s', 3, H, W)
                logits = forward_in_chunks(model, x).view(len(b_idx), len(cnt), -1)
                out[p][sl, j : j + step_rows] = _class_prob(model, logits, c_idx)
    return out


@torch.no_grad()
def _compute(inputs: MetricInputs) -> FaithfulnessResult:
    model, images, masks, classes = inputs.model, inputs.images, inputs.masks, inputs.classes
    b, k = classes.shape
    h, w = images.shape[-2:]
    n_pix = h * w
    dev = images.device
    slots = true_class_slots(classes, inputs.batch.labels.to(dev))
    img, col = torch.nonzero(slots, as_tuple=True)  # scored slots: image index, slot index
    cls = classes[img, col]
    m = img.numel()

    # endpoints, once per image: x, the two blurred substrates and the all-zero image
    blur_mf = gaussian_blur(images, scaled_sigma(MF_SIGMA_224, h), MF_TRUNCATE, PADDING)
    blur_ins = gaussian_blur(images, scaled_sigma(RISE_SIGMA_224, h), RISE_TRUNCATE, PADDING)
    zero = torch.zeros_like(images)
    ends = class_probabilities(model, forward_in_chunks(model, torch.cat([images, blur_mf, blur_ins, zero[:1]])))
    q_x, q_mf0, q_ins0 = ends[:b][img, cls], ends[b : 2 * b][img, cls], ends[2 * b : 3 * b][img, cls]
    q_zero = ends[3 * b][cls]

    ids = inputs.batch.image_ids
    seeds = [tie_seed(ids[i], c) for i, c in zip(img.tolist(), cls.tolist(), strict=True)]
    ranks = pixel_ranks(masks[img, col].reshape(m, n_pix), seeds)

    # M_F: interior fractions k/32, k = 1..31, only where the normalisation is defined
    mf_curve = torch.full((m, MF_STEPS + 1), math.nan, device=dev)
    mf_curve[:, 0], mf_curve[:, -1] = q_mf0, q_x
    ok = torch.nonzero(q_x - q_mf0 >= MIN_GAP).flatten()
    k_mf = torch.arange(1, MF_STEPS, device=dev)
    counts_mf = torch.round(k_mf.double() / MF_STEPS * n_pix).long()
    (inner,) = _interior_curves(model, ranks[ok], img[ok], cls[ok], counts_mf, [(blur_mf, images)])
    mf_curve[ok, 1:-1] = inner
    mf_curve[q_x - q_mf0 < MIN_GAP] = math.nan

    # RISE: step = W pixels, n = ceil(HW / W) steps; insertion blur -> x, deletion x -> 0, one shared reveal
    n_steps = -(-n_pix // w)
    counts_rise = (torch.arange(1, n_steps, device=dev) * w).clamp(max=n_pix)
    ins_in, del_in = _interior_curves(model, ranks, img, cls, counts_rise, [(blur_ins, images), (images, zero)])
    ins_curve = torch.cat([q_ins0[:, None], ins_in, q_x[:, None]], 1)
    del_curve = torch.cat([q_x[:, None], del_in, q_zero[:, None]], 1)

    per_m = {
        "mf": mf_eq8(mf_curve),
        "mf_clipped": mf_clipped(mf_curve),
        "insertion": auc_trapezoid(ins_curve),
        "deletion": auc_trapezoid(del_curve),
    }
    curves: dict[str, Tensor] = {}
    for name, c in (("mf", mf_curve), ("insertion", ins_curve), ("deletion", del_curve)):
        full = torch.full((b, k, c.shape[1]), math.nan, device=dev)
        full[img, col] = c
        curves[name] = full
    per_slot: dict[str, Tensor] = {}
    per_image: dict[str, Tensor] = {}
    for name, v in per_m.items():
        full = torch.full((b, k), math.nan, device=dev)
        full[img, col] = v
        per_slot[name] = full
        per_image[name] = full.nanmean(1)  # all-NaN rows (no defined true class) stay NaN
    return FaithfulnessResult(curves, per_slot, per_image)


def faithfulness_scores(inputs: MetricInputs) -> FaithfulnessResult:
    """The curves and the four faithfulness scores of a batch, computed once per ``inputs`` and cached on it.

    The cache is invalidated if ``inputs``' model, images, masks, classes or labels are replaced or modified in
    place (tensor identity and version counter).
    """
    return memo_on_inputs(inputs, _CACHE_ATTR, _compute)


# ----------------------------------------------------------------------------------------------------------------
# registered metrics


CURVE_X = torch.arange(MF_STEPS + 1, dtype=torch.float64) / MF_STEPS  # stored curves' x: revealed fraction k/32


@register_metric("curves", higher_is_better=True, table="faithfulness", label="Faithfulness curves", version="1",
                 valid_range=(0.0, 1.0), curves=True)
def faithfulness_curves(inputs: MetricInputs) -> Curves:
    """Per-image insertion, deletion and normalised M_F curves at revealed fractions k/32 (mean over true classes)."""
    result = faithfulness_scores(inputs)
    h, w = inputs.images.shape[-2:]
    dev = inputs.images.device
    x = CURVE_X.to(dev)
    mf = result.curves["mf"]
    q_f, gap = mf[..., :1], mf[..., -1:] - mf[..., :1]
    y = {"mf": ((mf - q_f) / gap).clamp(0.0, 1.0)}  # NaN slots stay NaN (clamp keeps NaN)
    for name in ("insertion", "deletion"):
        c = result.curves[name]
        x_native = (torch.arange(c.shape[-1], device=dev, dtype=torch.float64) * w).clamp(max=h * w) / (h * w)
        y[name] = resample(c, x_native, x)
    with torch.no_grad():
        per_image = {n: v.nanmean(1) for n, v in y.items()}  # (B, K, S) -> (B, S); all-NaN images stay NaN
    return Curves({n: x for n in per_image}, per_image)


@register_metric("mf", higher_is_better=True, table="faithfulness", label="M_F (eq. 8)", version="2",
                 valid_range=(0.0, math.inf))
def faithfulness_mf(inputs: MetricInputs) -> Tensor:
    """DGMP eq. 8 as written: 100 * sum_k q_k / (q_O - q_F) / 32 over blur-to-image reveal (mean over true classes)."""
    return faithfulness_scores(inputs).per_image["mf"]


@register_metric("mf_clipped", higher_is_better=True, table="faithfulness", label="M_F clipped", version="2",
                 valid_range=(0.0, 100.0))
def faithfulness_mf_clipped(inputs: MetricInputs) -> Tensor:
    """Clipped M_F in [0, 100]: 100 * sum_k clamp((q_k - q_F) / (q_O - q_F), 0, 1) / 32 (mean over true classes)."""
    return faithfulness_scores(inputs).per_image["mf_clipped"]


@register_metric("insertion", higher_is_better=True, table="faithfulness", label="Insertion", version="2",
                 valid_range=(0.0, 100.0))
def insertion(inputs: MetricInputs) -> Tensor:
    """RISE insertion AUC (%), blurred image -> image, W pixels per step (mean over true classes)."""
    return faithfulness_scores(inputs).per_image["insertion"]


@register_metric("deletion", higher_is_better=False, table="faithfulness", label="Deletion", version="2",
                 valid_range=(0.0, 100.0))
def deletion(inputs: MetricInputs) -> Tensor:
    """RISE deletion AUC (%), image -> zeros (mean colour), W pixels per step (mean over true classes)."""
    return faithfulness_scores(inputs).per_image["deletion"]


register_table(TableSpec(
    "faithfulness", tuple(metric_statistic(m) for m in ("mf_clipped", "mf", "insertion", "deletion")),
    r"Faithfulness: $\mathcal{M}_F$ (blurred substrate, $\Delta = 1/32$) clipped to the "
    r"$[q_F, q_O]$ range and as eq.~8 is written; RISE insertion and deletion AUC (\%).",
    r"Zhang et al.\ (DGMP), Table 1; Petsiuk et al.\ (2018)", order=20,
    headline=("mf_clipped", "M_F clipped", r"$\mathcal{M}_F$ clipped: faithfulness"),
))
