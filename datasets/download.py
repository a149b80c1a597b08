"""Fetch the real data sets: PASCAL VOC-2007 and COCO-2014, from their official archives.

``maskbench download voc`` / ``coco`` (:func:`download`) fetches each archive of the data set with a progress
bar, resumes a partial download (an HTTP ``Range`` request continues ``<archive>.part``), verifies the archive's
published MD5 checksum (a mismatch deletes the file and names it), and extracts every archive of the data set
into a staging folder next to the root that is renamed into place only when all of them are extracted, with a
``.maskbench-download.json`` record written last: an interrupted extraction never leaves a tree that looks
complete, and a second call with the record in place does nothing (no network).

* VOC-2007: ``VOCtrainval_06-Nov-2007.tar`` and ``VOCtest_06-Nov-2007.tar`` (the MD5s torchvision's
  ``VOCDetection`` checks), merged into ``<root>/VOCdevkit/VOC2007``.
* COCO-2014: ``annotations_trainval2014.zip``, ``val2014.zip`` and ``train2014.zip`` from
  images.cocodataset.org, giving ``<root>/annotations/instances_{train,val}2014.json`` and
  ``<root>/{train,val}2014/``. The COCO site publishes no checksums; the MD5s are those the common
  downloaders check (LAVIS, torchvision for R). ``--skip-checksum`` is the way out if an archive is ever
  republished (the run says that it did not verify).

Mirrors: ``--mirror URL`` or ``$MASKBENCH_VOC_MIRROR`` / ``$MASKBENCH_COCO_MIRROR`` replace the base URL of
every archive (``<mirror>/<archive file name>``); a mirror serving other bytes than the official archives comes
with its own checksums (``--checksums FILE`` or ``$MASKBENCH_<DATASET>_CHECKSUMS``, in ``md5sum`` format).
The tests serve archives built from the synthetic tree that way, over a loopback HTTP server.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from maskbench.core.errors import DataError, UnknownNameError
from maskbench.core.storage import atomic_write, cache_root

RECORD = ".maskbench-download.json"  # written last into a complete download
CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    filename: str
    url: str
    md5: str
    size: str  # as published, for the user (e.g. "439 MB")


@dataclass(frozen=True)
class Source:
    dataset: str
    archives: tuple[Archive, ...]
    layout: str  # what the extracted tree holds, for messages
    checksums_from: str


SOURCES: dict[str, Source] = {
    "voc": Source(
        "voc",
        (Archive("VOCtrainval_06-Nov-2007.tar", "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/",
                 "c52e279531787c972589f7e41ab4ae64", "439 MB"),
         Archive("VOCtest_06-Nov-2007.tar", "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/",
                 "b6e924de25625d8de591ea690078ad9f", "431 MB")),
        "VOCdevkit/VOC2007/{Annotations,ImageSets,JPEGImages,SegmentationClass,SegmentationObject}",
        "torchvision.datasets.VOCDetection (year 2007 and 2007-test)",
    ),
    "coco": Source(
        "coco",
        (Archive("annotations_trainval2014.zip", "http://images.cocodataset.org/annotations/",
                 "d3e24dc9f5bda3e7887a1e6a5ff34c0c", "241 MB"),
         Archive("val2014.zip", "http://images.cocodataset.org/zips/",
                 "a3d79f5ed8d289b7a7554ce06a5782b3", "6.2 GB"),
         Archive("train2014.zip", "http://images.cocodataset.org/zips/",
                 "0da8c0bd3d6becc4dcb32757491aca88", "13 GB")),
        "annotations/instances_{train,val}2014.json, train2014/, val2014/",
        "the COCO site publishes none; those of the common downloaders (LAVIS, torchvision for R)",
    ),
}


def source(dataset: str) -> Source:
    if dataset not in SOURCES:
        raise UnknownNameError("downloadable data set", dataset, sorted(SOURCES))
    return SOURCES[dataset]


def default_root(dataset: str) -> Path:
    """Where ``maskbench download <dataset>`` puts the data by default, and where the loaders look when no
    root is given and ``$MASKBENCH_<DATASET>_ROOT`` is unset: ``<cache>/data/<dataset>``, in the run's cache
    (``--cache``, see :func:`~maskbench.datasets.digests.memo_dir`; else ``$MASKBENCH_CACHE`` or the default)."""
    from .digests import memo_dir

    return memo_dir() / "data" / dataset


def how_to_download(dataset: str, root: str | os.PathLike[str] | None = None) -> str:
    """The one line that tells a user how to get a missing data set."""
    where = f" --root {root}" if root is not None else ""
    total = " + ".join(a.size for a in source(dataset).archives)
    return f"fetch it with `maskbench download {dataset}{where}` ({total})"


def md5_of(path: Path, progress: bool = False) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, leave=False,
                                     desc=f"md5 {path.name}", disable=not progress) as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def read_checksums(path: str | os.PathLike[str]) -> dict[str, str]:
    """``md5sum`` output (``<md5>  <file name>`` per line) as {file name: md5}."""
    out = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 32:
            raise DataError(f"{path}:{i}: expected '<md5>  <file name>', got {line!r}")
        out[parts[1].lstrip("*")] = parts[0].lower()
    return out


def fetch(url: str, dest: Path, md5: str | None, *, progress: bool = True) -> Path:
    """Download ``url`` to ``dest``, continuing ``dest.part`` when there is one, and check its MD5 (None: not
    checked). A file whose checksum does not match is deleted, and the error names it."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not start:  # 416: the partial file is already whole
            raise DataError(f"Download of {url} failed: HTTP {exc.code} {exc.reason}.") from None
        response = None
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"Download of {url} failed: {exc}. Rerun the command to resume it.") from None
    if response is not None:
        with response:
            if start and response.status != 206:  # the server ignored the range: start over
                start = 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            with open(part, "ab" if start else "wb") as f, tqdm(
                    total=total, initial=start, unit="B", unit_scale=True, desc=dest.name,
                    disable=not progress) as bar:
                try:
                    while chunk := response.read(CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
                except (OSError, http.client.HTTPException) as exc:  # dropped: what arrived stays in .part
                    raise DataError(f"Download of {url} was interrupted after {f.tell()} bytes ({exc}); rerun "
                                    f"the command to resume it from {part}.") from None
            if total is not None and part.stat().st_size < total:
                raise DataError(f"Download of {url} ended after {part.stat().st_size} of {total} bytes; rerun "
                                f"the command to resume it from {part}.")
    if md5 is not None:
        found = md5_of(part, progress)
        if found != md5:
            part.unlink()
            raise DataError(f"Checksum mismatch: {dest} downloaded from {url} has MD5 {found}, expected {md5}. "
                            f"The file was deleted; rerun the command to download it again.")
    os.replace(part, dest)
    return dest


def _extract(archive: Path, into: Path) -> None:
    """Extract a .tar or .zip archive into ``into``, refusing members that would land outside it."""
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            base = into.resolve()
            for name in z.namelist():
                target = (into / name).resolve()
                if target != base and base not in target.parents:
                    raise DataError(f"{archive}: member {name!r} would be extracted outside {into}.")
            z.extractall(into)
    else:
        with tarfile.open(archive) as t:
            try:
                t.extractall(into, filter="data")
            except tarfile.FilterError as exc:
                raise DataError(f"{archive}: unsafe member refused ({exc}).") from None


def _record(root: Path) -> dict | None:
    path = root / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def download(dataset: str, root: str | os.PathLike[str] | None = None, *, mirror: str | None = None,
             checksums: str | os.PathLike[str] | None = None, archive_dir: str | os.PathLike[str] | None = None,
             keep_archives: bool = True, skip_checksum: bool = False, progress: bool = True,
             log: Callable[[str], None] = print) -> Path:
    """Fetch, verify and extract ``dataset`` (``voc`` or ``coco``) into ``root``; returns the root.

    A root holding the record of a complete download of the same archives is returned at once. Archives are
    kept in ``archive_dir`` (default ``<cache>/downloads/<dataset>``) unless ``keep_archives`` is False.
    """
    src = source(dataset)
    root = Path(root) if root is not None else default_root(dataset)
    mirror = mirror or os.environ.get(f"MASKBENCH_{dataset.upper()}_MIRROR")
    checksums = checksums or os.environ.get(f"MASKBENCH_{dataset.upper()}_CHECKSUMS")
    sums = read_checksums(checksums) if checksums else {}
    if mirror and not sums and not skip_checksum:
        log(f"note: mirror {mirror}: checking the official checksums (pass --checksums for a mirror with other "
            f"archives)")
    expected = {a.filename: (None if skip_checksum else sums.get(a.filename, a.md5)) for a in src.archives}
    record = _record(root)
    if record is not None and record.get("dataset") == dataset and record.get("archives") == expected:
        log(f"{dataset}: already downloaded into {root}")
        return root
    ours = record is not None and record.get("dataset") == dataset  # an earlier download of other archives
    if root.exists() and not ours and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} exists and is not a complete maskbench download of {dataset} (no {RECORD}): "
                        f"choose another --root, or remove it.")
    archive_dir = Path(archive_dir) if archive_dir is not None else cache_root() / "downloads" / dataset
    paths = []
    for a in src.archives:
        url = f"{mirror.rstrip('/')}/{a.filename}" if mirror else a.url + a.filename
        paths.append(fetch(url, archive_dir / a.filename, expected[a.filename], progress=progress))
    staging = root.parent / f".{root.name}.partial"
    if staging.exists():  # an extraction that was interrupted: start it over
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for path in tqdm(paths, desc=f"extract {dataset}", unit="archive", disable=not progress):
        _extract(path, staging)
    atomic_write(staging / RECORD, json.dumps({"dataset": dataset, "archives": expected,
                                               "verified": not skip_checksum, "layout": src.layout}, indent=1))
    if root.exists():
        shutil.rmtree(root)  # an empty folder, or an earlier download of other archives
    os.replace(staging, root)
    if not keep_archives:
        for path in paths:
            path.unlink(missing_ok=True)
    log(f"{dataset}: {len(paths)} archive(s) {'verified and ' if not skip_checksum else ''}extracted into {root}")
    return root
