"""maskbench.methods: the attribution methods behind one registry (``METHODS``).

Adding a method: write a module with an ``AttributionMethod`` dataclass decorated with ``@register_method``,
then either import it here, ship it in a package with a ``maskbench.methods`` entry point, or load it
with ``--plugin``. See README "Add your own method" and ``examples/``.
"""

from . import dgmp, explainer, extremal, gradcam, gradients, igos, meaningful, reference, rise, rtis  # noqa: F401  (registrations)
from .base import (
    METHODS,
    AttributionMethod,
    MethodContext,
    build_method,
    check_masks,
    image_class_pairs,
    method_presets,
    normalize_maps,
    register_method,
)

__all__ = [
    "METHODS",
    "AttributionMethod",
    "MethodContext",
    "build_method",
    "check_masks",
    "image_class_pairs",
    "method_presets",
    "normalize_maps",
    "register_method",
]
