"""The class-leakage probe (benchmark/leakage.py) on masks whose class information is known by construction."""

import numpy as np
import pytest
import torch

from maskbench.benchmark import leakage as lk


def _maps(n: int, kind: str, size: int = 32) -> tuple[dict, dict, list[str]]:
    """n images, image i of class i % 2; the map of class 0 is bright on the left half, class 1 on the right
    (``kind="shape"``: the hole tells the class), or constant (``"constant"``: random tie order, no class)."""
    ids = [f"im{i:03d}" for i in range(n)]
    maps, labels = {}, {}
    for i, iid in enumerate(ids):
        c = i % 2
        m = np.zeros((1, size, size), np.float32)
        if kind == "shape":
            m[0, :, : size // 2] = 1.0 if c == 0 else 0.0
            m[0, :, size // 2 :] = 1.0 if c == 1 else 0.0
            m[0] += np.random.default_rng(i).uniform(0, 0.5, (size, size)).astype(np.float32)  # order inside
            m /= m.max()
        else:
            m[:] = 0.5
        maps[iid] = (np.array([c]), m)
        labels[iid] = torch.tensor([1.0 if c == 0 else 0.0, 1.0 if c == 1 else 0.0])
    return maps, labels, ids


def test_removal_masks_are_the_top_fraction_of_the_map_per_true_class():
    maps, labels, ids = _maps(4, "shape")
    ex = lk.examples(maps, labels, ids)
    assert len(ex.image) == 4 * len(lk.FRACTIONS)
    for row in range(len(ex.image)):
        removed, c, f = ex.full[row], int(ex.target[row]), float(ex.fraction[row])
        assert int(removed.sum()) == round(f * removed.numel())
        half = removed[:, :16] if c == 0 else removed[:, 16:]
        assert bool(half.sum() == removed.sum())  # fractions <= 0.5: the whole hole in the class's half


def test_mask_only_probe_reads_a_class_shaped_hole_and_not_a_random_one():
    shape, labels, ids = _maps(48, "shape")
    const, _, _ = _maps(48, "constant")
    images = torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rows = lk.leakage_rows({"shape": shape, "constant": const}, images, labels, ids, 2, substrates=())[0]
    s = lk.summarise(rows, resamples=200)
    mask = s[s["probe"] == "mask"].set_index("method")
    assert mask.loc["shape", "accuracy"] == 100.0  # left hole = class 0, right hole = class 1: separable
    fold = lk.folds(ids)  # the majority rate: the training fold's most frequent class, on the held-out fold
    cls = {iid: i % 2 for i, iid in enumerate(ids)}
    want = []
    for k in (0, 1):
        train = [cls[i] for i in ids if fold[i] != k]
        top = int(np.bincount(train, minlength=2).argmax())
        want += [100.0 * (cls[i] == top) for i in ids if fold[i] == k]
    assert mask.loc["shape", "majority"] == pytest.approx(float(np.mean(want)), abs=1e-9)
    assert mask.loc["shape", "excess"] == pytest.approx(100.0 - float(np.mean(want)), abs=1e-9)
    assert abs(mask.loc["constant", "excess"]) < 25.0  # a hole drawn at random carries no class: about chance


def test_the_zero_substrate_shows_its_hole_and_detection_is_scored_out_of_fold():
    shape, labels, ids = _maps(16, "shape")
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)) + 1.0  # never 0: holes visible
    rows, det = lk.leakage_rows({"shape": shape}, images, labels, ids, 2, substrates=("zero",))
    assert det.set_index("substrate").loc["zero", "auroc"] > 0.99  # zeros in an image of values >= 1
    zero = lk.summarise(rows, resamples=200).set_index("probe").loc["zero"]
    assert zero["accuracy"] > 90.0  # the recovered hole still tells the class


def test_substrates_fill_only_the_removed_pixels():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    removed = torch.zeros(2, 16, 16, dtype=torch.bool)
    removed[:, 4:8, 4:8] = True
    for name in lk.SUBSTRATES:
        out = lk.substrate(name, images, removed, [0, 1])
        assert torch.equal(out[:, :, ~removed[0]], images[:, :, ~removed[0]]), name
        assert not torch.equal(out[:, :, removed[0]], images[:, :, removed[0]]), name
    with pytest.raises(ValueError, match="valid: zero, blur, road"):
        lk.substrate("mean", images, removed, [0, 1])
