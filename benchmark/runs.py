"""One results folder holds one run: its identity (``run.json``) and the folder a run writes to.

A run's identity is what its numbers are conditional on: the data (content fingerprint of the split), the
split and the exact images, the image size, the classifier checkpoint (its SHA-256), the global preset, the
table classes, hyperparameter overrides and the seed. It is written to ``<run dir>/run.json`` before the first
row, and every later run into the folder must have the same identity:

* a folder named after the run (the default, :meth:`RunConfig.run_label`) that holds another run is left
  alone and the run goes to ``<label>-<identity hash>`` (told on the console), so the published results are
  never a scratch pad;
* a folder the user named (``--run-name``) that holds another run is refused, or replaced with
  ``--overwrite``.

Tables read ``run.json`` to know the images a run promises (so a method that lacks some is reported as missing,
never as undefined) and which method rows belong to it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from maskbench.core.errors import MaskbenchError
from maskbench.core.storage import read_json, stable_hash, write_json

RUN_FILE = "run.json"
GENERATED = ("per_image", "manifest.json", "diagnostics.csv", RUN_FILE)  # plus the table files *.csv / *.tex


def read_run(run_dir: Path) -> dict[str, Any] | None:
    """A run folder's ``run.json`` (``identity`` and ``image_ids``), None when there is none (a new or
    pre-identity folder); a damaged one is an error naming it."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise MaskbenchError(f"Cannot read {path}: {exc}. Delete the folder {run_dir} (or the file) and rerun.") \
            from None
    if not isinstance(data, dict) or "identity" not in data:
        raise MaskbenchError(f"{path} is not a maskbench run file (no 'identity'). Delete it and rerun.")
    return data


def read_identity(run_dir: Path) -> dict[str, Any] | None:
    """The identity stored in a run folder, None when there is none."""
    data = read_run(run_dir)
    return data["identity"] if data is not None else None


def _holds_results(run_dir: Path) -> bool:
    per_image = Path(run_dir) / "per_image"
    return per_image.is_dir() and any(per_image.iterdir())


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The identity fields that differ, as ``field: a -> b`` (image lists summarised)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            va, vb = a.get(k), b.get(k)
            if isinstance(va, list) and len(va) > 8 or isinstance(vb, list) and len(vb) > 8:
                va, vb = f"{len(va or [])} items", f"{len(vb or [])} items"
            out.append(f"{k}: {va} -> {vb}")
    return out


def _clear(run_dir: Path) -> None:
    for name in GENERATED:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    for p in list(run_dir.glob("*.csv")) + list(run_dir.glob("*.tex")):
        p.unlink()


def alternative_dir(run_dir: Path, identity: dict[str, Any]) -> Path:
    """Where a run goes when the folder named after it holds another run."""
    return Path(run_dir).with_name(f"{Path(run_dir).name}-{stable_hash(identity, 8)}")


def locate_run_dir(run_dir: Path, identity: dict[str, Any]) -> Path:
    """The folder :func:`resolve_run_dir` chose for ``identity`` (for the other processes of a distributed run)."""
    existing = read_identity(run_dir)
    if existing == identity or (existing is None and not _holds_results(run_dir)):
        return Path(run_dir)
    return alternative_dir(run_dir, identity)


def resolve_run_dir(run_dir: Path, identity: dict[str, Any], image_ids: list[str], *, named: bool,
                    overwrite: bool, log: Any = print) -> Path:
    """The folder this run writes to (see the module docstring); :func:`claim_run_dir` then writes ``run.json``."""
    run_dir = Path(run_dir)
    existing = read_identity(run_dir)
    if existing == identity:
        return run_dir
    other = existing is not None or _holds_results(run_dir)
    if other:
        what = "; ".join(differences(existing, identity)) if existing else "results without a run.json"
        if named:
            if not overwrite:
                raise MaskbenchError(
                    f"{run_dir} holds another run ({what}). Tables never mix runs: choose another --run-name, "
                    f"or pass --overwrite to replace its results."
                )
            log(f"maskbench: replacing the results in {run_dir} ({what})")
            _clear(run_dir)
        else:
            alt = alternative_dir(run_dir, identity)
            log(f"maskbench: {run_dir} holds another run ({what}); this run writes to {alt}")
            if read_identity(alt) not in (None, identity):
                raise MaskbenchError(f"{alt} holds yet another run; pass --run-name to choose a folder.")
            run_dir = alt
    return run_dir


def claim_run_dir(run_dir: Path, identity: dict[str, Any], image_ids: list[str]) -> None:
    """Write ``run.json`` (before the run's first rows; a run that stores nothing leaves no folder behind)."""
    existing = read_identity(run_dir)
    if existing == identity:
        return
    path = Path(run_dir) / RUN_FILE
    if existing is not None:  # replaced with --overwrite after resolve_run_dir cleared the folder
        write_json(path, {"identity": identity, "image_ids": list(image_ids)})
        return
    # exclusive creation: of two runs that chose the same new folder at once, the second one is refused
    tmp = path.with_name(f".{RUN_FILE}.{os.getpid()}.tmp")
    write_json(tmp, {"identity": identity, "image_ids": list(image_ids)})
    try:
        os.link(tmp, path)
    except FileExistsError:
        if read_identity(run_dir) != identity:
            what = "; ".join(differences(read_identity(run_dir) or {}, identity))
            raise MaskbenchError(f"Another run claimed {run_dir} at the same time ({what}); rerun with --run-name "
                                 f"to choose another folder.") from None
    finally:
        tmp.unlink(missing_ok=True)
