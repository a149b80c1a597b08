"""maskbench.classifiers: the explained classifiers behind one registry (``CLASSIFIERS``).

A classifier is built for a data set's classes, trained or loaded from a cached (or shipped) checkpoint, and
handed to the methods frozen (:func:`freeze`). See :mod:`maskbench.classifiers.base`; ``grid-smallcnn``
(:mod:`maskbench.classifiers.grid`) runs the synthetic set's ``smallcnn`` on each cell of a 2 x 2 grid (DiFull).
"""

from .base import (
    CLASSIFIERS,
    SHIPPED_DIR,
    Classifier,
    ClassifierSpec,
    SmallCNN,
    TorchvisionClassifier,
    TrainRecipe,
    build_classifier,
    freeze,
    get_classifier,
    imagenet_classifier,
    load_checkpoint,
    predict,
    train_classifier,
    weights_file,
)
from .grid import GridClassifier  # registers grid-smallcnn

__all__ = ["CLASSIFIERS", "SHIPPED_DIR", "Classifier", "ClassifierSpec", "GridClassifier", "SmallCNN",
           "TorchvisionClassifier", "TrainRecipe", "build_classifier", "freeze", "get_classifier",
           "imagenet_classifier", "load_checkpoint", "predict", "train_classifier", "weights_file"]
