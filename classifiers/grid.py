"""``grid-smallcnn``: the synthetic set's ``smallcnn`` run on each cell of a 2 x 2 grid separately (DiFull).

After Rao, Böhle & Schiele, "Towards Better Understanding Attribution Methods", CVPR 2022, Sec. 3 ("DiFull"):
the classifier of a grid image is *disconnected*: every cell goes through the network on its own, so the output
for a cell is a function of that cell's pixels only, and an attribution outside the cell is wrong by
construction. Here the network is the ``smallcnn`` of the default run, the same checkpoint (the shipped one,
found by :func:`~maskbench.classifiers.base.get_classifier` for data set ``synthetic`` exactly as the default run
finds it; trained there only where the default run would train it too), and nothing is trained for the grid.

For a grid image x (B, 3, 2S, 2S) with cells tl, tr, bl, br (:data:`~maskbench.datasets.grid.CELLS`):

    logit(cell k, class c) = smallcnn(cell k of x)[c],     output index k * C + c,

so the 4 x C logits are exactly the base network's logits of the four cell images (the cells are run as one batch
of 4B images; every layer sees only its cell: each convolution zero-pads at the cell's border as at an image's
border, the pooling and the head are per cell). Hence the logit of (k, c) does not change when any pixel outside
cell k changes, and its gradient there is exactly 0 (``tests/test_grid.py`` checks both exactly).

What the methods read (the classifier contract: ``cam_layer``, ``feature_layers``)
-------------------------------------------------------------------------------
Each stage of the base network (its four conv blocks) is wrapped in a module that cuts its input into the four
cells, runs the block on them as a batch, and **re-tiles** the output into the 2 x 2 layout: a stage's output is
one feature map of the whole grid, (B, channels, 2h, 2w), with cell k's features in cell k's quarter (at 128 px:
(B, 64, 16, 16) at the last stage). ``feature_layers`` are these four stages and ``cam_layer`` the last one, so

* Grad-CAM sees one feature map of the grid. Its channel weights are the gradient averaged over the *whole*
  map (Selvaraju et al., eq. 1), i.e. 1/4 of the weights the cell alone would give (the gradient is 0 in the
  other quarters), so inside the target's cell the map is 1/4 of the cell-alone Grad-CAM map (ReLU is positively
  homogeneous) and after the min-max normalisation the same; in the other cells it is ReLU(sum_k w_k A^k) of
  *their* activations, which need not be 0: Grad-CAM can attribute to cells the logit cannot see, which is what
  the grid measures (the bilinear upsampling from 16 x 16 also spreads each cell by a few pixels across the
  border);
* the learned methods that read the classifier's features (DGMP's decoder and feature filter) get maps of the
  grid's spatial layout, the same sizes as ``smallcnn``'s at 128 px; the Explainer and RTIS read only the logits.

The checkpoint identity (``checkpoint_sha256`` in the manifest, part of every mask, row and training key) is
``sha256("<base checkpoint sha256>:grid:v1")``, truncated as the base's (16 hex characters): it changes with the
base checkpoint and with this wrapper's version (:data:`GRID_VERSION`), never with the data. ``probabilities``
are the base's (sigmoid per output). The manifest's ``test_map`` is the grid outputs' on the grid test split
(the base's record is under ``base``).

Deviations from DiFull: one multi-label head per cell (the base's C outputs) instead of single-label heads; the
cells run through the whole network separately (DiFull's "full" disconnection) and a feature map of the grid is
assembled for the layer methods, where DiFull attributes at the layers of its per-cell networks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from maskbench.core.errors import MaskbenchError
from maskbench.datasets.base import stack_split
from maskbench.datasets.grid import CELLS

from .base import (
    CLASSIFIERS,
    Classifier,
    ClassifierSpec,
    SmallCNN,
    class_average_precision,
    freeze,
    get_classifier,
    predict,
)

GRID_VERSION = "1"  # part of the checkpoint identity: bump when the wrapper's outputs change
BASE_MODEL = "smallcnn"
BASE_DATASET = "synthetic"  # the data set whose classifier runs in the cells (its recipe and shipped checkpoint)


def split_cells(x: Tensor) -> Tensor:
    """(B, C, 2h, 2w) -> (4B, C, h, w): each image's cells tl, tr, bl, br, image-major."""
    b, c, hh, ww = x.shape
    if hh % 2 or ww % 2:
        raise MaskbenchError(f"A 2x2 grid needs an even height and width, got {hh}x{ww}.")
    h, w = hh // 2, ww // 2
    return x.reshape(b, c, 2, h, 2, w).permute(0, 2, 4, 1, 3, 5).reshape(b * len(CELLS), c, h, w)


def tile_cells(y: Tensor) -> Tensor:
    """(4B, C, h, w) -> (B, C, 2h, 2w): the inverse of :func:`split_cells`."""
    n, c, h, w = y.shape
    b = n // len(CELLS)
    return y.reshape(b, 2, 2, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * h, 2 * w)


class CellStage(nn.Module):
    """A stage of the base network applied to every cell separately; input and output in the 2 x 2 layout."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return tile_cells(self.block(split_cells(x)))


class GridClassifier(Classifier):
    """A :class:`~maskbench.classifiers.base.SmallCNN` run on each cell of a 2 x 2 grid (module docstring):
    logits (B, 4 C), index cell * C + class."""

    def __init__(self, base: SmallCNN):
        super().__init__()
        self.base_classes = base.num_classes
        self.num_classes = len(CELLS) * base.num_classes
        self.probabilities = base.probabilities
        self.stages = nn.ModuleList(CellStage(block) for block in base.blocks)
        self.dropout = base.dropout
        self.head = base.head

    @property
    def cam_layer(self) -> nn.Module:  # type: ignore[override]
        return self.stages[-1]

    @property
    def feature_layers(self) -> list[nn.Module]:  # type: ignore[override]
        return list(self.stages)

    def forward(self, x: Tensor) -> Tensor:
        f = x
        for stage in self.stages:
            f = stage(f)
        cells = split_cells(f)  # (4B, channels, h, w)
        logits = self.head(self.dropout(cells.mean(dim=(2, 3))))  # (4B, C), as SmallCNN
        return logits.reshape(x.shape[0], self.num_classes)


def build_grid_smallcnn(num_classes: int, **options: Any) -> GridClassifier:
    """An untrained ``grid-smallcnn`` with ``num_classes`` = 4 x C outputs (``options`` go to SmallCNN)."""
    if num_classes % len(CELLS):
        raise MaskbenchError(f"grid-smallcnn has {len(CELLS)} cells x C classes; {num_classes} is not a multiple of "
                             f"{len(CELLS)} (use it on a 2x2 grid data set such as synthetic-grid).")
    return GridClassifier(SmallCNN(num_classes // len(CELLS), **options))


def grid_checkpoint_sha256(base_sha256: str) -> str:
    """The grid classifier's checkpoint identity, derived from the base checkpoint's SHA-256 (as long as it: 16
    hex characters for a file hashed by :func:`~maskbench.core.storage.file_sha256`)."""
    return hashlib.sha256(f"{base_sha256}:grid:v{GRID_VERSION}".encode()).hexdigest()[: max(len(base_sha256), 16)]


def load_grid_smallcnn(name: str, datasets: Callable[[str], Any], dataset_key: str, num_classes: int,
                       device: torch.device, cache_dir: Any, checkpoint: Any = None, progress: bool = True,
                       train_new: bool = False, params: dict[str, Any] | None = None,
                       dataset: str | None = None) -> tuple[GridClassifier, dict[str, Any]]:
    """:func:`~maskbench.classifiers.base.get_classifier` for ``grid-smallcnn``: the base ``smallcnn`` of the grid's
    base data set, found (or, exactly where the default run would, trained) by ``get_classifier`` with the base
    splits and the base train split's fingerprint; ``checkpoint``, ``train_new`` and ``params`` apply to it.
    ``datasets(split)`` must return grid data sets (they hold their base split as ``.base``). The returned info is
    the grid's (identity :func:`grid_checkpoint_sha256`, test mAP of the grid outputs on the grid test split) with
    the base classifier's record under ``base``."""
    test = datasets("test")
    base_of = getattr(test, "base", None)
    if base_of is None or getattr(test, "num_classes", None) != num_classes:
        raise MaskbenchError(f"{name} explains 2x2 grids: use it on a grid data set (synthetic-grid), not on "
                             f"{dataset or type(test).__name__}.")

    def base_split(split: str) -> Any:
        return datasets(split).base

    base_train = base_split("train")
    base, base_info = get_classifier(BASE_MODEL, base_split, base_train.fingerprint(), len(base_train.classes),
                                     device, cache_dir, checkpoint, progress, train_new, params, BASE_DATASET)
    model = freeze(GridClassifier(base).to(device))
    info: dict[str, Any] = {
        "model": name, "base": {k: v for k, v in base_info.items() if k != "history"},
        "checkpoint": base_info.get("checkpoint"), "checkpoint_sha256": grid_checkpoint_sha256(
            base_info["checkpoint_sha256"]), "trained_here": False, "grid_version": GRID_VERSION,
        "probabilities": model.probabilities,
    }
    x_test, y_test = stack_split(test)
    ap = class_average_precision(predict(model, x_test, device), y_test)
    info["test_map"] = round(float(ap.nanmean()), 5)  # over the grid outputs with a positive test image
    return model, info


GRID_SMALLCNN = ClassifierSpec(
    "grid-smallcnn", build_grid_smallcnn, CLASSIFIERS.get(BASE_MODEL).recipe,
    "smallcnn on each cell of a 2x2 grid (DiFull; no training: the synthetic set's checkpoint)",
    load=load_grid_smallcnn,
)
CLASSIFIERS.register(GRID_SMALLCNN.name, GRID_SMALLCNN, origin=__name__)
