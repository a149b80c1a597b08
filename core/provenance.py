"""Where numbers come from: the code of a method, the git revision and the library versions.

:func:`code_hash` makes a method's source part of its identity (its cache and run keys), so that editing a
method, or a plugin module, recomputes its masks and rows instead of reporting the first version's rows
forever. The hash covers the modules that define the method's class and its bases, and the modules they import
names from that belong to the same code base (``maskbench.methods.*`` for the built-in methods, with the
shared ``maskbench.core.images`` and ``maskbench.core.scores``; any module in a plugin's own folder), followed
transitively. Each module enters as its syntax tree without docstrings, so editing a comment, a docstring
or the layout keeps the key; changing what the code does changes it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

# what a method computes with: its own package and the shared image operations and class scores of core/
TRACKED_PACKAGES = ("maskbench.methods", "maskbench.core.images", "maskbench.core.scores")


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@functools.cache
def _module_digest(path: str) -> str:
    """SHA-256 of a source file's syntax tree without docstrings (the raw bytes if it does not parse)."""
    raw = Path(path).read_bytes()
    try:  # unparse, not dump: the canonical source is the same across Python versions, AST field lists are not
        blob = ast.unparse(_strip_docstrings(ast.parse(raw)))
    except SyntaxError:
        return hashlib.sha256(raw).hexdigest()
    return hashlib.sha256(blob.encode()).hexdigest()


def _file(module: ModuleType) -> str | None:
    f = getattr(module, "__file__", None)
    return f if f and f.endswith(".py") and Path(f).is_file() else None


def _imported_modules(module: ModuleType) -> list[ModuleType]:
    """Modules whose names ``module`` imports (for ``from m import f``: the module that defines ``f``)."""
    path = _file(module)
    if path is None:
        return []
    try:
        tree = ast.parse(Path(path).read_bytes())
    except SyntaxError:
        return []
    out: list[ModuleType] = []
    package = module.__name__ if hasattr(module, "__path__") else module.__name__.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [sys.modules[a.name] for a in node.names if a.name in sys.modules]
        elif isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, name] if name else base)
            source = sys.modules.get(name)
            if source is None:
                continue
            for alias in node.names:
                obj = getattr(source, alias.name, None)
                if isinstance(obj, ModuleType):
                    out.append(obj)
                elif getattr(obj, "__module__", None) in sys.modules:
                    out.append(sys.modules[obj.__module__])
                else:
                    out.append(source)
    return out


def code_hash(cls: type) -> str:
    """A short hash of the code that defines ``cls`` (see the module docstring)."""
    roots = [sys.modules[c.__module__] for c in cls.__mro__ if c.__module__ in sys.modules]
    own = _file(sys.modules[cls.__module__]) if cls.__module__ in sys.modules else None
    plugin_dir = str(Path(own).parent) if own else None

    def tracked(m: ModuleType) -> bool:
        f = _file(m)
        if f is None:
            return False
        if m.__name__.startswith(TRACKED_PACKAGES):
            return True
        return m is roots[0] or (plugin_dir is not None and str(Path(f).parent) == plugin_dir
                                 and not m.__name__.startswith("maskbench."))

    seen: dict[str, str] = {}
    todo = [m for m in roots if tracked(m)]
    while todo:
        m = todo.pop()
        f = _file(m)
        if f is None or m.__name__ in seen:
            continue
        seen[m.__name__] = _module_digest(f)
        if not hasattr(m, "__path__"):  # a package __init__ only re-exports: its imports are not followed
            todo += [d for d in _imported_modules(m) if tracked(d) and d.__name__ not in seen]
    h = hashlib.sha256()
    for digest in sorted(seen.values()):  # contents only: a plugin loaded under another module name keeps its key
        h.update(f"{digest}\n".encode())
    return h.hexdigest()[:12]


def git_revision() -> dict[str, Any]:
    """The commit of the maskbench checkout and whether its code (not ``results/``) has local changes."""
    src = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, check=True)
        # the code's state: the run itself rewrites the tracked results/, which must not make it "dirty"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
                               cwd=src, capture_output=True, text=True, check=True)
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "torch_build": torch.__version__, "cuda": str(torch.version.cuda)}
    for pkg in ("maskbench", "torch", "torchvision", "captum", "numpy", "pandas", "pycocotools"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
