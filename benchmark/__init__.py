"""maskbench.benchmark: the registry, CLI, runner, config, result store and tables.

Kept import-light: nothing here imports torch until a submodule that needs it is imported.
"""

from .errors import DataError, MaskbenchError, MethodError, UnknownNameError
from .registry import Registry, import_plugin

__all__ = ["DataError", "MaskbenchError", "MethodError", "Registry", "UnknownNameError", "import_plugin"]
