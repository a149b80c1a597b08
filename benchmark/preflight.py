"""Checks run before any work: the folders a run writes to exist, are writable and have room.

A results or cache folder that cannot be written, or a disk that is nearly full, used to be found only when
the first file was written at the very end of a run. :func:`check_run_folders` (called at the start of the
runner's ``prepare``) creates both folders if needed, writes and removes a probe file in each (through
:func:`~maskbench.core.storage.atomic_write`, as every real write) and checks the free space with
:func:`shutil.disk_usage`, so the error comes in the first second and names the folder, the option that sets it
and the free space found.

Minimum free space: :data:`MIN_FREE_CACHE_BYTES` (200 MB) for the cache, which receives the generated
synthetic data set (65 MB), classifier and learned-method checkpoints (a few MB on the synthetic set, about
100-500 MB for the ``paper`` networks, which need more anyway) and the mask caches (float16, 2 MB per 1,000 64 px
maps); :data:`MIN_FREE_RESULTS_BYTES` (20 MB) for the results, whose per-image rows and tables of the default run
take about 5 MB.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from maskbench.core.errors import MaskbenchError
from maskbench.core.storage import atomic_write

MIN_FREE_CACHE_BYTES = 200 * 1024**2
MIN_FREE_RESULTS_BYTES = 20 * 1024**2

RESULTS_OPTION = "the results folder (set with --results)"
CACHE_OPTION = "the cache folder (set with --cache or $MASKBENCH_CACHE; default ~/.cache/maskbench)"


def _mb(n: int) -> str:
    return f"{n / 1024**2:,.0f} MB"


def check_writable(path: str | os.PathLike[str], what: str, min_free_bytes: int) -> Path:
    """Make sure ``path`` is a folder we can write with at least ``min_free_bytes`` free; return it.

    Creates the folder (and its parents) if needed, writes a probe file into it and removes it again, and
    measures the free space of its file system. Any failure raises :class:`MaskbenchError` naming the folder and
    ``what`` it is (with the option that sets it), e.g. ``"the cache folder (set with --cache ...)"``.
    """
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MaskbenchError(f"Cannot create {what}: {folder} ({exc.strerror or exc}); choose another folder.") from exc
    if not folder.is_dir():
        raise MaskbenchError(f"{what.capitalize()} {folder} exists but is not a folder; choose another folder.")
    probe = folder / f".maskbench-write-probe-{uuid.uuid4().hex[:12]}"
    try:
        atomic_write(probe, b"maskbench write probe\n")
        probe.unlink()
    except OSError as exc:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        raise MaskbenchError(f"Cannot write to {what}: {folder} ({exc.strerror or exc}); fix its permissions or "
                             "choose another folder.") from exc
    free = shutil.disk_usage(folder).free
    if free < min_free_bytes:
        raise MaskbenchError(f"Not enough free space in {what}: {folder} has {_mb(free)} free, maskbench needs at "
                             f"least {_mb(min_free_bytes)}; free some space or choose another folder.")
    return folder


def check_run_folders(results: str | os.PathLike[str], cache: str | os.PathLike[str]) -> None:
    """Check the results and cache folders of a run (:func:`check_writable`) before any work, and keep the data
    sets' file-digest memo (:mod:`maskbench.datasets.digests`) in that cache."""
    check_writable(results, RESULTS_OPTION, MIN_FREE_RESULTS_BYTES)
    check_writable(cache, CACHE_OPTION, MIN_FREE_CACHE_BYTES)
    from maskbench.datasets.digests import set_memo_dir

    set_memo_dir(cache)
