"""The shared training machinery of learned methods: caching, frozen classifier, time budget, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mb_testutils import tiny_model

from maskbench.benchmark.errors import MaskbenchError
from maskbench.benchmark.registry import import_plugin
from maskbench.datasets import build_dataset, generate_synthetic
from maskbench.methods import METHODS, MethodContext, build_method

PLUGIN = Path(__file__).resolve().parent / "plugins" / "tiny_learned.py"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic-learned")
    generate_synthetic(root, n_train=48, n_val=16, n_test=8, image_size=32, seed=5)
    return root


def context(data_root, cache, model):
    return MethodContext(model=model, dataset="synthetic",
                         datasets=lambda split: build_dataset("synthetic", root=data_root, split=split),
                         num_classes=6, device=torch.device("cpu"), cache_dir=cache, seed=0, progress=False,
                         classifier_key="test")


def test_train_cache_and_frozen_classifier(data_root, tmp_path):
    import_plugin(str(PLUGIN))
    model = tiny_model(6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = build_method("test-tiny-learned")
    info = method.setup(context(data_root, tmp_path, model))
    assert info["trained_here"] and info["epochs"] == 2 and Path(info["checkpoint"]).is_file()
    # the classifier's weights and BatchNorm running statistics are untouched, and it is still in eval mode
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training
    images = build_dataset("synthetic", root=data_root, split="test")[0].image[None]
    masks = method.explain(model, images, torch.tensor([[0, 3]]))
    assert masks.shape == (1, 2, 32, 32) and masks.min() >= 0 and masks.max() <= 1
    again = build_method("test-tiny-learned")
    info2 = again.setup(context(data_root, tmp_path, model))
    assert not info2["trained_here"]
    torch.testing.assert_close(again.explain(model, images, torch.tensor([[0, 3]])), masks)
    # the time budget stops training early and says so
    budget = build_method("test-tiny-learned", max_train_seconds=0.0, max_epochs=50)
    info3 = budget.setup(context(data_root, tmp_path / "other", model))
    assert info3["stopped"] == "time_budget" and info3["epochs"] == 1 and info3["steps"] == 1


def test_streamed_training_split_equals_in_memory(data_root, tmp_path, monkeypatch):
    """A split too large for memory is read batch by batch; training sees exactly the same batches."""
    import maskbench.datasets.base as base

    import_plugin(str(PLUGIN))
    train = build_dataset("synthetic", root=data_root, split="train")
    idx = torch.tensor([5, 0, 17, 3])
    memory, streamed = base.SplitView(train), base.SplitView(train, max_bytes=0)
    assert memory.in_memory and not streamed.in_memory and len(streamed) == len(train)
    for a, b in zip(memory[idx], streamed[idx], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(memory[2:9], streamed[2:9], strict=True):
        assert torch.equal(a, b)
    model = tiny_model(6)
    first = build_method("test-tiny-learned")
    first.setup(context(data_root, tmp_path / "memory", model))
    monkeypatch.setattr(base, "IN_MEMORY_BYTES", 0)
    second = build_method("test-tiny-learned")
    second.setup(context(data_root, tmp_path / "streamed", model))
    for (k, a), b in zip(first._net.state_dict().items(), second._net.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_training_refuses_an_unfrozen_classifier(data_root, tmp_path):
    import_plugin(str(PLUGIN))
    model = tiny_model(6).train()
    with pytest.raises(MaskbenchError, match="frozen"):
        build_method("test-tiny-learned").setup(context(data_root, tmp_path, model))


def test_train_command_rejects_methods_that_do_not_learn(data_root, tmp_path, capsys):
    from maskbench.benchmark.cli import main

    code = main(["train", "gradcam", "--data-root", str(data_root), "--cache", str(tmp_path), "--no-progress"])
    assert code == 2 and "Not learned methods" in capsys.readouterr().err


def test_distributed_data_parallel_training_on_cpu(data_root, tmp_path):
    """`maskbench train` under torchrun: two CPU processes (gloo) train one network together."""
    assert "test-tiny-learned" in METHODS or import_plugin(str(PLUGIN)) is None
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "maskbench.benchmark", "train", "test-tiny-learned", "--plugin", str(PLUGIN), "--data-root",
           str(data_root), "--cache", str(tmp_path), "--device", "cpu", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    records = list((tmp_path / "learned").glob("test-tiny-learned-*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["world_size"] == 2 and record["epochs"] == 2
    # each process took its half of the 48 training images per epoch: 3 steps of 8 per epoch
    assert record["steps"] == 2 * 3
    assert "trained in" in out.stdout and "world size 2" in out.stdout
