"""maskbench.core: the foundation every other maskbench package stands on.

The registry, errors, atomic storage and hashing, the per-image row store and mask cache, the device,
provenance (code identity, git revision), the bootstrap statistics and the image operations that methods and
metrics share. Nothing here imports another maskbench package (``tests/test_layering.py`` checks it).
"""

from .errors import DataError, MaskbenchError, MethodError, UnknownNameError
from .registry import Registry, import_plugin

__all__ = ["DataError", "MaskbenchError", "MethodError", "Registry", "UnknownNameError", "import_plugin"]
