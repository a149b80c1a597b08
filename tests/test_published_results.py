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
        write_all_tables(tmp_path)
        for table in run.glob("*.csv"):
            if table.name.startswith(("verify", "randomisation")):  # written by `verify` / `sanity`: model runs
                continue
            assert (copy / table.name).read_bytes() == table.read_bytes(), table
        for table in run.glob("*.tex"):
            if table.name.startswith("randomisation"):
                continue
            assert (copy / table.name).read_bytes() == table.read_bytes(), table
