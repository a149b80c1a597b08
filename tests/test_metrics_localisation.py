"""Localisation metrics (M_I of DGMP eq. 9, the EBP / TorchRay pointing game) on maps with known answers."""

import math

import pandas as pd
import pytest
import torch
from mb_testutils import make_batch

from maskbench.metrics import METRICS, MetricInputs
from maskbench.metrics.localisation import (
    TOLERANCE_224,
    acceptance_disc,
    all_boxes_difficult,
    average_precision,
    box_union_masks,
    difficult_pairs,
    m_i,
    pointing_game,
    pointing_ground_truth,
    tolerance_pixels,
)

NAN = float("nan")


def make(labels, h, w, boxes=None, seg=None, has_seg=None, ignore=None, num_classes=4):
    """A batch of H x W images. ``boxes[b]`` lists (class, [x0, y0, x1, y1], difficult) of image b."""
    n = len(labels)
    cm = torch.zeros(n, num_classes, h, w, dtype=torch.bool) if seg is None else seg
    batch = make_batch(labels, cm, ignore=ignore, images=torch.zeros(n, 3, h, w), num_classes=num_classes)
    batch.has_seg = torch.tensor(has_seg if has_seg is not None else [seg is not None] * n)
    boxes = boxes or [[] for _ in range(n)]
    batch.boxes = [torch.tensor([b[1] for b in bx], dtype=torch.float32).reshape(-1, 4) for bx in boxes]
    batch.box_labels = [torch.tensor([b[0] for b in bx], dtype=torch.long) for bx in boxes]
    batch.box_difficult = [torch.tensor([b[2] for b in bx], dtype=torch.bool) for bx in boxes]
    return batch


def peak(h, w, y, x):
    m = torch.zeros(h, w)
    m[y, x] = 1.0
    return m


def run(fn, batch, maps, classes):
    maps = torch.stack([torch.stack(list(m)) for m in maps])  # (B, K, H, W)
    return fn(MetricInputs(None, batch.images, maps, torch.tensor(classes), batch))


def is_nan(t):
    return bool(torch.isnan(t).all())


# ---------------------------------------------------------------- registry and rasters


def test_registered_with_polarity_table_and_label():
    mi, pg = METRICS.get("mi"), METRICS.get("pointing")
    assert (mi.higher_is_better, mi.table, mi.label) == (True, "explainability", "M_I")
    assert (pg.higher_is_better, pg.table, pg.label) == (True, "pointing", "Pointing")


def test_box_union_uses_pixel_centres_and_all_boxes():
    # pixel centres are at k + 0.5: [1, 0, 3, 2] covers columns 1..2 and rows 0..1; x in [0.6, 1.4] holds no
    # centre (0.5 and 1.5 are outside), so that thin box covers nothing
    batch = make(
        [[1, 2]],
        4,
        5,
        boxes=[[(1, [1, 0, 3, 2], False), (1, [0.6, 3.0, 1.4, 4.0], True), (2, [4, 3, 5, 4], True)]],
    )
    u = box_union_masks(batch, 4, 5)
    assert u.shape == (1, 4, 4, 5)
    want1 = torch.zeros(4, 5, dtype=torch.bool)
    want1[0:2, 1:3] = True  # the thin difficult box contains no pixel centre
    assert torch.equal(u[0, 1], want1)
    want2 = torch.zeros(4, 5, dtype=torch.bool)
    want2[3, 4] = True  # difficult boxes count in the union
    assert torch.equal(u[0, 2], want2)
    assert not u[0, 0].any() and not u[0, 3].any()
    assert all_boxes_difficult(batch).tolist() == [[False, False, True, False]]


def test_pointing_ground_truth_prefers_mask_minus_ignore():
    seg = torch.zeros(2, 4, 6, 6, dtype=torch.bool)
    seg[0, 1, 0:2, 0:2] = True
    ignore = torch.zeros(2, 6, 6, dtype=torch.bool)
    ignore[0, 0, 0] = True
    boxes = [[(1, [3, 3, 6, 6], False)], [(1, [3, 3, 6, 6], False)]]
    batch = make([[1], [1]], 6, 6, boxes=boxes, seg=seg, has_seg=[True, False], ignore=ignore)
    gt = pointing_ground_truth(batch)
    want0 = seg[0, 1].clone()
    want0[0, 0] = False
    assert torch.equal(gt[0, 1], want0)  # mask minus ignore, the box is not used
    want1 = torch.zeros(6, 6, dtype=torch.bool)
    want1[3:, 3:] = True
    assert torch.equal(gt[1, 1], want1)  # no segmentation: the box


# ---------------------------------------------------------------- pointing game


BOX = [50, 60, 70, 80]  # covers columns 50..69 and rows 60..79 at 224 px


@pytest.mark.parametrize(
    "y, x, hit",
    [
        (70, 69 + 14, 1.0),  # 14 px to the right of the box
        (70, 69 + 15, 0.0),  # exactly 15 px: strict <
        (70, 69 + 16, 0.0),
        (79 + 9, 69 + 11, 1.0),  # diagonal, d^2 = 81 + 121 = 202 < 225
        (79 + 9, 69 + 12, 0.0),  # diagonal, d = 15 exactly (Chebyshev distance would call it 12)
        (60 - 14, 55, 1.0),  # above the box
        (60 - 15, 55, 0.0),
        (70, 55, 1.0),  # inside
    ],
)
def test_tolerance_at_224_is_15px_strict(y, x, hit):
    batch = make([[0]], 224, 224, boxes=[[(0, BOX, False)]])
    out = run(pointing_game, batch, [[peak(224, 224, y, x)]], [[0]])
    assert out["c0"].item() == hit
    assert out["constant"].item() == 0 and out["tied"].item() == 0


def test_tolerance_scales_with_image_size():
    assert TOLERANCE_224 == 15 and tolerance_pixels(224) == 15
    assert tolerance_pixels(64) == pytest.approx(4.2857, abs=1e-4)
    batch = make([[0], [0]], 64, 64, boxes=[[(0, [10, 10, 20, 20], False)]] * 2)
    maps = [[peak(64, 64, 15, 19 + 4)], [peak(64, 64, 15, 19 + 5)]]
    out = run(pointing_game, batch, maps, [[0], [0]])
    assert out["c0"].tolist() == [1.0, 0.0]


@pytest.mark.filterwarnings("ignore:torch.meshgrid")
def test_agrees_with_torchray_on_random_points():
    pg = pytest.importorskip("torchray.benchmark.pointing_game")
    gen = torch.Generator().manual_seed(0)
    n = 24
    boxes, maps = [], []
    for _ in range(n):
        x0, y0 = torch.randint(0, 180, (2,), generator=gen).tolist()
        bw, bh = torch.randint(1, 40, (2,), generator=gen).tolist()
        boxes.append([(0, [x0, y0, x0 + bw, y0 + bh], False)])
        y = min(223, max(0, y0 + int(torch.randint(-25, 25 + bh, (1,), generator=gen))))
        x = min(223, max(0, x0 + int(torch.randint(-25, 25 + bw, (1,), generator=gen))))
        maps.append([peak(224, 224, y, x)])
    batch = make([[0]] * n, 224, 224, boxes=boxes)
    out = run(pointing_game, batch, maps, [[0]] * n)
    game = pg.PointingGame(num_classes=1, tolerance=15)
    gt = box_union_masks(batch, 224, 224)[:, 0]
    ref = []
    for b in range(n):
        idx = int(maps[b][0].argmax())
        ref.append(1.0 if game.evaluate(gt[b], (idx % 224, idx // 224)) == 1 else 0.0)
    assert out["c0"].tolist() == ref
    assert 0 < sum(ref) < n  # both outcomes are exercised


def test_constant_map_is_a_miss_and_counted():
    batch = make([[0]], 32, 32, boxes=[[(0, [0, 0, 32, 32], False)]])  # GT = the whole image
    out = run(pointing_game, batch, [[torch.full((32, 32), 0.5)]], [[0]])
    assert out["c0"].item() == 0.0  # Quantus would call this a hit
    assert out["constant"].item() == 1 and out["tied"].item() == 0


@pytest.mark.parametrize("inside, outside, hit", [(1, 1, 0.5), (1, 3, 0.25), (2, 0, 1.0), (0, 2, 0.0)])
def test_tied_maxima_score_the_expected_hit_whatever_their_order(inside, outside, hit):
    batch = make([[0]], 64, 64, boxes=[[(0, [40, 40, 50, 50], False)]])
    m = torch.zeros(64, 64)
    m[5, 5] = 0.5  # not a maximum: never counts
    for j in range(inside):
        m[45, 45 + j] = 1.0  # inside the box, late in row-major order
    for j in range(outside):
        m[2, 10 + 5 * j] = 1.0  # far away, first in row-major order (TorchRay's argmax would pick one of these)
    out = run(pointing_game, batch, [[m]], [[0]])
    assert out["c0"].item() == pytest.approx(hit)
    assert out["tied"].item() == (inside + outside > 1) and out["constant"].item() == 0


def test_acceptance_disc_is_the_strict_euclidean_disc():
    disc = acceptance_disc(15.0)
    assert disc.shape == (29, 29)  # 14 px is the farthest integer offset along an axis
    assert disc[14, 0] and disc[14, 28] and disc[0, 14] and not disc[0, 0]
    assert disc.sum().item() == sum(1 for dy in range(-14, 15) for dx in range(-14, 15) if dy * dy + dx * dx < 225)


def test_ground_truth_from_mask_when_segmented_else_boxes():
    seg = torch.zeros(2, 4, 64, 64, dtype=torch.bool)
    seg[:, 1, :10, :10] = True  # image 1 has no segmentation: its class_masks are ignored
    boxes = [[(1, [40, 40, 64, 64], False)]] * 2
    batch = make([[1], [1]], 64, 64, boxes=boxes, seg=seg, has_seg=[True, False])
    in_mask = peak(64, 64, 3, 3)
    out = run(pointing_game, batch, [[in_mask], [in_mask]], [[1], [1]])
    assert out["c1"].tolist() == [1.0, 0.0]
    in_box = peak(64, 64, 55, 55)
    out = run(pointing_game, batch, [[in_box], [in_box]], [[1], [1]])
    assert out["c1"].tolist() == [0.0, 1.0]


def test_all_difficult_classes_are_skipped_and_counted():
    boxes = [
        [
            (0, [0, 0, 10, 10], True),
            (0, [20, 20, 30, 30], True),
            (1, [0, 0, 10, 10], True),
            (1, [40, 40, 50, 50], False),
        ]
    ]
    batch = make([[0, 1]], 64, 64, boxes=boxes)
    maps = [[peak(64, 64, 5, 5), peak(64, 64, 5, 5)]]  # inside a difficult box of both classes
    out = run(pointing_game, batch, maps, [[0, 1]])
    assert is_nan(out["c0"]) and is_nan(out["d0"])  # all boxes of class 0 are difficult
    assert out["c1"].item() == 1.0  # class 1 has a non-difficult box; its difficult box is still GT
    assert out["skipped_difficult"].item() == 1 and out["no_gt"].item() == 0
    # segmented image whose class 0 has no pixel but all-difficult boxes: skipped as difficult, not as no-GT
    batch = make([[0]], 64, 64, boxes=[boxes[0][:2]], seg=torch.zeros(1, 4, 64, 64, dtype=torch.bool))
    out = run(pointing_game, batch, [maps[0][:1]], [[0]])
    assert is_nan(out["c0"])
    assert out["skipped_difficult"].item() == 1 and out["no_gt"].item() == 0


def test_empty_ground_truth_is_not_scored_and_counted():
    seg = torch.zeros(2, 4, 16, 16, dtype=torch.bool)
    seg[0, 0, :4, :4] = True
    batch = make([[0, 2], [2]], 16, 16, seg=seg, has_seg=[True, False])  # class 2 has no pixel and no box
    maps = [[peak(16, 16, 1, 1), peak(16, 16, 1, 1)], [peak(16, 16, 1, 1)] * 2]
    out = run(pointing_game, batch, maps, [[0, 2], [2, 2]])
    assert out["c0"][0].item() == 1.0 and is_nan(out["c0"][1])
    assert is_nan(out["c2"])
    assert out["no_gt"].tolist() == [1.0, 1.0]
    assert out["skipped_difficult"].tolist() == [0.0, 0.0]


def test_difficult_subset_small_object_with_a_distractor():
    # 64 x 64 images: a quarter is 1024 pixels
    boxes = [
        [(0, [0, 0, 31, 32], False), (1, [0, 0, 64, 40], False)],  # small class 0 (992 px) + big class 1
        [(0, [0, 0, 31, 32], False)],  # the same small object alone
        [(0, [0, 0, 32, 32], False), (1, [40, 40, 44, 44], False)],  # exactly 1/4: not "< 1/4"
    ]
    batch = make([[0, 1], [0], [0, 1]], 64, 64, boxes=boxes)
    flags = difficult_pairs(batch)
    assert flags[:, :2].tolist() == [[True, False], [False, False], [False, True]]
    maps = [[peak(64, 64, 5, 5), peak(64, 64, 5, 5)]] * 3
    out = run(pointing_game, batch, maps, [[0, 1], [0, 0], [0, 1]])
    assert out["c0"].tolist() == [1.0, 1.0, 1.0]
    assert out["d0"][0].item() == 1.0 and is_nan(out["d0"][1:])
    assert is_nan(out["d1"][:2]) and out["d1"][2].item() == 0.0  # the small class 1 box is missed


def test_difficult_area_uses_the_mask_when_the_class_has_no_box():
    seg = torch.zeros(3, 4, 64, 64, dtype=torch.bool)
    seg[:2, 0, :10, :10] = True  # small mask
    seg[2, 0, :40, :40] = True  # big mask (1600 of 4096 pixels)
    boxes = [[], [(0, [0, 0, 64, 64], False)], []]  # image 1: a whole-image box takes precedence
    batch = make([[0, 3]] * 3, 64, 64, boxes=boxes, seg=seg)
    assert difficult_pairs(batch)[:, 0].tolist() == [True, False, False]


def test_padded_and_false_slots_are_scored_once():
    batch = make([[0, 1], [1]], 32, 32, boxes=[[(0, [0, 0, 8, 8], False), (1, [20, 20, 30, 30], False)]] * 2)
    hit0, hit1, far = peak(32, 32, 2, 2), peak(32, 32, 25, 25), peak(32, 32, 0, 31)
    # image 0: slots 0, 1, then the padding repeats class 0 with a map that would hit class 1's box
    # image 1: class 0 is not a true class (its slot is not scored), then class 1, then padding
    out = run(pointing_game, batch, [[hit0, far, hit1], [hit0, hit1, far]], [[0, 1, 0], [0, 1, 0]])
    assert out["c0"][0].item() == 1.0 and is_nan(out["c0"][1])
    assert out["c1"].tolist() == [0.0, 1.0]
    assert set(out) == {"c0", "c1", "d0", "d1", "constant", "tied", "no_gt", "skipped_difficult"}


def test_counts_are_nan_without_a_true_class():
    batch = make([[0], [1]], 16, 16, boxes=[[(0, [0, 0, 4, 4], False)], [(1, [0, 0, 4, 4], False)]])
    out = run(pointing_game, batch, [[torch.zeros(16, 16)], [torch.zeros(16, 16)]], [[0], [0]])
    assert out["constant"][0].item() == 1.0 and is_nan(out["constant"][1])
    assert set(out) == {"c0", "d0", "constant", "tied", "no_gt", "skipped_difficult"}


def pointing_accuracy(cells):
    """The tables' pointing statistic (mean over classes of per-class means, in %) on {class: per-image cells}."""
    from maskbench.core.stats import class_mean, statistics_table

    recs = [("m", f"i{i}", f"pointing/c{c}", v) for c, vals in cells.items() for i, v in enumerate(vals)]
    rows = pd.DataFrame.from_records(recs, columns=["method", "image_id", "metric", "value"])
    stat = class_mean("pointing", "pointing/c", "All", True, scale=100.0)
    return statistics_table(rows, ["m"], [stat], {}, 50, 0)["value"].iloc[0] / 100


def test_pointing_accuracy_is_a_mean_over_classes():
    acc = pointing_accuracy({0: [1.0, 0.0, NAN, 1.0, 1.0], 1: [0.0, NAN], 2: [NAN]})
    assert acc == pytest.approx((3 / 4 + 0) / 2)
    assert math.isnan(pointing_accuracy({0: [NAN]}))


# ---------------------------------------------------------------- M_I


def ap_reference(scores, targets):
    """Slow eq. 9 with tie groups: one retrieval step per distinct score, highest first."""
    s, y = scores.double().tolist(), targets.bool().tolist()
    npos, ap, prev_recall = sum(y), 0.0, 0.0
    for t in sorted(set(s), reverse=True):
        retrieved = [yi for si, yi in zip(s, y, strict=True) if si >= t]
        precision, recall = sum(retrieved) / len(retrieved), sum(retrieved) / npos
        ap += precision * (recall - prev_recall)
        prev_recall = recall
    return ap


def test_mi_perfect_map_is_exactly_100():
    boxes = [[(0, [3, 2, 10, 9], False), (0, [20, 20, 25, 30], True), (2, [0, 0, 32, 5], False)]]
    batch = make([[0, 2]], 32, 32, boxes=boxes)
    u = box_union_masks(batch, 32, 32)[0].float()
    assert run(m_i, batch, [[u[0], u[2]]], [[0, 2]]).item() == 100.0


def test_mi_box_pixels_last():
    batch = make([[0]], 4, 4, boxes=[[(0, [0, 0, 2, 1], False)]])  # 2 of 16 pixels, the first two
    distinct = torch.arange(16, 0, -1, dtype=torch.float32).view(4, 4) / 16  # row-major decreasing
    distinct = distinct.flatten().roll(2).view(4, 4)  # the two box pixels get the two lowest scores
    # retrieved 15th and 16th: AP = (1/2) (1/15 + 2/16)
    assert run(m_i, batch, [[distinct]], [[0]]).item() == pytest.approx(100 * 0.5 * (1 / 15 + 2 / 16), abs=1e-5)
    tied = torch.ones(4, 4)
    tied[0, :2] = 0.0  # both box pixels tie for last: one step at 16 retrieved, P = 2/16
    assert run(m_i, batch, [[tied]], [[0]]).item() == pytest.approx(12.5, abs=1e-5)


@pytest.mark.parametrize("size, box, fraction", [(4, [0, 0, 2, 1], 2 / 16), (64, [0, 0, 16, 32], 512 / 4096)])
def test_mi_constant_map_scores_the_box_fraction(size, box, fraction):
    batch = make([[0]], size, size, boxes=[[(0, box, False)]])
    assert run(m_i, batch, [[torch.full((size, size), 0.3)]], [[0]]).item() == pytest.approx(100 * fraction)


def test_mi_ties_form_one_step_whatever_the_pixel_order():
    gen = torch.Generator().manual_seed(0)
    scores = (torch.rand(6, 400, generator=gen) * 4).floor() / 4  # five levels: many ties
    targets = torch.rand(6, 400, generator=gen) < 0.3
    ap = average_precision(scores, targets)
    ref = torch.tensor([ap_reference(s, t) for s, t in zip(scores, targets, strict=True)], dtype=torch.float64)
    assert torch.allclose(ap, ref, atol=1e-12)
    perm = torch.randperm(400, generator=gen)
    assert torch.allclose(average_precision(scores[:, perm], targets[:, perm]), ap, atol=1e-12)
    # breaking the ties in pixel order would give another value: the test can tell the conventions apart
    broken = scores - torch.arange(400) * 1e-6
    assert not torch.allclose(average_precision(broken, targets), ap, atol=1e-4)
    skm = pytest.importorskip("sklearn.metrics")
    sk = [skm.average_precision_score(t.numpy(), s.numpy()) for s, t in zip(scores, targets, strict=True)]
    assert torch.allclose(ap, torch.tensor(sk, dtype=torch.float64), atol=1e-12)


def test_mi_uses_boxes_even_with_a_segmentation_and_ignores_classes_without_boxes():
    seg = torch.zeros(2, 4, 16, 16, dtype=torch.bool)
    seg[:, 0, 8:, 8:] = True  # a mask elsewhere than the box
    boxes = [[(0, [0, 0, 4, 4], False)], []]
    batch = make([[0, 1], [0]], 16, 16, boxes=boxes, seg=seg)
    box_map = box_union_masks(batch, 16, 16)[0, 0].float()
    other = torch.rand(16, 16, generator=torch.Generator().manual_seed(1))  # class 1 has no box: not scored
    out = run(m_i, batch, [[box_map, other], [box_map, box_map]], [[0, 1], [0, 0]])
    assert out[0].item() == 100.0
    assert math.isnan(out[1].item())  # no class with boxes


def test_mi_mean_over_classes_and_padded_slots_once():
    boxes = [[(0, [0, 0, 8, 8], False), (1, [0, 0, 16, 4], False)]]
    batch = make([[0, 1]], 16, 16, boxes=boxes)
    u = box_union_masks(batch, 16, 16)[0].float()
    const = torch.full((16, 16), 0.5)
    # class 0 perfect (100), class 1 constant (100 * 64 / 256 = 25); the padded copy of class 0 is ignored
    out = run(m_i, batch, [[u[0], const, const]], [[0, 1, 0]])
    assert out.item() == pytest.approx((100 + 25) / 2)
    out = run(m_i, batch, [[u[0], const, const]], [[0, 1, 3]])  # class 3 is not a true class
    assert out.item() == pytest.approx((100 + 25) / 2)


def test_mi_float16_ties_match_reference():
    gen = torch.Generator().manual_seed(2)
    boxes = [[(0, [5, 5, 20, 14], False), (0, [12, 10, 30, 31], False)]]
    batch = make([[0]], 32, 32, boxes=boxes)
    m = torch.rand(32, 32, generator=gen).half().float() ** 4  # float16 cache: ties among small values
    u = box_union_masks(batch, 32, 32)[0, 0]
    ref = 100 * ap_reference(m.flatten(), u.flatten())
    assert run(m_i, batch, [[m]], [[0]]).item() == pytest.approx(ref, abs=1e-4)
