"""A metric is one file, plugged in from outside the repository: the README's plugin metric and
``examples/energy_pointing.py`` run through the CLI, the example's known answers, entry-point discovery, and
``maskbench tables --plugin`` rebuilding a plugin metric's table from the stored rows.

Every run that imports a plugin metric is a subprocess; the known-answer tests import the example here, as
``--plugin`` does, and unregister it afterwards, so other test files never see the plugin's metric or table.
"""

import inspect
import math
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from mb_testutils import registries_restored, tiny_synthetic

from maskbench.benchmark.cli import main
from maskbench.core.registry import import_plugin
from maskbench.datasets import Batch
from maskbench.metrics import METRICS, TABLES, MetricInputs, box_union_masks

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "energy_pointing.py"
README = REPO / "README.md"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory, n_test=4, seed=5)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m maskbench.benchmark ARGS`` in a fresh process (plugins stay out of this one)."""
    out = subprocess.run([sys.executable, "-m", "maskbench.benchmark", *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, cwd=REPO)
    if check and out.returncode != 0:
        raise AssertionError(f"maskbench {' '.join(args)} exited with {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


def bench_args(data_root, cache_dir, results, *extra: str) -> list[str]:
    return ["bench", "--methods", "ground-truth,constant-0.5", "--limit", "4", "--data-root", str(data_root),
            "--cache", str(cache_dir), "--results", str(results), "--no-progress", *extra]


def summary_counts(stdout: str) -> dict[str, dict[str, int]]:
    """Per method, the counts of ``bench``'s summary (images, stored, cached, new, failed, const)."""
    counts = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 8 and parts[0] in ("ground-truth", "constant-0.5"):
            counts[parts[0]] = dict(zip(("images", "stored", "cached", "new", "failed", "const"),
                                        map(int, parts[1:7]), strict=True))
    assert set(counts) == {"ground-truth", "constant-0.5"}, stdout
    return counts


def readme_metric_block() -> str:
    """The fenced python block of the README's "Adding a metric" section."""
    text = README.read_text()
    section = text.split("\n## Adding a metric\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    assert blocks, "no ```python block under '## Adding a metric' in README.md"
    return blocks[0]


# ------------------------------------------------------------------------------------- (a) the README's metric


def test_readme_metric_runs_through_the_cli(data_root, cache_dir, tmp_path):
    code = readme_metric_block()
    assert "register_metric(" in code and "register_table(" in code
    table = re.search(r"TableSpec\(\s*\"(\w+)\"", code).group(1)
    plugin = tmp_path / "my_readme_metric.py"
    plugin.write_text(code)
    counts = summary_counts(cli(*bench_args(data_root, cache_dir, tmp_path / "res", "--plugin", str(plugin))).stdout)
    assert all(c["failed"] == 0 and c["images"] == 4 for c in counts.values())
    run = tmp_path / "res" / "synthetic" / "smallcnn-limit4"
    assert (run / f"{table}.csv").is_file() and (run / f"{table}.tex").is_file()
    rows = pd.read_csv(run / f"{table}.csv")
    assert sorted(rows["method"]) == ["constant-0.5", "ground-truth"] and len(rows) == 2  # one row per method
    value = rows.set_index("method")["value"]
    assert value["ground-truth"] > value["constant-0.5"]
    assert value["ground-truth"] == pytest.approx(100.0)  # the oracle's mask lies inside the class's boxes
    tex = (run / f"{table}.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 1 and "Wang et al." in tex


# ----------------------------------------------------------------------------- (b) the example's known answers


@contextmanager
def plugin_imported(path: Path):
    """``import_plugin(path)`` for the block only: what it registers is unregistered on leaving."""
    with registries_restored(METRICS, TABLES):
        import_plugin(str(path))
        yield


@pytest.fixture(params=["example", "readme"])
def energy_pointing(request, tmp_path):
    """The metric of the example file, or of the README's code block (the same known answers hold for both),
    imported as ``--plugin`` imports it, for this module's tests only."""
    source = EXAMPLE
    if request.param == "readme":
        source = tmp_path / "readme_energy_pointing.py"
        source.write_text(readme_metric_block())
    with plugin_imported(source):
        spec = METRICS.get("energy-pointing")
        assert Path(inspect.getsourcefile(inspect.unwrap(spec.fn))).resolve() == source.resolve()
        yield spec


H = W = 16
BOX = [2.0, 4.0, 10.0, 12.0]  # x0, y0, x1, y1: pixel centres 2.5..9.5 x 4.5..11.5, an 8 x 8 block


def boxed_batch(device: str) -> Batch:
    """Four 16 x 16 images of 3 classes. 0: class 1 with one box (64 px); 1: classes 0 and 2, class 0 with two
    overlapping boxes (union 8 x 8 + 4 x 8 - 4 x 4 = 80 px), class 2 with a box at the right edge (4 x 16 =
    64 px); 2: no true class; 3: class 2, which has no box."""
    labels = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 0, 0], [0, 0, 1]], dtype=torch.float32)
    boxes = [torch.tensor([BOX]), torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 8.0, 12.0], [12.0, 0.0, 16.0, 16.0]]),
             torch.zeros(0, 4), torch.zeros(0, 4)]
    box_labels = [torch.tensor([1]), torch.tensor([0, 0, 2]), torch.zeros(0, dtype=torch.long),
                  torch.zeros(0, dtype=torch.long)]
    return Batch(
        images=torch.zeros(4, 3, H, W), labels=labels, image_ids=["a", "b", "c", "d"],
        class_masks=torch.zeros(4, 3, H, W, dtype=torch.bool), ignore=torch.zeros(4, H, W, dtype=torch.bool),
        has_seg=torch.zeros(4, dtype=torch.bool), boxes=boxes, box_labels=box_labels,
        box_difficult=[torch.zeros(len(b), dtype=torch.bool) for b in boxes],
    ).to(device)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_energy_pointing_known_answers(energy_pointing, device):
    batch = boxed_batch(device)
    # each image explains its true classes (image 2 a non-true class), padded by repeating the first one
    classes = torch.tensor([[1, 1], [0, 2], [1, 1], [2, 2]], device=device)
    boxes = box_union_masks(batch, H, W, classes).float()
    assert boxes[0, 0].sum() == 64 and boxes[1, 0].sum() == 80 and boxes[1, 1].sum() == 64

    def score(masks: torch.Tensor) -> torch.Tensor:
        out = energy_pointing.fn(MetricInputs(torch.nn.Identity(), batch.images, masks, classes, batch))
        assert out.shape == (4,) and out.device.type == device and out.dtype == torch.float32
        return out.cpu()

    inside = score(boxes)  # the box raster itself: all the energy inside
    assert inside[:2].tolist() == pytest.approx([100.0, 100.0])
    assert score(1 - boxes)[:2].tolist() == pytest.approx([0.0, 0.0])  # all the energy outside the boxes
    uniform = score(torch.full_like(boxes, 0.3))  # chance level: the boxes' share of the image
    assert uniform[0].item() == pytest.approx(100 * 64 / 256)
    assert uniform[1].item() == pytest.approx((100 * 80 / 256 + 100 * 64 / 256) / 2)  # mean over true classes
    # NaN, never 0: no true class among the explained ones (image 2), a true class without a box (image 3)
    for values in (inside, uniform):
        assert math.isnan(values[2]) and math.isnan(values[3])

    # energy, not area: a map of 1 in the box and 1/3 elsewhere on 3 times as many pixels -> 50 %
    half = torch.where(boxes.bool(), 1.0, 0.0)
    half[0, 0] = torch.where(boxes[0, 0].bool(), 1.0, 64 / 192)
    assert score(half)[0].item() == pytest.approx(50.0, abs=1e-4)

    # an all-zero map has no energy: NaN for that class, the image's other class is still scored
    zero = boxes.clone()
    zero[1, 1] = 0
    value = score(zero)
    assert value[1].item() == pytest.approx(100.0) and math.isnan(score(torch.zeros_like(boxes))[0])

    # a padded slot repeats a class: it is scored once (the first slot), whatever the repeated map holds
    padded = boxes.clone()
    padded[0, 1] = 1 - boxes[0, 0]
    assert score(padded)[0].item() == pytest.approx(100.0)


def test_energy_pointing_is_registered_with_its_table(energy_pointing):
    assert energy_pointing.higher_is_better and energy_pointing.table == "energy_pointing"
    assert energy_pointing.valid_range == (0.0, 100.0)
    table = TABLES.get("energy_pointing")
    assert table.headline[0] == "energy-pointing" and "Score-CAM" in table.paper


# ------------------------------------------------------------------------------------------ (c) entry points


def fake_distribution(root: Path, package: str, entry: str, registered: str) -> dict[str, str]:
    """A package registering metric ``registered`` (and its table) and advertising it as ``entry`` in the
    ``maskbench.metrics`` group, installed as a dist-info folder on PYTHONPATH; returns the environment."""
    pkg = root / package
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import torch\n"
        "from maskbench.metrics import TableSpec, register_metric, register_table\n"
        f"@register_metric({registered!r}, higher_is_better=True, table='fake_table', label='Fake',\n"
        "                 valid_range=(0.0, 1.0))\n"
        "def fake(inputs):\n"
        "    '''Mean of each image's maps.'''\n"
        "    return inputs.masks.flatten(1).mean(1)\n"
        "register_table(TableSpec('fake_table', caption='A fake table.', paper='nobody'))\n"
    )
    dist = root / f"{package}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[maskbench.metrics]\n{entry} = {package}:fake\n")
    return {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def test_entry_point_metrics_are_discovered(tmp_path):
    env = fake_distribution(tmp_path, "mb_fake_metric", "fake-metric", "fake-metric")
    probe = ("from maskbench.metrics import METRICS, table_specs\n"
             "assert 'fake-metric' in METRICS.list()\n"
             "spec = METRICS.get('fake-metric')\n"
             "print(spec.name, spec.table, spec.fn.__module__, [t.name for t in table_specs()])\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    name, table, module, tables = out.stdout.split(" ", 3)
    assert (name, table, module) == ("fake-metric", "fake_table", "mb_fake_metric") and "fake_table" in tables
    listed = cli("metrics", env=env).stdout
    line = next(ln for ln in listed.splitlines() if ln.startswith("fake-metric "))
    assert "mb_fake_metric" in line and "fake_table" in line and "higher" in line


def test_entry_point_with_another_name_than_the_metric_is_refused(tmp_path):
    env = fake_distribution(tmp_path, "mb_misnamed_metric", "entry-name", "registered-name")
    out = cli("metrics", env=env, check=False)
    assert out.returncode == 2
    assert "'entry-name'" in out.stderr and "'registered-name'" in out.stderr, out.stderr
    probe = "from maskbench.metrics import METRICS\nMETRICS.list()\n"
    raised = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, **env})
    assert raised.returncode != 0 and "MaskbenchError" in raised.stderr and "registered-name" in raised.stderr


# ----------------------------------- (d) a plugin metric added to a run; its table rebuilt by tables --plugin


def test_plugin_metric_rescores_cached_masks_and_tables_rebuild_its_table(data_root, cache_dir, tmp_path, capsys,
                                                                          monkeypatch):
    results = tmp_path / "res"
    run = results / "synthetic" / "smallcnn-limit4"
    assert main(bench_args(data_root, cache_dir, results)) == 0
    assert not (run / "energy_pointing.csv").exists()
    capsys.readouterr()
    files = ["energy_pointing.csv", "energy_pointing.tex", "leaderboard.csv", "leaderboard.tex"]
    no_cache = tmp_path / "no-cache"  # MASKBENCH_CACHE for `tables`: must not be created (no data, no model)
    with plugin_imported(EXAMPLE):
        # the same folder with the plugin metric: every method's rows are re-scored from its cached masks
        assert main(bench_args(data_root, cache_dir, results, "--plugin", str(EXAMPLE))) == 0
        for method, c in summary_counts(capsys.readouterr().out).items():
            assert c["cached"] == 4 and c["new"] == 0 and c["failed"] == 0, (method, c)
            rows = pd.read_csv(run / "per_image" / f"{method}.csv")
            assert (rows["metric"] == "energy-pointing").sum() == 4
        table = pd.read_csv(run / "energy_pointing.csv").set_index("method")["value"]
        assert sorted(table.index) == ["constant-0.5", "ground-truth"] and table["ground-truth"] == pytest.approx(100)
        board = pd.read_csv(run / "leaderboard.csv")
        assert set(board.loc[board["statistic"] == "energy-pointing", "method"]) == {"constant-0.5", "ground-truth"}

        # tables --plugin rebuilds its table and the leaderboard byte for byte from the stored rows
        before = {f: (run / f).read_bytes() for f in files}
        for f in files:
            (run / f).unlink()
        monkeypatch.setenv("MASKBENCH_CACHE", str(no_cache))
        assert main(["tables", "--results", str(results), "--plugin", str(EXAMPLE)]) == 0
        assert {f: (run / f).read_bytes() for f in files} == before
        assert str(run / "energy_pointing.csv") in capsys.readouterr().out and not no_cache.exists()

        # the plugin listed with its origin
        assert main(["metrics", "--plugin", str(EXAMPLE)]) == 0
        line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("energy-pointing "))
        assert "energy_pointing" in line and "maskbench_plugin_energy_pointing" in line and "higher" in line

    # without the plugin its rows are kept, its table is not rebuilt, and tables says why
    (run / "energy_pointing.csv").unlink()
    assert main(["tables", "--results", str(results)]) == 0
    err = capsys.readouterr().err
    assert not (run / "energy_pointing.csv").exists() and "energy-pointing" in err and "--plugin" in err
    rows = pd.read_csv(run / "per_image" / "ground-truth.csv")
    assert (rows["metric"] == "energy-pointing").sum() == 4 and not no_cache.exists()


# --------------------------------------------- rows keyed per metric: a new metric is scored alone, none is lost

COUNTING = '''
import torch
from maskbench.metrics import register_metric

CALLS = []


@register_metric("mask-mean", higher_is_better=True, table="mask_mean", valid_range=(0.0, 1.0), version="{v}")
def mask_mean(inputs):
    """Mean of each image's masks."""
    CALLS.append(len(inputs.masks))
    return inputs.masks.float().mean(dim=(1, 2, 3))
'''


@contextmanager
def counting_calls(names: list[str]):
    """Wrap the registered functions of ``names`` so that the images each call scores are counted."""
    import dataclasses

    calls = {n: 0 for n in names}
    saved = {n: METRICS._items[n] for n in names}

    def counted(name, fn):
        def wrapper(inputs):
            calls[name] += len(inputs.masks)
            return fn(inputs)
        return wrapper

    for n, spec in saved.items():
        METRICS._items[n] = dataclasses.replace(spec, fn=counted(n, spec.fn))
    try:
        yield calls
    finally:
        METRICS._items.update(saved)


def test_a_metric_added_removed_or_changed_is_scored_alone_and_no_rows_are_lost(data_root, cache_dir, tmp_path,
                                                                              capsys):
    """Rows carry one key per (masks, metric): adding a metric scores it alone (the built-in metrics are not
    called again), a run without it keeps its rows, and a new version of it scores it alone again."""
    results = tmp_path / "res"
    per_image = results / "synthetic" / "smallcnn-limit4" / "per_image"
    assert main(bench_args(data_root, cache_dir, results)) == 0
    before = pd.read_csv(per_image / "ground-truth.csv")
    plugin = tmp_path / "v1" / "mask_mean.py"
    plugin.parent.mkdir()
    plugin.write_text(COUNTING.replace("{v}", "1"))
    with counting_calls(["iou", "mf"]) as calls, plugin_imported(plugin):
        assert main(bench_args(data_root, cache_dir, results, "--plugin", str(plugin))) == 0
        module = sys.modules["maskbench_plugin_mask_mean"]
        assert sum(module.CALLS) == 8 and calls == {"iou": 0, "mf": 0}  # 4 images x 2 methods, the plugin only
    capsys.readouterr()
    after = pd.read_csv(per_image / "ground-truth.csv")
    old = after[after["run_key"].isin(set(before["run_key"]))]
    pd.testing.assert_frame_equal(old.reset_index(drop=True), before.reset_index(drop=True))  # kept as they were
    added = after[~after["run_key"].isin(set(before["run_key"]))]
    assert sorted(added["metric"].value_counts().items()) == [("_complete", 4), ("mask-mean", 4)]

    # without the plugin: nothing is scored, and its rows stay
    with counting_calls(["iou"]) as calls:
        assert main(bench_args(data_root, cache_dir, results)) == 0
        assert calls == {"iou": 0}
    assert all(c["stored"] == 4 for c in summary_counts(capsys.readouterr().out).values())
    pd.testing.assert_frame_equal(pd.read_csv(per_image / "ground-truth.csv"), after)

    # version 2 of the plugin metric: scored again, alone
    plugin2 = tmp_path / "v2" / "mask_mean.py"
    plugin2.parent.mkdir()
    plugin2.write_text(COUNTING.replace("{v}", "2"))
    with counting_calls(["iou"]) as calls, plugin_imported(plugin2):
        assert main(bench_args(data_root, cache_dir, results, "--plugin", str(plugin2))) == 0
        assert sum(sys.modules["maskbench_plugin_mask_mean"].CALLS) == 8 and calls == {"iou": 0}
    again = pd.read_csv(per_image / "ground-truth.csv")
    assert len(again) == len(after)  # the version-1 rows were replaced, not added to
    # each image carries one marker per metric: the tables still count images, not markers
    diag = pd.read_csv(per_image.parent / "diagnostics.csv")
    assert list(diag["images"]) == [4, 4], diag
