"""Bad input is refused before any work starts, with a message naming the value and what is valid; data keys
come from content, never from paths (issue 10, items 5 and 6)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from maskbench.benchmark import preflight
from maskbench.benchmark.cli import main
from maskbench.benchmark.config import RunConfig
from maskbench.core.errors import DataError, InvalidOptionError, MaskbenchError
from maskbench.datasets import COCODataset, VOCDataset, build_dataset, digests, generate_synthetic
from maskbench.datasets.base import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_image_size
from maskbench.datasets.synthetic import SyntheticCOCODataset, SyntheticDataset
from maskbench.methods import METHODS, AttributionMethod, build_method, method_presets
from maskbench.methods.base import HyperparameterError, _annotation_types, check_range

BUILTIN = [n for n in METHODS.list() if METHODS.origin(n).startswith("maskbench.methods.")]
RANGE = f"[{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]"


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic data set (3 test images at 16 px)."""
    return generate_synthetic(tmp_path_factory.mktemp("synth") / "data", n_train=1, n_val=1, n_test=3,
                              image_size=16, seed=2)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Nothing a test here does may reach the user's cache; the digest memo folder is reset around each test."""
    monkeypatch.setenv("MASKBENCH_CACHE", str(tmp_path / "env-cache"))
    digests.set_memo_dir(None)
    yield
    digests.set_memo_dir(None)


# -- data roots ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["synthetic", "synthetic-coco", "voc", "coco"])
def test_a_missing_data_root_is_an_error_and_nothing_is_created(name: str, tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    with pytest.raises(DataError, match="expected") as err:
        build_dataset(name, root=missing)
    assert str(missing) in str(err.value)
    assert not missing.exists() and not (tmp_path / "env-cache").exists()


@pytest.mark.parametrize("name", ["synthetic", "synthetic-coco"])
def test_an_incomplete_synthetic_root_is_refused_and_left_alone(name: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="not a complete synthetic data set") as err:
        build_dataset(name, root=empty)
    assert str(empty) in str(err.value) and "generate-synthetic" in str(err.value)
    assert list(empty.iterdir()) == []


def test_generating_into_a_given_root_is_opt_in(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    ds = build_dataset("synthetic", root=out, generate=True, n_train=1, n_val=1, n_test=2, resolution=16)
    assert isinstance(ds, SyntheticDataset) and len(ds) == 2 and (out / ".complete").is_file()
    assert len(build_dataset("synthetic-coco", root=out)) == 2  # now complete: read as is, no generate needed
    with pytest.raises(InvalidOptionError, match="generate must be True or False, got 'yes'"):
        build_dataset("synthetic", root=tmp_path / "other", generate="yes")
    assert not (tmp_path / "other").exists()


def test_without_a_root_the_synthetic_set_is_still_generated_into_the_cache(tmp_path: Path) -> None:
    ds = build_dataset("synthetic", n_train=1, n_val=1, n_test=2, resolution=16)
    assert Path(ds.root).parent == tmp_path / "env-cache" / "data" and len(ds) == 2


# -- image sizes --------------------------------------------------------------------------------------------------

BAD_SIZES = [0, -64, MIN_IMAGE_SIZE - 1, MAX_IMAGE_SIZE + 1, 2.5, "64", True]


@pytest.mark.parametrize("size", BAD_SIZES)
def test_image_sizes_outside_the_valid_range_are_refused(size: object) -> None:
    with pytest.raises(InvalidOptionError) as err:
        check_image_size(size, "--image-size")
    assert RANGE in str(err.value) and repr(size) in str(err.value) and "--image-size" in str(err.value)
    with pytest.raises(InvalidOptionError, match=rf"\[{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}\]"):
        RunConfig(image_size=size)


def test_valid_image_sizes_pass() -> None:
    for size in (None, MIN_IMAGE_SIZE, 224, MAX_IMAGE_SIZE):
        assert RunConfig(image_size=size).image_size == size


@pytest.mark.parametrize("name", ["synthetic", "synthetic-coco", "voc", "coco"])
def test_builders_refuse_bad_image_sizes_before_any_work(name: str, tmp_path: Path) -> None:
    root = None if name.startswith("synthetic") else tmp_path / "nonexistent"  # the size is checked first
    with pytest.raises(InvalidOptionError, match=r"got 0\b") as err:
        build_dataset(name, root=root, image_size=0)
    assert RANGE in str(err.value)
    assert not (tmp_path / "env-cache").exists()  # no synthetic set was generated into the cache


def test_loaders_and_the_generator_refuse_bad_sizes(synth: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match=RANGE.replace("[", r"\[").replace("]", r"\]")):
        VOCDataset(synth, "test", image_size=8)
    with pytest.raises(InvalidOptionError, match="got 5000"):
        COCODataset(synth, "test", image_size=5000)
    with pytest.raises(InvalidOptionError, match="got 8"):
        generate_synthetic(tmp_path / "g", n_train=1, n_val=0, n_test=0, image_size=8)
    with pytest.raises(InvalidOptionError, match="resolution.*got 9999"):
        build_dataset("synthetic", resolution=9999)
    assert not (tmp_path / "g").exists() and not (tmp_path / "env-cache").exists()
    assert build_dataset("synthetic", root=synth, image_size=MIN_IMAGE_SIZE)[0].image.shape == (3, 16, 16)


# -- the command line ---------------------------------------------------------------------------------------------


def _bench(tmp_path: Path, *args: str) -> list[str]:
    return ["bench", "--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "results"), "--no-progress",
            "--methods", "constant-0", *args]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("maskbench: error:"), err
    return err


def test_cli_image_size_zero_exits_2_with_one_line(synth: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_bench(tmp_path, "--image-size", "0", "--data-root", str(synth))) == 2
    err = _one_line_error(capsys)
    assert "--image-size" in err and "got 0" in err and RANGE in err
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


def test_cli_missing_data_root_exits_2_and_creates_no_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nonexistent"
    assert main(_bench(tmp_path, "--dataset", "synthetic", "--data-root", str(missing))) == 2
    err = _one_line_error(capsys)
    assert str(missing) in err and "expected" in err
    assert not missing.exists() and not (tmp_path / "cache" / "data").exists()


@pytest.mark.parametrize(("param", "shown", "valid"), [
    ("num_masks=0", "num_masks=0", "an int >= 1"),
    ("p=2.0", "p=2.0", "(0, 1)"),
    ("normalize=maybe", "normalize='maybe'", "'minmax', 'none'"),
    ("num_masks=maybe", "num_masks='maybe'", "an int"),
])
def test_cli_bad_hyperparameters_exit_2(param: str, shown: str, valid: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    argv = _bench(tmp_path, "--param", param, "--data-root", str(tmp_path / "nodata"))
    argv[argv.index("constant-0")] = "rise"
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "'rise'" in err and shown in err and valid in err
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()  # refused before any work


# -- method hyperparameters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN)
def test_every_preset_passes_validation(name: str) -> None:
    for preset in method_presets(METHODS.get(name)):
        assert build_method(name, preset=preset).name == name


@pytest.mark.parametrize(("spec", "params", "shown", "valid"), [
    ("rise", {"num_masks": 0}, "num_masks=0", "an int >= 1"),
    ("rise", {"p": 2.0}, "p=2.0", "a number in (0, 1)"),
    ("rise", {"p": 1.0}, "p=1.0", "a number in (0, 1)"),
    ("rise", {"normalize": "maybe"}, "normalize='maybe'", "one of 'minmax', 'none'"),
    ("rise", {"score": "sofmax"}, "score='sofmax'", "did you mean 'softmax'"),
    ("rise", {"batch_size": 0}, "batch_size=0", "an int >= 1 or None"),
    ("gradcam", {"max_batch": 0}, "max_batch=0", ">= 1"),
    ("gradient", {"clip_percentile": 0}, "clip_percentile=0", "(0, 100]"),
    ("smoothgrad", {"samples": 0}, "samples=0", ">= 1"),
    ("integrated-gradients", {"rule": "simpson"}, "rule='simpson'", "riemann_trapezoid"),
    ("extremal-perturbation", {"areas": [0.2, 1.5]}, "areas=[0.2, 1.5]", "fractions in (0, 1)"),
    ("extremal-perturbation", {"jitter": "maybe"}, "jitter='maybe'", "True or False"),
    ("extremal-perturbation", {"levels": 1}, "levels=1", ">= 2"),
    ("igos++", {"iterations": 0}, "iterations=0", ">= 1"),
    ("igos++", {"ls_min_step": 5000.0}, "ls_min_step=5000.0", "<= alpha"),
    ("meaningful-perturbation", {"init": "square"}, "init='square'", "'circle', 'ones'"),
    ("centre-gaussian", {"sigma": 0.0}, "sigma=0.0", "> 0"),
    ("random-uniform", {"seed": -1}, "seed=-1", ">= 0"),
    ("explainer", {"max_steps": 0}, "max_steps=0", ">= 1 or None"),
    ("explainer", {"arch": "unet"}, "arch='unet'", "'small', 'deeplabv3_resnet50'"),
    ("explainer", {"min_area": 0.5, "max_area": 0.3}, "min_area=0.5", "<= max_area"),
    ("explainer", {"pretrained_backbone": "maybe"}, "pretrained_backbone='maybe'", "True or False"),
    ("rtis", {"batch_size": 2.5}, "batch_size=2.5", "an int"),
    ("dgmp-bf", {"mask_scale": 0}, "mask_scale=0", "(0, 1]"),
    ("dgmp-cf", {"eta": -1.0}, "eta=-1.0", "> 0"),
    ("dgmp-cf-ft", {"ft_points": 1}, "ft_points=1", ">= 2"),
])
def test_bad_hyperparameters_are_refused_when_built(spec: str, params: dict, shown: str, valid: str) -> None:
    with pytest.raises(HyperparameterError) as err:
        build_method(spec, **params)
    msg = str(err.value)
    assert f"'{spec}'" in msg and shown in msg and valid in msg, msg
    assert isinstance(err.value, MaskbenchError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("field", ["lr", "max_epochs", "mask_scale", "eta", "ft_points"])
def test_the_post_init_chain_checks_every_level_of_a_learned_method(field: str) -> None:
    """dgmp-cf-ft inherits fields from LearnedMethod, DGMP, DGMPCF and adds its own: each level's checks run."""
    with pytest.raises(HyperparameterError, match=rf"{field}=0 for method 'dgmp-cf-ft'"):
        build_method("dgmp-cf-ft", **{field: 0})


def _fields(name: str) -> list[tuple[str, tuple[type, ...]]]:
    cls = METHODS.get(name)
    return [(f.name, kinds) for f in dataclasses.fields(cls) if (kinds := _annotation_types(f.type))]


@pytest.mark.parametrize("name", BUILTIN)
def test_every_typed_field_of_every_method_is_checked(name: str) -> None:
    """int fields refuse "maybe" and 2.5, bool fields "maybe", str fields an unknown choice, float fields NaN (so
    every number has a range check), and the error names the field."""
    for field, kinds in _fields(name):
        bad: list[object] = []
        if int in kinds:
            bad += ["maybe", 2.5]
        if bool in kinds:
            bad += ["maybe", 1]
        if str in kinds:
            bad += ["no-such-choice", 3]
        if float in kinds:
            bad += [float("nan"), "maybe"]
        for value in bad:
            with pytest.raises(HyperparameterError, match=rf"\b{field}=") as err:
                build_method(name, **{field: value})
            assert f"'{name}'" in str(err.value)


def test_unregistered_subclasses_get_the_type_checks_and_the_helpers() -> None:
    @dataclasses.dataclass
    class Mine(AttributionMethod):
        steps: int = 3
        rate: float | None = None

        def __post_init__(self) -> None:
            super().__post_init__()
            check_range(self, "rate", 0, 1)

    assert Mine().steps == 3 and Mine(rate=0.5).rate == 0.5
    with pytest.raises(HyperparameterError, match=r"steps='3' for method 'Mine': expected an int"):
        Mine(steps="3")
    with pytest.raises(HyperparameterError, match=r"rate=2 for method 'Mine': expected a number in \[0, 1\] or None"):
        Mine(rate=2)


# -- results and cache folders ------------------------------------------------------------------------------------


def test_check_writable_creates_the_folder_and_leaves_no_probe(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    assert preflight.check_writable(target, "the results folder (set with --results)", 1) == target
    assert target.is_dir() and list(target.iterdir()) == []


def test_a_folder_that_is_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MaskbenchError, match="--results") as err:
        preflight.check_writable(blocker / "results", preflight.RESULTS_OPTION, 1)
    assert str(blocker) in str(err.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_an_unwritable_folder_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(MaskbenchError, match=r"Cannot write to the cache folder .*--cache") as err:
            preflight.check_writable(locked, preflight.CACHE_OPTION, 1)
        assert str(locked) in str(err.value)
    finally:
        locked.chmod(0o700)


def test_a_failed_probe_write_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(path: object, data: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(preflight, "atomic_write", denied)
    with pytest.raises(MaskbenchError, match=r"Cannot write to the cache folder .*--cache.*Permission denied") as err:
        preflight.check_writable(tmp_path / "c", preflight.CACHE_OPTION, 1)
    assert str(tmp_path / "c") in str(err.value)


def test_a_nearly_full_disk_is_refused_with_the_free_space_found(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight.shutil, "disk_usage",
                        lambda path: SimpleNamespace(total=10**9, used=10**9 - 5 * 2**20, free=5 * 2**20))
    with pytest.raises(MaskbenchError) as err:
        preflight.check_writable(tmp_path / "cache", preflight.CACHE_OPTION, preflight.MIN_FREE_CACHE_BYTES)
    msg = str(err.value)
    assert "5 MB free" in msg and "200 MB" in msg and "$MASKBENCH_CACHE" in msg and str(tmp_path / "cache") in msg


def test_the_runner_checks_the_folders_before_any_data_is_touched(tmp_path: Path) -> None:
    from maskbench.benchmark.runner import run

    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = RunConfig(methods=["constant-0"], results_dir=str(blocker), cache_dir=str(tmp_path / "cache"),
                    data_root=str(tmp_path / "nodata"), progress=False)
    with pytest.raises(MaskbenchError, match="--results"):  # not the DataError of the missing data root
        run(cfg)


# -- data keys from content ---------------------------------------------------------------------------------------


def _age(root: Path, seconds: float = 3600) -> None:
    """Set every file's modification time into the past (so that its digest may be memoised)."""
    for p in root.rglob("*"):
        if p.is_file():
            st = p.stat()
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


@pytest.mark.parametrize("loader", [SyntheticDataset, SyntheticCOCODataset])
def test_fingerprint_is_the_same_for_a_copy_and_changes_with_one_byte(loader: type, synth: Path,
                                                                      tmp_path: Path) -> None:
    memo = tmp_path / "memo"
    key = loader(synth, "test").fingerprint(memo_dir=memo)
    copy = Path(shutil.copytree(synth, tmp_path / "elsewhere" / "moved"))
    assert loader(copy, "test").fingerprint(memo_dir=memo) == key
    assert loader(copy, "test").fingerprint(memo_dir=tmp_path / "other-memo") == key  # the memo changes nothing
    assert loader(copy, "val").fingerprint(memo_dir=memo) != key
    assert loader(copy, "test", image_size=32).fingerprint(memo_dir=memo) != key

    jpg = copy / "VOCdevkit" / "VOC2007" / "JPEGImages" / f"{loader(copy, 'test').image_ids[1]}.jpg"
    data = bytearray(jpg.read_bytes())
    data[len(data) // 2] ^= 0x01
    jpg.write_bytes(bytes(data))
    assert loader(copy, "test").fingerprint(memo_dir=memo) != key
    assert loader(synth, "test").fingerprint(memo_dir=memo) == key


def test_voc_and_coco_formats_of_the_same_files_have_different_keys(synth: Path, tmp_path: Path) -> None:
    assert SyntheticDataset(synth).fingerprint(tmp_path) != SyntheticCOCODataset(synth).fingerprint(tmp_path)


def test_file_digests_are_memoised_and_a_damaged_memo_is_rebuilt(tmp_path: Path, synth: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = Path(shutil.copytree(synth, tmp_path / "data"))
    _age(data)
    memo_dir = tmp_path / "memo"
    key = SyntheticDataset(data, "test").fingerprint(memo_dir=memo_dir)
    memo = digests.memo_file(data, memo_dir)
    entries = json.loads(memo.read_text())["files"]
    assert len(entries) == 9 and all(str(data) in k for k in entries)  # 3 images x (JPEG, XML, PNG)

    def no_reading(path: object) -> str:
        raise AssertionError(f"{path} was read although its digest is memoised")

    with monkeypatch.context() as m:
        m.setattr(digests, "sha256_file", no_reading)
        assert SyntheticDataset(data, "test").fingerprint(memo_dir=memo_dir) == key

    memo.write_text('{"version": 1, "files": {"broken')  # damaged: ignored, then rebuilt
    assert SyntheticDataset(data, "test").fingerprint(memo_dir=memo_dir) == key
    assert len(json.loads(memo.read_text())["files"]) == 9

    png = data / "VOCdevkit" / "VOC2007" / "SegmentationClass" / f"{SyntheticDataset(data).image_ids[0]}.png"
    st = png.stat()
    png.write_bytes(png.read_bytes()[:-1] + bytes([png.read_bytes()[-1] ^ 0xFF]))
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # modified, still in the past: memoised again
    assert SyntheticDataset(data, "test").fingerprint(memo_dir=memo_dir) != key


def test_the_memo_goes_to_the_runs_cache(tmp_path: Path) -> None:
    preflight.check_run_folders(tmp_path / "results", tmp_path / "run-cache")
    try:
        assert digests.memo_dir() == tmp_path / "run-cache"
    finally:
        digests.set_memo_dir(None)
    assert digests.memo_dir() == tmp_path / "env-cache"


def test_param_is_scoped_to_a_method_or_to_the_methods_that_have_it() -> None:
    from maskbench.benchmark.runner import build_methods

    def built(methods: list[str], params: dict[str, object]) -> dict[str, object]:
        return {m.name: m for m in build_methods(RunConfig(methods=methods, method_params=params))}

    both = built(["rise", "smoothgrad", "gradcam"], {"rise.num_masks": 4000, "seed": 7})
    assert both["rise"].num_masks == 4000 and both["smoothgrad"].seed == 7 and both["rise"].seed == 7
    assert both["smoothgrad"].samples == build_method("smoothgrad", preset="fast").samples
    plain = built(["rise", "gradcam"], {"num_masks": 500})  # gradcam has no num_masks: left alone, no error
    assert plain["rise"].num_masks == 500
    with pytest.raises(MaskbenchError, match=r"no method of this run has a hyperparameter 'num_masks'"):
        built(["gradcam", "gradient"], {"num_masks": 500})
    with pytest.raises(MaskbenchError, match=r"Unknown method of --param rsie.num_masks 'rsie'.*Did you mean: rise"):
        built(["rise", "gradcam"], {"rsie.num_masks": 500})
    with pytest.raises(MaskbenchError, match=r"Invalid hyperparameter num_masks=0 for method 'rise'"):
        built(["rise", "gradcam"], {"rise.num_masks": 0})
