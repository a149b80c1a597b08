"""The shared training machinery of learned methods: caching, frozen classifier, time limit (resumption and
DistributedDataParallel training: test_learned_resume.py)."""

import json
from pathlib import Path

import pytest
import torch
from mb_testutils import tiny_model

from maskbench.core.errors import MaskbenchError, TrainingIncomplete
from maskbench.core.registry import import_plugin
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
    # the time limit never yields a shorter training: it saves the progress and raises, nothing is cached
    budget = build_method("test-tiny-learned", max_train_seconds=0.0, max_epochs=50)
    with pytest.raises(TrainingIncomplete, match="after 1 of at most 300 optimiser steps"):
        budget.setup(context(data_root, tmp_path / "other", model))
    assert [p.name.endswith(".progress.pt") for p in (tmp_path / "other" / "learned").iterdir()] == [True]


def test_training_from_scratch_is_deterministic_under_the_seed(data_root, tmp_path):
    """Two trainings from scratch (separate cache folders: nothing to load or resume) with the same seed and
    configuration end with bitwise-identical networks, training records and masks; another seed gives another
    network and other masks. ``test-tiny-learned-noisy`` draws on the training generator (data order, input
    noise), the global generator (dropout) and a learning-rate schedule, so all of them must be seeded. The
    networks moved away from their initialisation: the equality is that of two trainings, not of two untouched
    initial networks."""
    import_plugin(str(PLUGIN))
    model = tiny_model(6)
    test = build_dataset("synthetic", root=data_root, split="test")
    images = torch.stack([test[i].image for i in range(4)])
    classes = torch.tensor([[0, 3], [1, 2], [5, 4], [2, 0]])

    def train(seed, cache):
        # 48 training images in batches of 8: 6 steps per epoch; 8 steps = one epoch and a third
        method = build_method("test-tiny-learned-noisy", seed=seed, max_epochs=2, max_steps=8)
        info = method.setup(context(data_root, tmp_path / cache, model))
        checkpoint = Path(info["checkpoint"])
        assert info["trained_here"] and info["steps"] == 8 and checkpoint.parent == tmp_path / cache / "learned"
        record = json.loads(checkpoint.with_suffix(".json").read_text())
        record.pop("train_seconds")
        return method._net.state_dict(), record, method.explain(model, images, classes)

    net_a, record_a, masks_a = train(42, "a")
    net_b, record_b, masks_b = train(42, "b")
    net_c, _, masks_c = train(43, "c")
    assert net_a.keys() == net_b.keys()
    for k in net_a:
        assert torch.equal(net_a[k], net_b[k]), k
    assert record_a == record_b and record_a["history"]  # per-epoch losses included
    assert torch.equal(masks_a, masks_b)
    assert not any(torch.equal(net_a[k], net_c[k]) for k in net_a)
    assert not torch.equal(masks_a, masks_c)
    torch.manual_seed(42)  # the network setup() builds before training
    initial = build_method("test-tiny-learned-noisy").build_network(6, 32, model).state_dict()
    assert not any(torch.equal(net_a[k], initial[k]) for k in net_a)


def test_the_plugin_file_registers_its_methods(tmp_path):
    """The DDP test in this file once began with ``assert "test-tiny-learned" in METHODS or
    import_plugin(str(PLUGIN)) is None``, always true (import_plugin returns None): it only imported the plugin.
    What it meant to check, before asking a torchrun subprocess for these names: importing the plugin file
    registers its learned methods, from that file; importing it again registers nothing twice; a missing plugin
    file is an error."""
    import_plugin(str(PLUGIN))
    for name in ("test-tiny-learned", "test-tiny-learned-noisy", "test-tiny-learned-noisy-twin"):
        assert name in METHODS, name
        assert METHODS.origin(name) == "maskbench_plugin_tiny_learned", name
        assert METHODS.get(name).family == "learned" and build_method(name).name == name
    import_plugin(str(PLUGIN))  # no "already registered" error
    assert "test-tiny-learned" in METHODS.list("test-*")
    with pytest.raises(MaskbenchError, match="Plugin file not found"):
        import_plugin(str(tmp_path / "missing_plugin.py"))


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
