"""Contract tests run over every registered metric (the built-in ones and the plugin example
``examples/energy_pointing.py`` when it exists): shape and dtype, valid range, undefined cases NaN (never 0),
one image at a time equal to the batch, and polarity (the ground-truth masks beat constant 0.5 masks).

Everything is scored on a scene whose answers are known by construction (:class:`RegionNet`, :func:`scene`):
three classes, each with its own 12 x 12 region; an image holds noise in the regions of its labelled classes
and zeros (the data set's mean colour) everywhere else, so the classifier's evidence for a class lies exactly
inside the class's ground-truth segmentation and box. The plugin's registrations are confined to this module:
the registries are restored after collection and after the module's tests, so other test files never see the
plugin's metric or table."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mb_testutils import registries_restored
from torch import Tensor, nn

from maskbench.core.registry import import_plugin
from maskbench.core.stats import Statistic, column_means
from maskbench.datasets.base import Batch
from maskbench.methods import METHODS
from maskbench.metrics import METRICS, TABLES, Curves, MetricInputs, TableSpec, table_specs, value_range

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "examples" / "energy_pointing.py"


def import_example_plugin() -> None:
    """The plugin example of the README, run through the same contract as the built-in metrics."""
    assert PLUGIN.is_file(), PLUGIN
    import_plugin(str(PLUGIN))


with registries_restored(METRICS, TABLES, METHODS):
    BUILTIN_METRICS = METRICS.list()
    import_example_plugin()
    CONTRACT_METRICS = METRICS.list()
    PLUGIN_METRICS = sorted(set(CONTRACT_METRICS) - set(BUILTIN_METRICS))


@pytest.fixture(scope="module", autouse=True)
def plugin_registered():
    """The plugin's metric (and table) registered for this module's tests only."""
    with registries_restored(METRICS, TABLES, METHODS):
        import_example_plugin()
        assert METRICS.list() == CONTRACT_METRICS
        yield


# ------------------------------------------------------------------------------------------------ the scene

H = W = 32
C = 3
# class c's region (rows r0:r1, columns c0:c1): 144 px each (14 % of the image, under the 1/4 of the pointing
# game's difficult subset), at least 4 px apart so no 3x3 convolution reads two regions
REGIONS = ((2, 14, 2, 14), (18, 30, 18, 30), (2, 14, 18, 30))
BIAS = -5.0
GAIN = 6.3  # the mean ReLU feature of unit noise is about 1: a labelled class's logit is about 1.3


def region(c: int) -> Tensor:
    r0, r1, c0, c1 = REGIONS[c]
    out = torch.zeros(H, W, dtype=torch.bool)
    out[r0:r1, c0:c1] = True
    return out


def box(c: int) -> list[float]:
    r0, r1, c0, c1 = REGIONS[c]
    return [float(c0), float(r0), float(c1), float(r1)]  # pixel-edge xyxy: covers exactly the region


class RegionNet(nn.Module):
    """A three-class classifier whose answer is known by construction: four fixed 3x3 kernels (no bias), ReLU,
    the channel mean; class c's logit is ``GAIN`` x the mean of that feature over class c's region, plus
    ``BIAS``. Nothing outside a class's region (and its 1 px border) can change its logit; a zero image gives
    every class ``BIAS`` (-5); halving the image halves the feature (ReLU and convolution are positively
    homogeneous); blurring the noise lowers it."""

    def __init__(self):
        super().__init__()
        kernels = torch.empty(4, 3, 3, 3).normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
        self.register_buffer("kernels", kernels)
        self.register_buffer("regions", torch.stack([region(c) for c in range(C)]).float())

    def forward(self, x: Tensor) -> Tensor:
        feature = torch.relu(nn.functional.conv2d(x, self.kernels, padding=1)).mean(1)  # (B, H, W)
        evidence = (feature[:, None] * self.regions).sum((2, 3)) / self.regions.sum((1, 2))
        return GAIN * evidence + BIAS


def scene(labels: list[list[int]], has_seg: list[bool] | None = None, seed: int = 0) -> Batch:
    """Images with unit noise in the regions of their labelled classes, zeros elsewhere; each labelled class has
    its region as segmentation (where ``has_seg``) and as its one (not difficult) box; a 1 px ignore band
    surrounds each labelled region outside it (VOC's void band, never foreground)."""
    b = len(labels)
    has_seg = [True] * b if has_seg is None else has_seg
    gen = torch.Generator().manual_seed(seed)
    images = torch.zeros(b, 3, H, W)
    lab = torch.zeros(b, C)
    class_masks = torch.zeros(b, C, H, W, dtype=torch.bool)
    ignore = torch.zeros(b, H, W, dtype=torch.bool)
    boxes, box_labels = [], []
    for i, cl in enumerate(labels):
        for c in cl:
            reg = region(c)
            images[i][:, reg] = torch.randn(3, int(reg.sum()), generator=gen)
            lab[i, c] = 1
            if has_seg[i]:
                class_masks[i, c] = reg
                band = nn.functional.max_pool2d(reg[None, None].float(), 3, 1, 1)[0, 0].bool() & ~reg
                ignore[i] |= band
        boxes.append(torch.tensor([box(c) for c in cl], dtype=torch.float32).reshape(-1, 4))
        box_labels.append(torch.tensor(cl, dtype=torch.long))
    return Batch(
        images=images, labels=lab, image_ids=[f"img{i}" for i in range(b)], class_masks=class_masks,
        ignore=ignore & torch.tensor(has_seg)[:, None, None], has_seg=torch.tensor(has_seg),
        boxes=boxes, box_labels=box_labels, box_difficult=[torch.zeros(len(cl), dtype=torch.bool) for cl in labels],
    )


# The scene: images P0-P4 have a true class among their explained ones and a segmentation (the polarity images);
# U_NOTRUE explains only classes it does not contain, U_NOLABEL contains no class at all (a COCO image without
# annotations), U_NOSEG has no segmentation (a VOC image of the Main list only), its box being its ground truth.
LABELS = [[0], [1], [0, 1], [2], [0, 2], [2], [], [1]]
CLASSES = torch.tensor([[0, 1], [1, 0], [0, 1], [2, 2], [2, 0], [0, 1], [0, 1], [1, 0]])  # [2, 2]: padded
HAS_SEG = [True] * 7 + [False]
POLARITY = [0, 1, 2, 3, 4]
U_NOTRUE, U_NOLABEL, U_NOSEG = 5, 6, 7
NO_TRUE_CLASS = [U_NOTRUE, U_NOLABEL]
# Metrics that compare the merged mask with the segmentation: undefined without one (segmentation.py).
# ``sal`` (same table) reads only the classifier and the mask's area, so it is defined without segmentation.
SEGMENTATION_ONLY = {"acc", "iou", "mae"}
# Sanity metrics that compare a true class's map with the map of an absent class (sanity.py): defined only where
# an absent class is explained and the maps are not constant, so neither the "defined on every polarity image"
# rule nor the ground-truth-beats-0.5 polarity applies (the absent classes' ground truth is empty, 0.5 constant);
# their defined cells are checked by expected_defined, their answers in tests/test_metrics_sanity.py.
ABSENT_CLASS_METRICS = {"randomlogit", "randomlogit_ssim"}


@pytest.fixture(scope="module")
def model() -> nn.Module:
    net = RegionNet().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@pytest.fixture(scope="module")
def batch() -> Batch:
    return scene(LABELS, HAS_SEG, seed=0)


def random_masks(b: int = len(LABELS), seed: int = 3) -> Tensor:
    return torch.rand(b, CLASSES.shape[1], H, W, generator=torch.Generator().manual_seed(seed))


def ground_truth_masks(batch: Batch, classes: Tensor) -> Tensor:
    idx = classes[:, :, None, None].expand(-1, -1, H, W)
    return torch.gather(batch.class_masks, 1, idx).float()


def score(name: str, model: nn.Module, batch: Batch, masks: Tensor, classes: Tensor) -> dict[str, Tensor]:
    """The metric's stored columns: ``{name: (B,)}`` for a scalar metric, ``{name/key: (B,)}`` for a dict one,
    ``{name/curve/k: (B,)}`` for a curve metric (point k of each curve), so every contract applies to them."""
    out = METRICS.get(name).fn(MetricInputs(model, batch.images, masks, classes, batch))
    if METRICS.get(name).curves:
        assert isinstance(out, Curves), type(out)
        assert set(out.x) == set(out.y)
        for c, y in out.y.items():
            assert y.dim() == 2 and y.shape[1] == len(out.x[c]), (c, tuple(y.shape))
        return {f"{name}/{c}/{k}": y[:, k] for c, y in out.y.items() for k in range(y.shape[1])}
    if isinstance(out, dict):
        return {f"{name}/{k}": v for k, v in out.items()}
    return {name: out}


def check_shape_dtype_range(name: str, values: dict[str, Tensor], b: int) -> None:
    """(a) every column is a float (B,) tensor, finite or NaN; (b) defined values lie in the valid range. (A dict
    metric may return no cell at all for an image where nothing is defined, e.g. class masking without labels.)"""
    for col, v in values.items():
        assert isinstance(v, Tensor), (col, type(v))
        assert v.shape == (b,), (col, tuple(v.shape))
        assert v.dtype.is_floating_point, (col, v.dtype)
        assert not torch.isinf(v).any(), (col, v)
        lo, hi = value_range(col)
        defined = v[~torch.isnan(v)]
        assert ((defined >= lo) & (defined <= hi)).all(), f"{col} outside its valid range [{lo}, {hi}]: {v}"


# ------------------------------------------------------------------------------------------------ premises


def test_scene_premises(model, batch):
    """What the known answers below rest on, checked on the very images they use: every labelled class's logit
    is at least 0 on its image (predicted at the unmasked threshold 0), at least -1 when the image is masked by
    its ground truth (kept at the masked threshold -1), below -1 under a constant 0.5 mask; every other class's
    logit is about the bias; blurring the whole image (M_F's substrate) lowers the labelled classes' probability
    by more than M_F's minimum gap of 0.05."""
    from maskbench.core.images import gaussian_blur, scaled_sigma
    from maskbench.metrics.faithfulness import MF_SIGMA_224, MF_TRUNCATE, MIN_GAP, PADDING

    logits = model(batch.images)
    true = batch.labels > 0
    assert (logits[true] >= 0.2).all() and (logits[~true] < BIAS + 0.5).all(), logits
    merged = ground_truth_masks(batch, torch.arange(C).expand(len(LABELS), C)).amax(1)
    assert (model(batch.images * merged[:, None])[true & batch.has_seg[:, None]] >= -0.8).all()
    assert (model(batch.images * 0.5)[true] < -1.2).all()
    blurred = gaussian_blur(batch.images, scaled_sigma(MF_SIGMA_224, H), MF_TRUNCATE, PADDING)
    gap = torch.sigmoid(logits) - torch.sigmoid(model(blurred))
    assert (gap[true] > MIN_GAP + 0.05).all(), gap


def test_the_plugin_example_is_covered_when_present():
    """The plugin's metrics are among the parametrized ones whenever its file exists (a guard on the guard), and
    they come from that file."""
    if PLUGIN.is_file():
        assert PLUGIN_METRICS, "examples/energy_pointing.py registered no metric"
        for name in PLUGIN_METRICS:
            assert METRICS.get(name).fn.__module__ == f"maskbench_plugin_{PLUGIN.stem}", name
    else:
        assert not PLUGIN_METRICS


def test_registry_origin_names_the_module_that_registered_the_metric():
    """core/registry.py: entries 'remember the module that registered them (origin)'."""
    wrong = {n: METRICS.origin(n) for n in CONTRACT_METRICS if METRICS.origin(n) != METRICS.get(n).fn.__module__}
    assert not wrong, wrong
    assert TABLES.origin("segmentation") == "maskbench.metrics.segmentation"


# ------------------------------------------------------------------------------------------------ (a) + (b)


@pytest.mark.parametrize("name", CONTRACT_METRICS)
def test_shape_dtype_and_valid_range(name, model, batch):
    """(a) + (b) on random, ground-truth and constant masks: float (B,) columns, finite or NaN, within the
    registered valid range; and every metric is defined somewhere (else every NaN check below is vacuous)."""
    spec = METRICS.get(name)
    assert spec.valid_range[0] <= spec.valid_range[1]
    for kind, masks in (("random", random_masks()), ("gt", ground_truth_masks(batch, CLASSES)),
                        ("constant", torch.full((len(LABELS), 2, H, W), 0.5))):
        values = score(name, model, batch, masks, CLASSES)
        check_shape_dtype_range(name, values, len(LABELS))
        defined = torch.stack([~torch.isnan(v) for v in values.values()]).any(0)
        if name in ABSENT_CLASS_METRICS:  # random maps: defined where an absent class is explained
            assert kind != "random" or defined.any(), f"{name} is defined nowhere"
            continue
        assert defined[POLARITY].all(), f"{name} is undefined on images with a true class: {defined}"


# ------------------------------------------------------------------------------------------------ (c)


def has_true_class(batch: Batch, classes: Tensor) -> Tensor:
    return torch.gather(batch.labels > 0, 1, classes).any(1)


def expected_defined(name: str, batch: Batch, classes: Tensor) -> dict[str, Tensor] | None:
    """Per documented metric, which cells are defined on the scene (all ground truth non-empty, no difficult
    box, every M_F gap above the minimum: test_scene_premises); None for a metric documented nowhere here
    (a plugin), which gets the generic rule only."""
    b = len(batch)
    has_true = has_true_class(batch, classes)
    labels = batch.labels > 0
    if name in SEGMENTATION_ONLY:  # segmentation.py: no true class explained, or no segmentation
        return {name: has_true & batch.has_seg}
    if name in {"sal", "mi", "mf", "mf_clipped", "insertion", "deletion"}:  # no true class explained
        return {name: has_true}
    if name == "curves":  # every point of the three curves: no true class explained (M_F's gap holds here)
        return {f"curves/{c}/{k}": has_true for c in ("insertion", "deletion", "mf") for k in range(33)}
    if name == "energy-pointing":  # examples/energy_pointing.py: no true class explained, no box or no energy
        return {name: has_true}  # (every labelled class has a box, and random masks have energy)
    if name in ABSENT_CLASS_METRICS:  # a true class and an absent class among the explained ones (random maps)
        absent = ~torch.gather(labels, 1, classes)
        return {name: has_true & absent.any(1)}
    if name == "maskcls":  # every count undefined without a true class explained
        keys = ["tp", "fp", "fn", "orig_tp", "orig_fp", "orig_fn"]
        return {f"maskcls/{k}": has_true for k in keys}
    if name == "pointing":
        # c<k>: k is a true class among the explained ones; d<k>: and the pair is in the difficult subset
        # (area < 1/4 of the image, always true here, and another labelled class); counts: any true class
        out = {f"pointing/{k}": has_true for k in ("constant", "tied", "no_gt", "skipped_difficult")}
        explained = torch.zeros(b, C, dtype=torch.bool)
        explained[torch.arange(b)[:, None], classes] = True
        scored = explained & labels
        other = labels.sum(1, keepdim=True) > 1
        for k in sorted(set(classes[torch.gather(labels, 1, classes)].tolist())):
            out[f"pointing/c{k}"] = scored[:, k]
            out[f"pointing/d{k}"] = scored[:, k] & other[:, 0]
        return out
    if name == "classmask":
        # t<t>/none: t is a label of the image; t<t>/m<c>: and c is one of its explained classes (class_table.py:
        # a mask of a class the image does not contain is still a mask of that class, so an image without a true
        # class among its explained ones has defined off-diagonal cells)
        out = {}
        explained = torch.zeros(b, C, dtype=torch.bool)
        explained[torch.arange(b)[:, None], classes] = True
        for t in torch.nonzero(labels.any(0)).flatten().tolist():
            out[f"classmask/t{t}/none"] = labels[:, t]
            for c in sorted(set(classes.flatten().tolist())):
                out[f"classmask/t{t}/m{c}"] = labels[:, t] & explained[:, c]
        return out
    return None


@pytest.mark.parametrize("name", CONTRACT_METRICS)
def test_undefined_cases_are_nan(name, model, batch):
    """(c) An image without a true class among its explained classes (U_NOTRUE, U_NOLABEL) is NaN, never 0:
    a scalar metric's value, and every cell of a dict metric except class masking's, whose cells are undefined
    per (target, mask class) pair (see :func:`expected_defined`); a segmentation metric is NaN on the image
    without segmentation (U_NOSEG). For the documented metrics the exact pattern of defined cells is checked
    too (defined where the docstring says so). Any metric, plugins included, must not read the all-False masks
    of an image without segmentation as if they were its ground truth: garbage there changes nothing."""
    masks = random_masks()
    values = score(name, model, batch, masks, CLASSES)
    expected = expected_defined(name, batch, CLASSES)
    if expected is None:  # generic rule for a metric not documented here
        for col, v in values.items():
            assert torch.isnan(v[NO_TRUE_CLASS]).all(), f"{col} is defined without a true class: {v}"
    else:
        assert set(values) == set(expected), (sorted(values), sorted(expected))
        for col, v in values.items():
            assert torch.equal(~torch.isnan(v), expected[col]), f"{col}: defined {~torch.isnan(v)}, expected " \
                                                                f"{expected[col]} ({v})"
    if name in SEGMENTATION_ONLY:
        assert torch.isnan(values[name][U_NOSEG])
    # the masks of an image without segmentation are meaningless: filling them with garbage changes nothing
    gen = torch.Generator().manual_seed(9)
    class_masks, ignore = batch.class_masks.clone(), batch.ignore.clone()
    class_masks[U_NOSEG] = torch.rand(C, H, W, generator=gen) < 0.5
    ignore[U_NOSEG] = torch.rand(H, W, generator=gen) < 0.2
    garbage = replace(batch, class_masks=class_masks, ignore=ignore)
    again = score(name, model, garbage, masks, CLASSES)
    assert set(again) == set(values)
    for col in values:
        torch.testing.assert_close(again[col], values[col], rtol=0, atol=0, equal_nan=True, msg=col)


# ------------------------------------------------------------------------------------------------ (d)


@pytest.mark.parametrize("name", CONTRACT_METRICS)
def test_one_image_at_a_time_equals_the_batch(name, model, batch):
    """(d) Scoring the images one by one and concatenating equals scoring the batch (1e-5; NaN where NaN). A
    dict metric's cells depend on the batch (e.g. ``c<k>`` for the classes explained in it): a cell absent for a
    single image is NaN there, as the runner drops NaN cells."""
    masks = random_masks()
    full = score(name, model, batch, masks, CLASSES)
    singles = [score(name, model, batch.select([i]), masks[i : i + 1], CLASSES[i : i + 1]) for i in range(len(batch))]
    for i, single in enumerate(singles):
        check_shape_dtype_range(name, single, 1)
        assert set(single) <= set(full), (i, sorted(set(single) - set(full)))
    nan = torch.full((1,), math.nan)
    for col, v in full.items():
        stacked = torch.cat([s.get(col, nan) for s in singles])
        torch.testing.assert_close(stacked, v, rtol=1e-5, atol=1e-5, equal_nan=True, msg=col)


# ------------------------------------------------------------------------------------------------ (e)


def table_of(name: str) -> TableSpec:
    table = METRICS.get(name).table
    return next(t for t in table_specs() if t.name == table)


def metric_statistics(name: str, columns: list[str]) -> tuple[list[Statistic], list[Statistic]]:
    """The statistics of the metric's table that read only this metric's columns, and among them the ones the
    polarity must hold on strictly: the table's headline when it reads this metric, else all of them."""
    table = table_of(name)
    own = [s for s in table.stats
           if s.select(columns) and all(c == name or c.startswith(f"{name}/") for c in s.select(columns))]
    headline = [s for s in own if table.headline and s.name == table.headline[0]]
    return own, headline or own


def statistic(stat: Statistic, values: dict[str, Tensor]) -> float:
    """The table's point estimate of ``stat`` from per-image columns (as maskbench.core.stats.estimate)."""
    cols = stat.select(sorted(values))
    matrix = np.stack([values[c].double().numpy() for c in cols], 1)
    return float(stat.reduce(column_means(matrix, np.ones((1, len(matrix)))), cols)[0])


def better(a: float, b: float, higher_is_better: bool) -> bool:
    return a > b if higher_is_better else a < b


@pytest.mark.parametrize("name", CONTRACT_METRICS)
def test_ground_truth_beats_a_constant_mask(name, model, batch):
    """(e) On the polarity images (every class's evidence inside its ground truth), the ground-truth masks score
    strictly better than constant 0.5 masks in the metric's polarity, on the statistic the metric's table
    reports (for a scalar metric: its mean over images, ``higher_is_better`` as registered).

    Dict metrics store count cells (``pointing/constant``, ``maskcls/tp``, ...) on which a polarity per cell
    means nothing, and their tables reduce the cells to statistics (the pointing game's accuracy, mean over
    classes; the masked classifier's micro F-score; class masking's contrast); the polarity is tested on the
    table's headline statistic, which must read this metric and agree with its registered polarity, and on
    every other statistic of the table that reads only this metric and is defined for both mask sets (the
    constant masks' precision is 0 / 0 there: no class survives them). For a scalar metric, each image must
    also be at least as good with its ground truth."""
    spec = METRICS.get(name)
    if name in ABSENT_CLASS_METRICS:
        pytest.skip(f"{name}: the ground truth of an absent class is empty (see ABSENT_CLASS_METRICS)")
    if spec.curves:
        pytest.skip(f"{name}: curves for figures, no table statistic (their areas are the faithfulness metrics, "
                    f"checked against them in test_metrics_faithfulness.py)")
    sub = batch.select(POLARITY)
    classes = CLASSES[POLARITY]
    gt = score(name, model, sub, ground_truth_masks(sub, classes), classes)
    const = score(name, model, sub, torch.full((len(POLARITY), 2, H, W), 0.5), classes)
    assert set(gt) == set(const)
    own, strict = metric_statistics(name, sorted(gt))
    assert strict, f"no statistic of table {spec.table!r} reads the columns of {name}: {sorted(gt)}"
    table = table_of(name)
    if table.headline and strict[0].name == table.headline[0]:
        assert strict[0].higher_is_better == spec.higher_is_better, (name, strict[0].name)
    for stat in own:
        g, c = statistic(stat, gt), statistic(stat, const)
        if stat in strict:
            assert not math.isnan(g) and not math.isnan(c), (stat.name, g, c)
        if not (math.isnan(g) or math.isnan(c)):
            assert better(g, c, stat.higher_is_better), f"{stat.name}: ground truth {g}, constant {c} " \
                                                        f"(higher is better: {stat.higher_is_better})"
    if set(gt) == {name}:  # a scalar metric
        g, c = gt[name], const[name]
        ok = (g >= c) if spec.higher_is_better else (g <= c)
        assert ok.all(), f"{name} per image: ground truth {g}, constant {c}"
