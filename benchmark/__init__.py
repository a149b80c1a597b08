"""maskbench.benchmark: the registry, CLI, runner, config, result store and tables.

Kept import-light: nothing here imports torch until a submodule that needs it is imported.
"""

from maskbench.core.errors import DataError, MaskbenchError, MethodError, UnknownNameError
from maskbench.core.registry import Registry, import_plugin

__all__ = ["DataError", "MaskbenchError", "MethodError", "Registry", "UnknownNameError", "import_plugin"]
