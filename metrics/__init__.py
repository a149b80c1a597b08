"""maskbench.metrics: per-image metrics behind one registry (``METRICS``), each with its polarity."""

from . import class_table, faithfulness, localisation, masked_classifier, segmentation  # noqa: F401  (registrations)
from .base import (
    METRICS,
    MetricInputs,
    MetricSpec,
    merge_true_class_masks,
    register_metric,
    true_class_slots,
    value_range,
)

__all__ = ["METRICS", "MetricInputs", "MetricSpec", "merge_true_class_masks", "register_metric", "true_class_slots",
           "value_range"]
