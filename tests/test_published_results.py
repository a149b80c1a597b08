"""The tables committed under results/ are exactly what `maskbench tables` builds from the committed rows."""

import shutil
from pathlib import Path

from maskbench.benchmark.tables import write_all_tables

RESULTS = Path(__file__).resolve().parent.parent / "results"


def test_committed_tables_rebuild_byte_for_byte(tmp_path):
    runs = sorted(p.parent for p in RESULTS.glob("*/*/per_image"))
    assert runs, "no published results under results/"
    for run in runs:
        copy = tmp_path / run.parent.name / run.name
        shutil.copytree(run / "per_image", copy / "per_image")
        shutil.copy(run / "manifest.json", copy / "manifest.json")  # class names of the class table
        shutil.copy(run / "run.json", copy / "run.json")  # the run's images and identity
        if (run / "sanity").is_dir():  # the per-image rows of `sanity` and `leakage` (their tables are rebuilt too)
            shutil.copytree(run / "sanity", copy / "sanity")
        write_all_tables(tmp_path)
        for table in run.glob("*.csv"):
            if table.name.startswith("verify"):  # written by `verify`, which reruns the models
                continue
            assert (copy / table.name).read_bytes() == table.read_bytes(), table
        for table in run.glob("*.tex"):
            assert (copy / table.name).read_bytes() == table.read_bytes(), table
