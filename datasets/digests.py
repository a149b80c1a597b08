"""Content digests of data files, memoised so that fingerprinting a large data set reads it only once.

:meth:`~maskbench.datasets.base.AttributionDataset.fingerprint` keys caches by what a split *contains*, so it
needs a digest (SHA-256) of every file the split reads. Reading COCO's 13 GB of training images on every run
would be slow, so each digest is remembered in a small JSON memo under the cache folder,
``<cache>/digests/<hash of the data root>.json``, keyed by the file's absolute path, size and modification time
(``st_mtime_ns``): a file that is rewritten, touched or replaced gets a new modification time and is read
again; a copied or moved data set is read once at its new place and gets the same digests.

* The memo is only an accelerator: it is written atomically, a missing, unreadable or damaged memo file is
  ignored (and rebuilt), and a cache folder that cannot be written just means no memo.
* A file modified less than :data:`RACY_SECONDS` before it is hashed is hashed but not memoised: on file
  systems with coarse timestamps it could still change without its modification time changing.
* The memo's folder is :func:`memo_dir`: the one the runner set with :func:`set_memo_dir` (its ``--cache``),
  else ``$MASKBENCH_CACHE`` or ``~/.cache/maskbench``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from maskbench.core.storage import atomic_write, cache_root

MEMO_VERSION = 1
RACY_SECONDS = 2.0
MISSING = "missing"  # the digest of a file that does not exist
DIGEST_CHARS = 32  # hex characters kept of each SHA-256

_memo_dir: Path | None = None


def set_memo_dir(path: str | os.PathLike[str] | None) -> None:
    """Keep the digest memos under ``path`` (the run's cache folder); None restores the default."""
    global _memo_dir
    _memo_dir = Path(path) if path is not None else None


@contextmanager
def using_memo_dir(path: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """Within the block (or the decorated function: ``@using_memo_dir()``) the memo folder is ``path`` if given,
    and whatever it is set to there (a run sets its ``--cache``) is undone on leaving, so a run inside a
    longer-lived process (tests, a notebook) leaves no folder behind for later runs."""
    saved = _memo_dir
    if path is not None:
        set_memo_dir(path)
    try:
        yield
    finally:
        set_memo_dir(saved)


def memo_dir() -> Path:
    """The cache folder that holds the digest memos (see the module docstring)."""
    return _memo_dir if _memo_dir is not None else cache_root()


def memo_file(root: str | os.PathLike[str], folder: str | os.PathLike[str] | None = None) -> Path:
    """The memo of the data set stored at ``root``: ``<folder or memo_dir()>/digests/<hash of abs root>.json``."""
    key = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16]
    return Path(folder if folder is not None else memo_dir()) / "digests" / f"{key}.json"


def _read_memo(path: Path) -> dict[str, list]:
    """The memo's entries ``{abs path: [size, mtime_ns, digest]}``; {} for a missing or damaged file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != MEMO_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return {
        k: v for k, v in data["files"].items()
        if isinstance(v, list) and len(v) == 3 and all(isinstance(x, int) for x in v[:2]) and isinstance(v[2], str)
    }


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (the first :data:`DIGEST_CHARS` hex characters)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:DIGEST_CHARS]


def file_digests(paths: Sequence[str | os.PathLike[str]], memo: Path | None) -> list[str]:
    """The content digest of each file of ``paths`` (:data:`MISSING` where there is none), reusing and updating
    the memo file ``memo`` (None: no memo)."""
    entries = _read_memo(memo) if memo is not None else {}
    changed = False
    now = time.time()
    out = []
    for p in paths:
        key = os.path.abspath(p)
        try:
            st = os.stat(key)
        except (FileNotFoundError, NotADirectoryError):
            out.append(MISSING)
            continue
        known = entries.get(key)
        if known is not None and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            out.append(known[2])
            continue
        digest = sha256_file(key)
        out.append(digest)
        if now - st.st_mtime_ns / 1e9 > RACY_SECONDS:
            entries[key] = [st.st_size, st.st_mtime_ns, digest]
            changed = True
        elif key in entries:
            del entries[key]
            changed = True
    if memo is not None and changed:
        try:
            atomic_write(memo, json.dumps({"version": MEMO_VERSION, "files": entries}, separators=(",", ":")))
        except OSError:
            pass  # a read-only or full cache: no memo, the digests are still right
    return out
