"""maskbench.metrics: per-image metrics behind one registry (``METRICS``), each with its polarity, and the
tables they declare (``TABLES``)."""

from . import class_table, faithfulness, grid, localisation, masked_classifier, road, sanity, segmentation  # noqa: F401
from .base import (
    METRICS,
    TABLES,
    Curves,
    MetricInputs,
    MetricSpec,
    TableInputs,
    TableSpec,
    merge_true_class_masks,
    metric_statistic,
    register_metric,
    register_table,
    select_metrics,
    table_specs,
    true_class_slots,
    value_range,
)
from .localisation import box_union_masks

__all__ = ["METRICS", "TABLES", "Curves", "MetricInputs", "MetricSpec", "TableInputs", "TableSpec", "box_union_masks",
           "merge_true_class_masks", "metric_statistic", "register_metric", "register_table", "select_metrics",
           "table_specs",
           "true_class_slots", "value_range"]
