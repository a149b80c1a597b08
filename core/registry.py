"""A small generic registry, one instance per concept (methods, datasets, classifiers, metrics).

In the style of torchvision's model registry: ``register`` is a decorator (or a plain call), a duplicate
name is an error, ``list`` filters with fnmatch patterns and sorts naturally, and ``get`` of an unknown
name raises :class:`UnknownNameError` listing the valid names with near matches. Entries may carry
metadata (``meta``) and remember the module that registered them (``origin``). A registry can also
load plugins from a Python entry-point group on first use.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from .errors import MaskbenchError, UnknownNameError

T = TypeVar("T")


def _natural_key(name: str) -> list[Any]:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


class Registry(Generic[T]):
    """Name -> object mapping for one kind of component."""

    def __init__(self, kind: str, entry_point_group: str | None = None,
                 adopt: Callable[[str, Any], T] | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        # adopt(entry-point name, loaded object) -> the object to register (validates it, names it)
        self.adopt = adopt
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._origin: dict[str, str] = {}
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str | None = None, obj: T | None = None, *, origin: str | None = None,
                 **meta: Any) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name`` (default: its ``name`` attribute or ``__name__``).

        Used as ``@registry.register("rise")`` or ``registry.register("rise", RISE)``. ``origin``: the module
        that registers it (default: the object's ``__module__``; a spec object built by a helper passes the
        module of the function or caller it describes).
        """

        def wrapper(item: T) -> T:
            key = name or getattr(item, "name", None) or item.__name__  # type: ignore[attr-defined]
            if not isinstance(key, str) or not key:
                raise MaskbenchError(f"Cannot register {item!r} as a {self.kind}: no name given.")
            if key in self._items and self._items[key] is not item:
                raise MaskbenchError(
                    f"A {self.kind} named '{key}' is already registered (from {self._origin[key]})."
                )
            self._items[key] = item
            self._meta[key] = dict(meta)
            self._origin[key] = origin or getattr(item, "__module__", "?")
            return item

        if obj is not None:
            return wrapper(obj)
        return wrapper

    def load_entry_points(self) -> None:
        """Import every plugin advertised in the entry-point group (once)."""
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must say which one it is
                raise MaskbenchError(
                    f"Plugin entry point '{ep.name} = {ep.value}' in group '{self.entry_point_group}' "
                    f"failed to load: {exc}"
                ) from exc
            if self.adopt is not None:
                obj = self.adopt(ep.name, obj)
            if ep.name not in self._items:
                self.register(ep.name, obj)
            elif self._items[ep.name] is not obj:
                raise MaskbenchError(
                    f"Plugin entry point '{ep.name} = {ep.value}' in group '{self.entry_point_group}': a "
                    f"{self.kind} named '{ep.name}' is already registered (from {self._origin[ep.name]})."
                )

    def get(self, name: str, *, entry_points: bool = True) -> T:
        """The object registered as ``name``. ``entry_points=False`` looks only at what is registered so far,
        without loading the entry-point group: for lookups made while the package that owns the registry is
        still being imported (a plugin importing that package would find it half-initialised)."""
        if entry_points:
            self.load_entry_points()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._items) from None

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return dict(self._meta[name])

    def origin(self, name: str) -> str:
        self.get(name)
        return self._origin[name]

    def list(self, include: str | Iterable[str] = "*", exclude: str | Iterable[str] = ()) -> list[str]:
        """Registered names matching any ``include`` pattern and no ``exclude`` pattern, naturally sorted."""
        self.load_entry_points()
        inc = [include] if isinstance(include, str) else list(include)
        exc = [exclude] if isinstance(exclude, str) else list(exclude)
        names = [
            n
            for n in self._items
            if any(fnmatch.fnmatchcase(n, p) for p in inc) and not any(fnmatch.fnmatchcase(n, p) for p in exc)
        ]
        return sorted(names, key=_natural_key)

    def __contains__(self, name: object) -> bool:
        self.load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self.list())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._items)} entries)"


def import_plugin(spec: str) -> None:
    """Import a module that registers components: a dotted module name or a path to a ``.py`` file."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(spec)
    try:
        if spec.endswith(".py"):
            if not path.is_file():
                raise MaskbenchError(f"Plugin file not found: {path}")
            mod_name = f"maskbench_plugin_{path.stem}"
            if mod_name in sys.modules:
                return
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except MaskbenchError:
        raise
    except Exception as exc:
        raise MaskbenchError(f"Could not import plugin '{spec}': {exc}") from exc
