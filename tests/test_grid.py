"""The DiFull grid (Rao, Böhle & Schiele, CVPR 2022): ``synthetic-grid``, ``grid-smallcnn`` and the ``grid`` table,
with answers known by construction.

* the metrics: a map that is its class's own cell scores grid share 100 and pointing 100, a map only in other
  cells 0, a uniform map 25; the pointing game's tolerance lets the centre Gaussian hit every cell (100), the
  strict cell pointing gives it 25;
* the classifier: its logits are ``smallcnn``'s on each cell, exactly unchanged when other cells change, with a
  gradient exactly 0 outside the cell; its layers are the cells' maps re-tiled; it is the synthetic run's classifier
  (found, not trained);
* the data set: every grid is its four scenes (pixels, labels, whole-cell masks and boxes), no class in two cells,
  each scene once, deterministic seeded ids, a fingerprint that follows the files;
* end to end through the CLI on a few grids: the ``grid`` table (ground truth 100, gradient 100, constant 25,
  Grad-CAM in range), no grid table on a ``synthetic`` run, and the learned methods trained a couple of steps
  against the grid classifier.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from mb_testutils import registries_restored
from PIL import Image

from maskbench.benchmark.cli import main
from maskbench.benchmark.config import DEFAULT_MODELS, DEFAULT_TABLE_CLASSES
from maskbench.classifiers import SHIPPED_DIR, SmallCNN, freeze, get_classifier
from maskbench.classifiers.grid import GridClassifier, grid_checkpoint_sha256, split_cells, tile_cells
from maskbench.core.errors import InvalidOptionError, MaskbenchError
from maskbench.core.storage import file_sha256
from maskbench.datasets import build_dataset, collate, generate_synthetic
from maskbench.datasets.grid import CELLS, cell_box, group_scenes, pack_disjoint, scene_label_sets
from maskbench.methods import METHODS, AttributionMethod, register_method
from maskbench.methods.reference import CentreGaussian
from maskbench.metrics import METRICS, MetricInputs
from maskbench.metrics.localisation import tolerance_pixels

SCENE = 32  # the fixture's scene side: 64 px grids
C = 6  # synthetic classes
CPU = torch.device("cpu")
SHIPPED = next(SHIPPED_DIR.glob("smallcnn-*.pt"))  # the default run's classifier


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Synthetic scenes at 32 px: 6 / 2 / 6 train / val / test grids with pairwise disjoint classes."""
    return generate_synthetic(tmp_path_factory.mktemp("grid-scenes") / "synthetic", n_train=40, n_val=16, n_test=40,
                              image_size=SCENE, seed=5)


def grids(root: Path, split: str = "test", **options):
    return build_dataset("synthetic-grid", root=root, split=split, **options)


def cell_region(k: int, size: int = SCENE) -> torch.Tensor:
    x0, y0, x1, y1 = cell_box(k, size)
    out = torch.zeros(2 * size, 2 * size, dtype=torch.bool)
    out[y0:y1, x0:x1] = True
    return out


# ------------------------------------------------------------------------------------------------ the metrics


def true_classes(labels: torch.Tensor) -> torch.Tensor:
    """(B, K): each image's true classes, padded by repeating the first (as the runner explains them)."""
    rows = [torch.nonzero(lab > 0).flatten().tolist() for lab in labels]
    k = max(len(r) for r in rows)
    return torch.tensor([r + [r[0]] * (k - len(r)) for r in rows])


def score(name: str, batch, masks: torch.Tensor, classes: torch.Tensor):
    return METRICS.get(name).fn(MetricInputs(None, batch.images, masks, classes, batch))


@pytest.fixture(scope="module")
def batch(scenes):
    ds = grids(scenes)
    return collate([ds[i] for i in range(4)])


def own_cells(classes: torch.Tensor, size: int = SCENE) -> torch.Tensor:
    """(B, K, H, W) maps: 1 on the cell of each map's class, 0 elsewhere."""
    return torch.stack([torch.stack([cell_region(int(c) // C, size) for c in row]) for row in classes]).float()


def test_grid_share_and_pointing_known_answers(batch):
    classes = true_classes(batch.labels)
    own = own_cells(classes)
    b, k, h, w = own.shape
    far = torch.zeros_like(own)  # one pixel at the far corner of the diagonally opposite cell
    for i in range(b):
        for j in range(k):
            cell = int(classes[i, j]) // C
            far[i, j, (h - 1) * (cell < 2), (w - 1) * (cell % 2 == 0)] = 1.0
    centre = CentreGaussian().explain(None, batch.images, classes)
    answers = {  # map -> (grid share, strict cell pointing, pointing game)
        "own cell": (own, 100.0, 100.0, 1.0),
        "other cells": (1 - own, 0.0, 0.0, None),
        "uniform": (torch.full_like(own, 0.5), 25.0, 0.0, 0.0),  # a constant map has no maximum: a miss
        "far corner": (far, 0.0, 0.0, 0.0),
        "centre Gaussian": (centre, 25.0, 25.0, 1.0),  # its 4 tied maxima at the centre: one per cell
    }
    for what, (masks, share, cell_pointing, pointing) in answers.items():
        got = score("grid_share", batch, masks, classes)
        torch.testing.assert_close(got, torch.full((b,), share), rtol=0, atol=1e-4, msg=what)
        got = score("grid_pointing", batch, masks, classes)
        torch.testing.assert_close(got, torch.full((b,), cell_pointing), rtol=0, atol=1e-4, msg=what)
        cells = score("pointing", batch, masks, classes)
        hits = torch.cat([v[~torch.isnan(v)] for key, v in cells.items() if re.fullmatch(r"c\d+", key)])
        if pointing is not None:
            assert torch.equal(hits, torch.full_like(hits, pointing)), (what, hits)
        else:  # the pointing game's tolerance: the other cells' maxima next to the cell's border hit
            assert tolerance_pixels(h) > 4 and (hits > 0).all() and (hits < 0.5).all(), hits


def test_undefined_is_nan_never_zero(batch):
    classes = true_classes(batch.labels)
    zero = torch.zeros(len(batch), classes.shape[1], 2 * SCENE, 2 * SCENE)
    assert torch.isnan(score("grid_share", batch, zero, classes)).all()  # no positive mass: 0 / 0
    one_empty = own_cells(classes)
    one_empty[:, 0] = 0  # the first class's map is empty: left out of the image's mean, the others count
    torch.testing.assert_close(score("grid_share", batch, one_empty, classes), torch.full((len(batch),), 100.0))
    absent = (batch.labels == 0).float().argmax(1)[:, None]  # a class no image contains
    for name in ("grid_share", "grid_pointing"):
        assert torch.isnan(score(name, batch, own_cells(absent), absent)).all(), name


def test_scored_only_where_the_ground_truth_is_guaranteed():
    for name in ("grid_share", "grid_pointing"):
        spec = METRICS.get(name)
        assert spec.applies("synthetic-grid") and spec.table == "grid" and spec.higher_is_better
        assert not any(spec.applies(d) for d in ("synthetic", "synthetic-coco", "voc", "coco", "imagenet"))
    assert METRICS.get("pointing").applies("synthetic") and METRICS.get("pointing").applies("synthetic-grid")


# ------------------------------------------------------------------------------------------------ the classifier


@pytest.fixture(scope="module")
def model() -> GridClassifier:
    """A grid classifier of a random SmallCNN (non-trivial BatchNorm statistics), and its base."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = SmallCNN(C)
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    freeze(base)
    return freeze(GridClassifier(base))


def grid_images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 2 * SCENE, 2 * SCENE, generator=torch.Generator().manual_seed(seed))


def base_of(model: GridClassifier) -> SmallCNN:
    base = SmallCNN(C)
    base.blocks = torch.nn.Sequential(*(stage.block for stage in model.stages))
    base.head, base.dropout = model.head, model.dropout
    return freeze(base)


def test_logits_are_smallcnn_on_each_cell(model):
    x = grid_images()
    base = base_of(model)
    with torch.no_grad():
        out = model(x)
        cells = torch.stack([x[:, :, cell_region(k)].reshape(2, 3, SCENE, SCENE) for k in range(len(CELLS))], 1)
        assert torch.equal(split_cells(x), cells.flatten(0, 1))  # image-major, cells tl, tr, bl, br
        assert torch.equal(tile_cells(split_cells(x)), x)
        assert out.shape == (2, len(CELLS) * C) and model.num_classes == len(CELLS) * C
        assert torch.equal(out, base(cells.flatten(0, 1)).reshape(2, -1))  # logit (k, c) at index k * C + c
        for i in range(2):  # each cell image alone (another batch size: equal to float rounding)
            for k in range(len(CELLS)):
                torch.testing.assert_close(out[i, k * C : (k + 1) * C], base(cells[i, k][None])[0], rtol=0,
                                           atol=1e-5)


def test_other_cells_change_nothing_exactly(model):
    x = grid_images(seed=1)
    with torch.no_grad():
        out = model(x)
        for k in range(len(CELLS)):
            inside = cell_region(k)
            changed = torch.where(inside, x, 5 * grid_images(seed=10 + k))
            again = model(changed)
            assert torch.equal(again[:, k * C : (k + 1) * C], out[:, k * C : (k + 1) * C]), k
            assert not torch.equal(again, out)  # the other cells' logits did change


def test_gradient_outside_the_cell_is_exactly_zero(model):
    x = grid_images(seed=2).requires_grad_(True)
    for k in range(len(CELLS)):
        for c in (0, C - 1):
            (grad,) = torch.autograd.grad(model(x)[:, k * C + c].sum(), x)
            inside = cell_region(k)
            assert torch.count_nonzero(grad[:, :, ~inside]) == 0, (k, c)
            assert torch.count_nonzero(grad[:, :, inside]) > 0, (k, c)


def test_layers_are_the_cells_maps_retiled(model):
    """Every feature layer (and the CAM layer, the last one) outputs one map of the grid: (B, ch, 2h, 2w), cell k's
    map of the base network in cell k's quarter."""
    x = grid_images(seed=3)
    seen = {}
    layers = {**{i: layer for i, layer in enumerate(model.feature_layers)}, "cam": model.cam_layer}
    handles = [layer.register_forward_hook(lambda m, i, o, key=key: seen.__setitem__(key, o))
               for key, layer in layers.items()]
    with torch.no_grad():
        model(x)
        for h in handles:
            h.remove()
        f = split_cells(x)
        for i, stage in enumerate(model.stages):
            f = stage.block(f)
            assert torch.equal(seen[i], tile_cells(f)), i
    assert seen["cam"] is seen[len(model.stages) - 1]
    assert seen["cam"].shape == (2, 64, 2 * (SCENE // 8), 2 * (SCENE // 8))


@pytest.mark.parametrize("method", ["gradcam", "gradient"])
def test_gradient_methods_run_on_the_grid_classifier(model, method):
    x = grid_images(seed=4)
    classes = torch.tensor([[0, C + 1], [3 * C, 2 * C + 2]])
    maps = METHODS.get(method)().explain(model, x, classes)
    assert maps.shape == (2, 2, 2 * SCENE, 2 * SCENE) and maps.min() >= 0 and maps.max() <= 1
    if method == "gradient":  # exactly 0 outside the class's cell
        for i in range(2):
            for j in range(2):
                assert torch.count_nonzero(maps[i, j][~cell_region(int(classes[i, j]) // C)]) == 0


def test_it_is_the_synthetic_runs_classifier_found_not_trained(scenes, tmp_path):
    """grid-smallcnn looks its base up exactly as a ``synthetic`` run does (same key: the base train split's
    fingerprint), so it gets the classifier that run trained and cached, and trains nothing itself; its identity
    derives from the base checkpoint's hash."""
    params = {"epochs": 1}  # a one-epoch recipe: quick to train for the synthetic run below

    def synthetic(split):
        return build_dataset("synthetic", root=scenes, split=split)

    def grid(split):
        return grids(scenes, split)

    base, base_info = get_classifier("smallcnn", synthetic, synthetic("train").fingerprint(), C, CPU, tmp_path,
                                     progress=False, params=params)
    assert base_info["trained_here"]
    model, info = get_classifier("grid-smallcnn", grid, grid("train").fingerprint(), len(CELLS) * C, CPU, tmp_path,
                                 progress=False, params=params)
    assert isinstance(model, GridClassifier) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert info["base"]["checkpoint"] == base_info["checkpoint"] and not info["base"]["trained_here"]
    assert not info["trained_here"] and info["model"] == "grid-smallcnn"
    assert info["checkpoint_sha256"] == grid_checkpoint_sha256(base_info["checkpoint_sha256"])
    assert info["checkpoint_sha256"] != base_info["checkpoint_sha256"] and len(info["checkpoint_sha256"]) == 16
    for key, value in base.state_dict().items():  # the same weights, in the cells
        name = key.replace("blocks.", "stages.").split(".", 2)
        name = f"stages.{name[1]}.block.{name[2]}" if key.startswith("blocks.") else key
        assert torch.equal(model.state_dict()[name], value), key
    assert 0 <= info["test_map"] <= 1
    # --checkpoint: the given smallcnn checkpoint, loaded
    _, shipped = get_classifier("grid-smallcnn", grid, "external", len(CELLS) * C, CPU, tmp_path, SHIPPED,
                                progress=False)
    assert shipped["checkpoint_sha256"] == grid_checkpoint_sha256(file_sha256(SHIPPED))
    assert not shipped["base"]["trained_here"]
    with pytest.raises(MaskbenchError, match="grid"):
        get_classifier("grid-smallcnn", synthetic, "x", C, CPU, tmp_path, SHIPPED, progress=False)


# ------------------------------------------------------------------------------------------------ the data set


def test_every_grid_is_its_four_scenes(scenes):
    for split in ("train", "val", "test"):
        ds = grids(scenes, split)
        base = build_dataset("synthetic", root=scenes, split=split, image_size=SCENE)
        assert ds.classes == [f"{cell}:{c}" for cell in CELLS for c in base.classes]
        assert ds.num_classes == len(CELLS) * C and ds.image_size == 2 * SCENE
        for image_id in ds.image_ids:
            sample = ds.load(image_id)
            members = ds.scenes(image_id)
            assert image_id == "-".join(members) and len(members) == len(CELLS)
            assert sample.image.shape == (3, 2 * SCENE, 2 * SCENE) and not sample.ignore.any()
            boxes = {(int(lab), tuple(box.tolist())) for lab, box in zip(sample.box_labels, sample.boxes, strict=True)}
            assert not sample.box_difficult.any()
            for k, scene_id in enumerate(members):
                scene = base.load(scene_id)
                region = cell_region(k)
                assert torch.equal(sample.image[:, region], scene.image.flatten(1))  # the pixels, not resampled
                assert torch.equal(sample.label[k * C : (k + 1) * C], scene.label)
                for c in range(C):
                    mask = sample.class_masks[k * C + c]
                    if scene.label[c]:  # the whole cell, and the cell's box
                        assert torch.equal(mask, region) and (k * C + c, cell_box(k, SCENE)) in boxes
                    else:
                        assert not mask.any()
            assert len(boxes) == int(sample.label.sum())


def test_no_class_in_two_cells_and_each_scene_at_most_once(scenes):
    used: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        ds = grids(scenes, split)
        base = build_dataset("synthetic", root=scenes, split=split)
        labels = dict(zip(base.image_ids, scene_label_sets(base), strict=True))
        members = [s for image_id in ds.image_ids for s in ds.scenes(image_id)]
        assert len(members) == len(set(members)) and set(members) <= set(base.image_ids)
        assert ds.left_out == len(base) - len(members) > 0  # the guarantee costs scenes
        for image_id in ds.image_ids:
            sets = [labels[s] for s in ds.scenes(image_id)]
            assert sum(len(s) for s in sets) == len(set().union(*sets)), (image_id, sets)  # pairwise disjoint
            assert (ds.load(image_id).label.view(len(CELLS), C).sum(0) <= 1).all()  # each class in one cell at most
        used[split] = set(members)
    assert not (used["train"] & used["val"]) and not ((used["train"] | used["val"]) & used["test"])
    everything = grids(scenes, "test", distinct_classes=False)  # without the guarantee: every scene, 4 by 4
    assert len(everything) == 40 // len(CELLS) and everything.left_out == 0


def test_ids_are_deterministic_and_seeded(scenes):
    first, again = grids(scenes, "train"), grids(scenes, "train")
    assert first.image_ids == again.image_ids == sorted(first.image_ids)
    assert torch.equal(first[0].image, again[0].image)
    other = grids(scenes, "train", grid_seed=1)
    assert other.image_ids != first.image_ids and len(other) == len(first)  # another draw, as many grids
    trainval = grids(scenes, "trainval")
    assert trainval.image_ids == first.image_ids + grids(scenes, "val").image_ids
    labels = [frozenset({0}), frozenset({1}), frozenset({2, 3}), frozenset({4, 5}), frozenset({0, 1})]
    ids = ["a", "b", "c", "d", "e"]
    assert group_scenes(ids, labels, 0) == group_scenes(ids[::-1], labels[::-1], 0)  # not the order given
    assert [sorted(g) for g in group_scenes(ids, labels, 0)] == [["a", "b", "c", "d"]]


def test_packing_reaches_the_documented_optimum():
    """The default synthetic test split's label sets (by count): 30 grids, the integer-programming optimum (and
    the module docstring's number); every pattern pairwise disjoint."""
    counts = {(0,): 14, (1,): 12, (2,): 14, (3,): 14, (4,): 7, (5,): 4, (0, 1): 4, (0, 2): 7, (0, 3): 3, (0, 4): 3,
              (0, 5): 2, (1, 2): 6, (1, 3): 6, (1, 4): 1, (1, 5): 1, (2, 3): 5, (2, 4): 1, (2, 5): 1, (3, 4): 1,
              (4, 5): 39, (0, 1, 2): 4, (0, 1, 3): 1, (0, 2, 5): 2, (0, 3, 4): 1, (0, 4, 5): 6, (1, 2, 3): 2,
              (1, 2, 4): 2, (1, 2, 5): 2, (1, 3, 4): 2, (1, 4, 5): 8, (2, 4, 5): 12, (3, 4, 5): 13}
    sets = [frozenset(t) for t, n in counts.items() for _ in range(n)]
    patterns = pack_disjoint(sets)
    assert len(patterns) == 30
    assert all(sum(map(len, p)) == len(frozenset().union(*p)) for p in patterns)
    assert not Counter(t for p in patterns for t in p) - Counter(sets)  # never more scenes than there are


def test_fingerprint_follows_the_files(scenes, tmp_path):
    root = Path(shutil.copytree(scenes, tmp_path / "copy"))
    memo = tmp_path / "memo"
    before = grids(root)
    key = before.fingerprint(memo)
    assert key != build_dataset("synthetic", root=root, split="test").fingerprint(memo)
    scene = before.scenes(before.image_ids[0])[0]
    jpeg = root / "VOCdevkit" / "VOC2007" / "JPEGImages" / f"{scene}.jpg"
    with Image.open(jpeg) as im:
        im.convert("RGB").save(jpeg, quality=60)  # the same scene, other bytes
    after = grids(root)
    assert after.image_ids == before.image_ids and after.fingerprint(memo) != key
    assert grids(root, grid_seed=1).fingerprint(memo) != after.fingerprint(memo)


def test_image_size_is_the_grids_side(scenes):
    ds = grids(scenes, image_size=48)
    sample = ds[0]
    assert ds.image_size == ds.cell_size * 2 == 48 and sample.image.shape == (3, 48, 48)
    assert sample.class_masks.shape == (len(CELLS) * C, 48, 48) and sample.boxes.max() <= 48
    for bad in (47, 30):
        with pytest.raises(InvalidOptionError, match="even"):
            grids(scenes, image_size=bad)


# ------------------------------------------------------------------------------------------------ end to end


class OtherCells(AttributionMethod):
    """1 everywhere but the requested class's ground truth (for a true class on the grid: its other cells).
    Registered only inside :func:`test_bench_through_the_cli`."""

    family = "plugin"
    uses_ground_truth = True

    def explain(self, model, images, classes, *, batch=None):
        idx = classes[:, :, None, None].expand(-1, -1, *images.shape[-2:])
        return 1 - torch.gather(batch.class_masks.to(images.device), 1, idx.to(images.device)).float()


def run_folder(results: Path, dataset: str) -> Path:
    (folder,) = [p for p in (results / dataset).iterdir() if p.is_dir()]
    return folder


def table(folder: Path, name: str) -> pd.Series:
    t = pd.read_csv(folder / f"{name}.csv")
    return t.set_index(["statistic", "method"])["value"]


def test_bench_through_the_cli(scenes, tmp_path):
    """A short bench on 4 grids with the shipped classifier: the grid table's known answers."""
    methods = ["ground-truth", "constant-0.5", "centre-gaussian", "gradient", "gradcam", "test-grid-other-cells"]
    results = tmp_path / "results"
    with registries_restored(METHODS):
        register_method("test-grid-other-cells")(OtherCells)
        code = main(["bench", "--dataset", "synthetic-grid", "--data-root", str(scenes), "--cache",
                     str(tmp_path / "cache"), "--results", str(results), "--no-progress", "--limit", "4",
                     "--batch-size", "4", "--checkpoint", str(SHIPPED), "--methods", ",".join(methods)])
    assert code == 0
    folder = run_folder(results, "synthetic-grid")
    assert (folder / "grid.csv").is_file() and (folder / "grid.tex").is_file()
    grid = table(folder, "grid")
    images = pd.read_csv(folder / "grid.csv").set_index(["statistic", "method"])["images"]
    assert (images == 4).all()
    share = grid["grid_share"]
    assert share["ground-truth"] == 100 and share["gradient"] == 100  # a zero gradient outside the cell
    assert share["test-grid-other-cells"] == 0
    assert share["constant-0.5"] == pytest.approx(25) and share["centre-gaussian"] == pytest.approx(25, abs=1e-3)
    assert 0 <= share["gradcam"] <= 100
    pointing = grid["grid_pointing"]
    assert pointing["ground-truth"] == 100 and pointing["test-grid-other-cells"] == 0
    assert pointing["centre-gaussian"] == pytest.approx(25) and pointing["constant-0.5"] == 0
    game = table(folder, "pointing")["pointing"]  # the pointing game on cells (with its tolerance)
    assert game["ground-truth"] == 100 and game["centre-gaussian"] == 100 and game["test-grid-other-cells"] < 50
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["config"]["model"] == DEFAULT_MODELS["synthetic-grid"] == "grid-smallcnn"
    assert manifest["classifier"]["checkpoint_sha256"] == grid_checkpoint_sha256(file_sha256(SHIPPED))
    classes = manifest["dataset"]["classes"]
    assert [classes[i] for i in manifest["dataset"]["table_classes"]] == DEFAULT_TABLE_CLASSES["synthetic-grid"]
    assert {"grid_share", "grid_pointing", "pointing", "classmask"} <= set(manifest["metrics"])
    leaderboard = pd.read_csv(folder / "leaderboard.csv")
    assert "grid_share" in set(leaderboard["statistic"])


def test_no_grid_table_on_a_synthetic_run(scenes, tmp_path):
    results = tmp_path / "results"
    assert main(["bench", "--data-root", str(scenes), "--cache", str(tmp_path / "cache"), "--results", str(results),
                 "--no-progress", "--limit", "2", "--checkpoint", str(SHIPPED), "--methods", "centre-gaussian"]) == 0
    folder = run_folder(results, "synthetic")
    assert (folder / "pointing.csv").is_file() and not (folder / "grid.csv").is_file()
    rows = pd.read_csv(folder / "per_image" / "centre-gaussian.csv")
    assert not rows["metric"].str.startswith("grid").any()
    assert "grid_share" not in json.loads((folder / "manifest.json").read_text())["metrics"]


def test_learned_methods_train_against_the_grid_classifier(scenes, tmp_path):
    """The learned methods train (two steps) on the grid's train split against grid-smallcnn, DGMP reading its
    re-tiled feature maps, and explain the grid through the normal runner."""
    learned = ["explainer", "rtis", "dgmp-bf", "dgmp-cf", "dgmp-cf-ft"]
    results = tmp_path / "results"
    assert main(["bench", "--dataset", "synthetic-grid", "--data-root", str(scenes), "--cache", str(tmp_path / "cache"),
                 "--results", str(results), "--no-progress", "--limit", "2", "--checkpoint", str(SHIPPED),
                 "--table-classes", "tl:disc", "--methods", ",".join(learned), "--param", "max_steps=2",
                 "--param", "batch_size=4", "--param", "filter_images=8", "--param", "ft_points=4"]) == 0
    folder = run_folder(results, "synthetic-grid")
    manifest = json.loads((folder / "manifest.json").read_text())
    setups = {m["method"]: m["setup"] for m in manifest["methods"]}
    assert all(setups[m]["steps"] == 2 for m in learned), setups
    assert setups["dgmp-bf"]["filter_steps"] == 2
    share = table(folder, "grid")["grid_share"]
    assert set(share.index) == set(learned)
    assert all(0 <= v <= 100 for v in share) and not any(math.isnan(v) for v in share)
