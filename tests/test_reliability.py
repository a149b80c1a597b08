"""Issue 10: a misbehaving plugin, edited code, partial runs and damaged files never change a table silently."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mb_testutils import run_config, tiny_model, tiny_synthetic

from maskbench.benchmark.cli import main
from maskbench.benchmark.guard import ModelGuard
from maskbench.benchmark.runner import run
from maskbench.benchmark.tables import write_tables
from maskbench.core.errors import MaskbenchError
from maskbench.core.provenance import code_hash
from maskbench.core.store import StoredDataError
from maskbench.datasets import generate_synthetic
from maskbench.methods import AttributionMethod, register_method

REPO = Path(__file__).resolve().parent.parent


@register_method("test-touches-model")
class TouchesModel(AttributionMethod):
    """Puts the classifier in train mode and scales a weight in place: what a careless plugin does."""

    family = "plugin"

    def explain(self, model, images, classes, *, batch=None):
        model.train()
        with torch.no_grad():
            next(model.parameters()).mul_(3.0)
        return torch.full((images.shape[0], classes.shape[1], *images.shape[-2:]), 0.5, device=images.device)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory, n_test=12, seed=5)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def config(data_root, cache_dir, results, **kw):
    return run_config(data_root, cache_dir, results, **{"batch_size": 4, "methods": ["gradcam"], **kw})


# ------------------------------------------------------------------------------------------ 1. model guard


def test_guard_detects_and_restores_every_kind_of_change():
    model = tiny_model()
    guard = ModelGuard(model)
    assert guard.changes() == []
    with torch.no_grad():
        model.head.weight[0, 0] += 1e-3
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean.mul_(2.0)
    model.blocks[1].train()
    model.head.bias.requires_grad_(True)
    found = " | ".join(guard.changes())
    assert "values of 2 tensor(s) changed" in found and "head.weight" in found and "running_mean" in found
    assert "train/eval mode of" in found and "blocks.1" in found and "requires_grad of 1 parameter" in found
    guard.restore()
    assert guard.changes() == []
    assert not model.training and not model.head.bias.requires_grad


def test_a_plugin_that_changes_the_model_cannot_change_other_methods_rows(data_root, cache_dir, tmp_path):
    with_bad = run(config(data_root, cache_dir, tmp_path / "a", methods=["test-touches-model", "gradcam"]))
    bad, gradcam = with_bad.summaries
    assert bad.failed == 12 and bad.computed == 0
    assert "method 'test-touches-model' changed the explained classifier during explain" in bad.errors[0]
    assert "train/eval mode" in bad.errors[0] and "values of 1 tensor(s) changed" in bad.errors[0]
    assert gradcam.failed == 0 and gradcam.computed == 12
    shutil.rmtree(Path(cache_dir) / "masks")  # Grad-CAM recomputed alone, not read back from the first run
    alone = run(config(data_root, cache_dir, tmp_path / "b", methods=["gradcam"]))
    assert alone.summaries[0].computed == 12
    a = pd.read_csv(with_bad.run_dir / "per_image" / "gradcam.csv")
    b = pd.read_csv(alone.run_dir / "per_image" / "gradcam.csv")
    pd.testing.assert_frame_equal(a, b)
    assert not (with_bad.run_dir / "per_image" / "test-touches-model.csv").exists() or \
        pd.read_csv(with_bad.run_dir / "per_image" / "test-touches-model.csv").empty


# ---------------------------------------------------------------------------------- 2. code is identity


def _module(tmp_path, name, source):
    import importlib.util

    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


PLUGIN = '''
    """A plugin method."""
    import torch
    from maskbench.methods import AttributionMethod


    class Flat(AttributionMethod):
        """Doc one."""

        def explain(self, model, images, classes, *, batch=None):
            return torch.full((images.shape[0], classes.shape[1], *images.shape[-2:]), VALUE)
    '''


def test_code_hash_follows_code_not_docstrings_or_comments(tmp_path):
    a = _module(tmp_path, "mb_code_a", PLUGIN.replace("VALUE", "0.5"))
    b = _module(tmp_path, "mb_code_b", PLUGIN.replace("VALUE", "0.5").replace("Doc one.", "Doc two.")
                + "    # a comment\n")
    c = _module(tmp_path, "mb_code_c", PLUGIN.replace("VALUE", "0.25"))
    assert code_hash(a.Flat) == code_hash(b.Flat) != code_hash(c.Flat)
    # a built-in method's key follows the helpers it imports from maskbench.methods (normalize_maps in base.py)
    from maskbench.core import provenance
    from maskbench.methods.gradcam import GradCAM

    before = code_hash(GradCAM)
    provenance._module_digest.cache_clear()
    real = provenance._module_digest
    try:
        provenance._module_digest = lambda path: "edited" if path.endswith("methods/base.py") else real(path)
        assert code_hash(GradCAM) != before
    finally:
        provenance._module_digest = real


def test_an_edited_plugin_is_recomputed_and_said(data_root, cache_dir, tmp_path):
    plugin = tmp_path / "flat_plugin.py"
    source = textwrap.dedent(PLUGIN).replace("class Flat", "@register_method('flat')\nclass Flat").replace(
        "import AttributionMethod", "import AttributionMethod, register_method")
    common = [sys.executable, "-m", "maskbench.benchmark", "bench", "--plugin", str(plugin), "--methods", "flat",
              "--data-root", str(data_root), "--cache", str(cache_dir), "--results", str(tmp_path / "res"),
              "--no-progress", "--limit", "3"]
    plugin.write_text(source.replace("VALUE", "0.5"))
    first = subprocess.run(common, capture_output=True, text=True, check=True)
    plugin.write_text(source.replace("VALUE", "0.5").replace("Doc one.", "Edited doc."))
    same = subprocess.run(common, capture_output=True, text=True, check=True)
    plugin.write_text(source.replace("VALUE", "0.25"))
    edited = subprocess.run(common, capture_output=True, text=True, check=True)

    def new_count(out):
        line = next(ln for ln in out.stdout.splitlines() if ln.split()[:1] == ["flat"])
        return int(line.split()[4])  # method images stored cached new ...

    assert new_count(first) == 3 and new_count(same) == 0 and new_count(edited) == 3
    assert "code changed since the stored rows" in edited.stdout and "code changed" not in same.stdout
    rows = pd.read_csv(tmp_path / "res" / "synthetic" / "smallcnn-limit3" / "per_image" / "flat.csv")
    assert rows.loc[rows["metric"] == "mae"].shape[0] == 3  # one set of rows, the edited version's


def test_entry_point_class_without_decorator_is_named_after_the_entry_point(data_root, cache_dir, tmp_path):
    pkg = tmp_path / "mb_ep_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        import torch
        from maskbench.methods import AttributionMethod

        class Flat(AttributionMethod):
            def explain(self, model, images, classes, *, batch=None):
                return torch.full((images.shape[0], classes.shape[1], *images.shape[-2:]), 0.5)
        '''))
    dist = tmp_path / "mb_ep_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mb-ep-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[maskbench.methods]\nep-flat = mb_ep_plugin:Flat\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "maskbench.benchmark", "bench", "--methods", "ep-flat", "--limit", "2",
                    "--data-root", str(data_root), "--cache", str(cache_dir), "--results", str(tmp_path / "res"),
                    "--no-progress"], capture_output=True, text=True, env=env, check=True)
    per_image = tmp_path / "res" / "synthetic" / "smallcnn-limit2" / "per_image"
    assert sorted(p.name for p in per_image.iterdir()) == ["ep-flat.csv", "ep-flat.curves.npz", "ep-flat.json"]
    assert json.loads((per_image / "ep-flat.json").read_text())["method"] == "ep-flat"


# ------------------------------------------------------------------------ 3. one run per results folder


def test_partial_runs_never_write_into_the_full_runs_folder(data_root, cache_dir, tmp_path):
    full = run(config(data_root, cache_dir, tmp_path))
    assert full.run_dir == tmp_path / "synthetic" / "smallcnn"
    before = {p: p.read_bytes() for p in full.run_dir.rglob("*") if p.is_file()}
    part = run(config(data_root, cache_dir, tmp_path, limit=5, methods=["gradcam", "rise"]))
    assert part.run_dir.name == "smallcnn-limit5"
    assert {p: p.read_bytes() for p in full.run_dir.rglob("*") if p.is_file() and p.name != "manifest.json"} == \
        {p: b for p, b in before.items() if p.name != "manifest.json"}
    seg = pd.read_csv(part.run_dir / "segmentation.csv")
    assert (seg["images"] == 5).all() and "5 images" in (part.run_dir / "segmentation.tex").read_text()


def test_a_named_folder_holding_another_run_is_refused_or_replaced(data_root, cache_dir, tmp_path):
    run(config(data_root, cache_dir, tmp_path, limit=4, run_name="mine"))
    with pytest.raises(MaskbenchError, match=r"mine holds another run \(.*images: 4 -> 6"):
        run(config(data_root, cache_dir, tmp_path, limit=6, run_name="mine"))
    replaced = run(config(data_root, cache_dir, tmp_path, limit=6, run_name="mine", overwrite=True))
    assert pd.read_csv(replaced.run_dir / "per_image" / "gradcam.csv")["image_id"].nunique() == 6
    # an automatically named folder whose run differs (here: other data) is left alone, the run goes beside it
    other = tmp_path / "other-data"
    generate_synthetic(other, n_train=96, n_val=24, n_test=12, image_size=32, seed=6)
    auto = run(config(data_root, cache_dir, tmp_path / "auto"))
    moved = run(config(other, cache_dir, tmp_path / "auto"))
    assert moved.run_dir != auto.run_dir and moved.run_dir.name.startswith("smallcnn-")


def test_missing_images_are_counted_as_missing_not_undefined(data_root, cache_dir, tmp_path):
    res = run(config(data_root, cache_dir, tmp_path, methods=["gradcam", "rise"], limit=6))
    per_image = res.run_dir / "per_image"
    rows = pd.read_csv(per_image / "rise.csv", dtype=str)
    gone = sorted(set(rows["image_id"]))[:2]
    kept = rows[~rows["image_id"].isin(gone)]
    kept.to_csv(per_image / "rise.csv", index=False, lineterminator="\n")  # a clean removal of two images
    write_tables(res.run_dir)
    seg = pd.read_csv(res.run_dir / "segmentation.csv").set_index(["statistic", "method"])
    assert seg.loc[("iou", "rise"), "missing"] == 2 and seg.loc[("iou", "rise"), "undefined"] == 0
    assert seg.loc[("iou", "rise"), "images"] == 4 and seg.loc[("iou", "gradcam"), "images"] == 6
    assert "6 images" in (res.run_dir / "segmentation.tex").read_text()


# ------------------------------------------------------------------------------- 4. stored data validated


@pytest.fixture()
def stored(data_root, cache_dir, tmp_path):
    res = run(config(data_root, cache_dir, tmp_path, limit=6))
    path = res.run_dir / "per_image" / "gradcam.csv"
    return res.run_dir, path, path.read_text()


def _same_rows(path, original):
    """The same rows; values equal to float noise (an image re-scored in a batch of another size)."""
    import io

    read = {"dtype": {"image_id": str, "metric": str, "run_key": str}}
    pd.testing.assert_frame_equal(pd.read_csv(path, **read), pd.read_csv(io.StringIO(original), **read),
                                  rtol=1e-5, atol=1e-6)


def _rerun(data_root, cache_dir, run_dir):
    return run(config(data_root, cache_dir, run_dir.parent.parent, limit=6)).summaries[0]


def _lines(text):
    return text.rstrip("\n").split("\n")


def _iou_line(text):
    return next(i for i, ln in enumerate(_lines(text)) if ",iou," in ln)


DAMAGES = {
    "deleted row": (lambda t: "\n".join(ln for i, ln in enumerate(_lines(t)) if i != _iou_line(t)) + "\n",
                    "rows deleted or added"),
    "edited value": (lambda t: "\n".join(ln.replace(ln.split(",")[2], "99999.000000") if i == _iou_line(t) else ln
                                         for i, ln in enumerate(_lines(t))) + "\n", "outside the metric's valid range"),
    "text cell": (lambda t: "\n".join(ln.replace(ln.split(",")[2], "oops") if i == _iou_line(t) else ln
                                      for i, ln in enumerate(_lines(t))) + "\n", "not a number"),
    "duplicated row": (lambda t: t + _lines(t)[_iou_line(t)] + "\n", "duplicate row"),
    "truncated": (lambda t: t[: len(t) // 2], None),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_damaged_rows_are_named_by_tables_and_recomputed_by_bench(stored, data_root, cache_dir, name):
    run_dir, path, original = stored
    damage, why = DAMAGES[name]
    path.write_text(damage(original))
    if why is not None:
        with pytest.raises(StoredDataError, match=rf"{path}:\d+: .*{why}"):
            write_tables(run_dir)
    again = _rerun(data_root, cache_dir, run_dir)
    assert again.from_cache >= 1 and again.computed == 0 and again.from_cache + again.skipped == 6
    assert any("damaged row, recomputed" in w for w in again.warnings) or name == "truncated"
    _same_rows(path, original)  # repaired to the same rows, from the cached masks
    write_tables(run_dir)


def test_a_deleted_rows_file_or_sidecar_is_named_then_restored(stored, data_root, cache_dir):
    run_dir, path, original = stored
    path.unlink()
    with pytest.raises(StoredDataError, match=r"gradcam.csv is missing"):
        write_tables(run_dir)
    assert _rerun(data_root, cache_dir, run_dir).from_cache == 6
    _same_rows(path, original)
    meta = path.with_suffix(".json")
    meta.write_text("{not json")
    with pytest.raises(StoredDataError, match=r"Damaged sidecar .*gradcam.json"):
        write_tables(run_dir)
    assert _rerun(data_root, cache_dir, run_dir).skipped == 6
    assert json.loads(meta.read_text())["method"] == "gradcam"
    meta.unlink()
    with pytest.raises(StoredDataError, match=r"gradcam.json is missing"):
        write_tables(run_dir)


def test_a_damaged_mask_file_costs_one_recomputation(stored, data_root, cache_dir):
    run_dir, path, original = stored
    ident = json.loads((run_dir / "run.json").read_text())
    folder = Path(cache_dir) / "masks" / ident["identity"]["data_key"] / ident["identity"]["classifier_sha256"]
    masks = [next(folder.glob(f"gradcam-*/{ident['image_ids'][0]}.npz"))]
    masks[0].write_bytes(masks[0].read_bytes()[:100])
    path.unlink()
    again = _rerun(data_root, cache_dir, run_dir)
    assert again.computed == 1 and again.from_cache == 5 and again.failed == 0
    assert any("damaged cache file" in w and masks[0].name in w for w in again.warnings)
    _same_rows(path, original)


def test_a_damaged_cached_classifier_is_retrained_and_a_bad_checkpoint_is_named(data_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = run(config(data_root, cache, tmp_path / "res", limit=2))
    ckpt = Path(first.manifest["classifier"]["checkpoint"])
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    again = run(config(data_root, cache, tmp_path / "res", limit=2))
    assert "damaged cached classifier" in capsys.readouterr().err
    assert again.manifest["classifier"]["trained_here"] is True
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["bench", "--checkpoint", str(bad), "--data-root", str(data_root), "--cache", str(cache),
                 "--results", str(tmp_path / "r"), "--methods", "gradcam", "--limit", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"Cannot load the classifier checkpoint {bad}" in err and "Delete it and rerun" in err
    assert len(err.strip().splitlines()) == 1


def test_verify_recomputes_a_run_from_an_empty_cache(data_root, cache_dir, tmp_path):
    from maskbench.benchmark.verify import summary, verify

    res = run(config(data_root, cache_dir, tmp_path / "res", methods=["gradcam", "constant-0.5"], limit=6))
    table, path = verify(res.run_dir, tmp_path / "scratch", progress=False)
    assert path == res.run_dir / "verify.csv" and len(table) > 20
    assert table["within"].all() and table["same"].all(), summary(table)
    assert (tmp_path / "scratch" / "cache" / "classifiers").is_dir()  # the classifier was retrained there
    # a changed stored cell is reported outside its interval
    seg = pd.read_csv(res.run_dir / "segmentation.csv")
    seg.loc[(seg["statistic"] == "iou") & (seg["method"] == "gradcam"), ["value", "ci_low", "ci_high"]] = [1, 0, 2]
    seg.to_csv(res.run_dir / "segmentation.csv", index=False)
    from maskbench.benchmark.verify import compare_tables

    found = compare_tables(res.run_dir, tmp_path / "scratch" / "results" / "synthetic" / res.run_dir.name)
    outside = found[~found["within"]]
    assert list(zip(outside["statistic"], outside["method"], strict=True)) == [("iou", "gradcam")]
    assert "outside: segmentation/iou gradcam" in summary(found)
    assert np.isfinite(found.loc[found["stored"].notna(), "difference"]).all()  # undefined on both: NaN, same


# ------------------------------------------------------- 4b. damaged learned network; 6. shipped classifier


def test_a_damaged_learned_network_costs_one_retraining_not_the_run(data_root, cache_dir, tmp_path, capsys):
    from maskbench.core.registry import import_plugin

    import_plugin(str(REPO / "tests" / "plugins" / "tiny_learned.py"))
    first = run(config(data_root, cache_dir, tmp_path, methods=["test-tiny-learned", "gradcam"], limit=4))
    rows = first.run_dir / "per_image" / "test-tiny-learned.csv"
    before = rows.read_text()
    rows.unlink()
    network = Path(first.summaries[0].setup["checkpoint"])
    network.write_bytes(network.read_bytes()[:50])
    for p in (Path(cache_dir) / "masks").rglob("test-tiny-learned-*"):
        shutil.rmtree(p)  # the masks must be made again, so the network is needed
    again = run(config(data_root, cache_dir, tmp_path, methods=["test-tiny-learned", "gradcam"], limit=4))
    learned, gradcam = again.summaries
    assert "damaged cached network" in capsys.readouterr().err and str(network) in learned.setup["checkpoint"]
    assert learned.failed == 0 and learned.computed == 4 and learned.setup["trained_here"] is True
    assert gradcam.skipped == 4
    _same_rows(rows, before)  # the retrained network (same seed and steps) gives the same rows


def test_a_shipped_classifier_is_used_before_training(data_root, tmp_path, monkeypatch):
    from maskbench.classifiers import base as classifiers

    trained = run(config(data_root, tmp_path / "cache-a", tmp_path / "a", limit=2))
    ckpt = Path(trained.manifest["classifier"]["checkpoint"])
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(ckpt, shipped / ckpt.name)
    shutil.copy(ckpt.with_suffix(".json"), shipped / ckpt.with_suffix(".json").name)
    monkeypatch.setattr(classifiers, "SHIPPED_DIR", shipped)
    fresh = run(config(data_root, tmp_path / "cache-b", tmp_path / "b", limit=2))  # an empty cache, no training
    info = fresh.manifest["classifier"]
    assert info["shipped"] is True and info["trained_here"] is False and info["checkpoint"] == str(shipped /
                                                                                                   ckpt.name)
    assert not (tmp_path / "cache-b" / "classifiers").exists()
    own = run(config(data_root, tmp_path / "cache-b", tmp_path / "b", limit=2, train_classifier=True))
    assert own.manifest["classifier"]["trained_here"] is True and own.run_dir.name == "smallcnn-limit2-retrained"
    (shipped / ckpt.name).write_bytes(b"damaged")
    with pytest.raises(MaskbenchError, match=r"The shipped classifier .* is damaged"):
        run(config(data_root, tmp_path / "cache-c", tmp_path / "c", limit=2))


# --------------------------------------------------------------------------------------- 8. thread policy


def test_thread_policy_uses_the_idle_cores(monkeypatch):
    from maskbench.benchmark import threads

    monkeypatch.delenv("MASKBENCH_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(threads, "busy_cores", lambda interval=0.1: 1.2)
    assert threads.choose_threads("auto") == (1, "2 cores, 1.2 busy with other processes at start")
    monkeypatch.setattr(threads, "busy_cores", lambda interval=0.1: 0.1)
    assert threads.choose_threads("auto")[0] == 2
    monkeypatch.setattr(threads, "busy_cores", lambda interval=0.1: 3.0)
    assert threads.choose_threads("auto")[0] == 1  # never below one
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.choose_threads("auto")[0] == 1
    monkeypatch.setenv("MASKBENCH_THREADS", "3")
    assert threads.choose_threads("auto") == (3, "fixed")
    with pytest.raises(MaskbenchError, match="--threads must be 'auto' or a positive integer, got 0"):
        threads.choose_threads("0")
