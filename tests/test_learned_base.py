"""The shared training machinery of learned methods: caching, frozen classifier, time limit (resumption and
DistributedDataParallel training: test_learned_resume.py)."""

from pathlib import Path

import pytest
import torch
from mb_testutils import tiny_model

from maskbench.benchmark.errors import MaskbenchError, TrainingIncomplete
from maskbench.benchmark.registry import import_plugin
from maskbench.datasets import build_dataset, generate_synthetic
from maskbench.methods import MethodContext, build_method

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
    # the time limit never yields a shorter training: it saves the progress and raises, nothing is cached
    budget = build_method("test-tiny-learned", max_train_seconds=0.0, max_epochs=50)
    with pytest.raises(TrainingIncomplete, match="after 1 of at most 300 optimiser steps"):
        budget.setup(context(data_root, tmp_path / "other", model))
    assert [p.name.endswith(".progress.pt") for p in (tmp_path / "other" / "learned").iterdir()] == [True]


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
