"""Numbers never depend on speed: a learned method's training always runs its step budget; it saves its progress
every ``checkpoint_every`` steps and when ``max_train_seconds`` runs out (then raises TrainingIncomplete), and a
resumed training ends with exactly the network of an uninterrupted one (methods/learned.py, methods/dgmp.py).

The networks are compared bitwise (``torch.equal`` on every tensor of the state dict) and the training records
(history with the per-epoch mean training losses, best epoch, steps) exactly. ``test-tiny-learned-noisy`` draws
on the training generator (data order, input noise), the global generator (dropout) and a learning-rate
schedule, so a resume that failed to restore any of them would give another network;
``test_the_comparison_detects_a_wrong_resume`` checks that it does."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mb_testutils import tiny_model

import maskbench.methods.learned as learned
from maskbench.core.errors import TrainingIncomplete
from maskbench.core.registry import import_plugin
from maskbench.datasets import build_dataset, generate_synthetic
from maskbench.methods import MethodContext, build_method

PLUGIN = Path(__file__).resolve().parent / "plugins" / "tiny_learned.py"
C = 6
# 48 training images, batch 8: 6 steps per epoch, 3 epochs = 18 steps; progress saved at steps 4, 8, 12 (between
# the second and the third epoch, after the second's validation) and 16
TINY = {"max_epochs": 3, "checkpoint_every": 4}
# DGMP: 48 images, batch 16: 10 filter steps (160 images, 3 permutations), then 2 epochs of 3 decoder steps with
# the learning rate halved every epoch
DGMP = {"max_epochs": 2, "filter_images": 160, "decoder_width": 4, "batch_size": 16, "lr_decay_every": 1,
        "checkpoint_every": 2}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    import_plugin(str(PLUGIN))
    root = tmp_path_factory.mktemp("synthetic-resume")
    generate_synthetic(root, n_train=48, n_val=16, n_test=4, image_size=32, seed=5)
    return root


@pytest.fixture(scope="module")
def model():
    return tiny_model(C)


def context(data_root, cache, model):
    return MethodContext(model=model, dataset="synthetic",
                         datasets=lambda split: build_dataset("synthetic", root=data_root, split=split),
                         num_classes=C, device=torch.device("cpu"), cache_dir=cache, seed=0, progress=False,
                         classifier_key="test")


_REFERENCES: dict[str, tuple[dict[str, torch.Tensor], dict]] = {}


def stored_record(info):
    """The training record stored next to the checkpoint (with the per-epoch history)."""
    return json.loads(Path(info["checkpoint"]).with_suffix(".json").read_text())


def reference(name, params, data_root, model, tmp_path_factory):
    """The network and stored record of an uninterrupted training (computed once per configuration)."""
    key = json.dumps([name, params], sort_keys=True)
    if key not in _REFERENCES:
        method = build_method(name, **params)
        info = method.setup(context(data_root, tmp_path_factory.mktemp("reference"), model))
        _REFERENCES[key] = (method._net.state_dict(), stored_record(info))
    return _REFERENCES[key]


def assert_same_network(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_record(a, b):
    """Training records equal but for times and resumptions; the history (per-epoch validation loss and mean
    training loss terms) included."""
    skip = {"train_seconds", "decoder_seconds", "filter_seconds", "resumed_at_steps"}
    assert "history" in a and "history" in b
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def interrupt_after(method, steps):
    """Make ``method``'s training raise KeyboardInterrupt in its step ``steps + 1``; returns the step counter."""
    original = method.training_loss
    done = {"steps": 0}

    def training_loss(net, model, images, labels, generator=None):
        if net.training:  # a training step (the validation loss runs the network in eval mode)
            if done["steps"] == steps:
                raise KeyboardInterrupt
            done["steps"] += 1
        return original(net, model, images, labels, generator)

    method.training_loss = training_loss
    return done


def progress_files(cache):
    return sorted(p.name for p in (cache / "learned").glob("*.progress.pt"))


def final_files(cache):
    return sorted(p.name for p in (cache / "learned").iterdir() if not p.name.endswith(".progress.pt"))


def progress_path(method, data_root, cache, model):
    return cache / "learned" / f"{method.name}-{method.training_key(context(data_root, cache, model))}.progress.pt"


@pytest.mark.parametrize(("max_steps", "interrupted_after", "saved_at"), [
    (None, 10, 8),  # resumes in the middle of the second epoch
    (None, 13, 12),  # resumes at the start of the third epoch
    (15, 14, 12),  # and stops at max_steps
])
def test_interrupted_training_resumes_to_the_same_network(data_root, model, tmp_path, tmp_path_factory, max_steps,
                                                          interrupted_after, saved_at):
    params = {**TINY, "max_steps": max_steps}
    ref_state, ref_info = reference("test-tiny-learned-noisy", params, data_root, model, tmp_path_factory)
    total = ref_info["steps"]
    assert total == (15 if max_steps else 18) and ref_info["resumed_at_steps"] == []

    first = build_method("test-tiny-learned-noisy", **params)
    interrupt_after(first, interrupted_after)
    with pytest.raises(KeyboardInterrupt):
        first.setup(context(data_root, tmp_path, model))
    # the last periodic progress file is usable; no final checkpoint was written
    assert progress_files(tmp_path) == [progress_path(first, data_root, tmp_path, model).name]
    assert final_files(tmp_path) == []

    second = build_method("test-tiny-learned-noisy", **params)
    counter = interrupt_after(second, 10**6)  # counts the steps only
    info = second.setup(context(data_root, tmp_path, model))
    assert counter["steps"] == total - saved_at  # it went on from the saved step, not from the start
    assert info["trained_here"] and info["resumed_at_steps"] == [saved_at]
    assert_same_network(second._net.state_dict(), ref_state)
    assert_same_record(stored_record(info), ref_info)
    assert progress_files(tmp_path) == []  # deleted once the final checkpoint is written
    assert Path(info["checkpoint"]).is_file()


@pytest.mark.parametrize("broken", ["nothing", "generator", "global"])
def test_the_comparison_detects_a_wrong_resume(data_root, model, tmp_path, tmp_path_factory, monkeypatch, broken):
    """A resume that restores no random state, or only one of the two, ends with another network."""
    ref_state, _ = reference("test-tiny-learned-noisy", TINY, data_root, model, tmp_path_factory)
    first = build_method("test-tiny-learned-noisy", **TINY)
    interrupt_after(first, 10)
    with pytest.raises(KeyboardInterrupt):
        first.setup(context(data_root, tmp_path, model))

    def partial_restore(generator, state, device):
        if broken == "generator":  # restores the global state only
            torch.set_rng_state(state["cpu"])
        elif broken == "global":  # restores the generator only
            generator.set_state(state["generator"])

    monkeypatch.setattr(learned, "set_random_state", partial_restore)
    second = build_method("test-tiny-learned-noisy", **TINY)
    second.setup(context(data_root, tmp_path, model))
    state = second._net.state_dict()
    assert not all(torch.equal(state[k], ref_state[k]) for k in state)


class FakeClock:
    """A wall clock that advances one second every time it is read."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


def train_in_slices(name, params, data_root, model, cache, monkeypatch):
    """Run ``setup`` again and again until the training finishes; returns its record and the messages of the
    TrainingIncomplete raised on the way (every run stops when the fake clock passes max_train_seconds)."""
    monkeypatch.setattr(learned, "clock", FakeClock())
    messages = []
    for _ in range(50):
        method = build_method(name, **params)
        try:
            return method, method.setup(context(data_root, cache, model)), messages
        except TrainingIncomplete as exc:
            messages.append(str(exc))
            assert final_files(cache) == []  # no final checkpoint, no record
            assert len(progress_files(cache)) == 1
    raise AssertionError("the training never finished")


def test_time_limit_saves_progress_and_raises_training_incomplete(data_root, model, tmp_path, tmp_path_factory,
                                                                  monkeypatch):
    ref_state, ref_info = reference("test-tiny-learned-noisy", TINY, data_root, model, tmp_path_factory)
    params = {**TINY, "max_train_seconds": 3.5, "checkpoint_every": None}  # saved only when the time runs out
    method, info, messages = train_in_slices("test-tiny-learned-noisy", params, data_root, model, tmp_path,
                                             monkeypatch)
    assert len(messages) >= 3
    progress = progress_path(method, data_root, tmp_path, model)
    done = []
    for msg in messages:
        m = re.search(r"^test-tiny-learned-noisy: training stopped by max_train_seconds=3.5 after (\d+) of at "
                      r"most 18 optimiser steps; its progress is saved in (\S+)\. Run the same command again to "
                      r"resume it", msg)
        assert m, msg
        assert m.group(2) == str(progress)
        done.append(int(m.group(1)))
    assert done == sorted(done) and 0 < done[0] and done[-1] < 18  # never stopped with no step left
    assert info["resumed_at_steps"] == done  # each run went on where the previous one stopped
    assert_same_network(method._net.state_dict(), ref_state)
    assert_same_record(stored_record(info), ref_info)
    assert progress_files(tmp_path) == []


def test_dgmp_resumes_in_the_filter_stage_and_in_the_decoder(data_root, model, tmp_path, tmp_path_factory,
                                                             monkeypatch):
    ref_state, ref_info = reference("dgmp-cf", {"preset": "fast", **DGMP}, data_root, model, tmp_path_factory)
    assert ref_info["filter_steps"] == 10 and ref_info["steps"] == 6
    params = {"preset": "fast", **DGMP, "max_train_seconds": 5.5}
    method, info, messages = train_in_slices("dgmp-cf", params, data_root, model, tmp_path, monkeypatch)
    stages = [m.split(" stopped")[0] for m in messages]
    assert "dgmp-cf: feature-filter pretraining" in stages and "dgmp-cf: training" in stages
    assert any("of at most 10 optimiser steps" in m for m in messages)
    assert_same_network(method._net.state_dict(), ref_state)
    assert_same_record(stored_record(info), ref_info)  # the filter stage's record (losses, validation loss) included
    assert progress_files(tmp_path) == []


def test_progress_settings_are_not_part_of_the_training_key(data_root, model, tmp_path):
    ctx = context(data_root, tmp_path, model)
    key = build_method("test-tiny-learned").training_key(ctx)
    for params in ({"checkpoint_every": 1}, {"checkpoint_every": None}, {"max_train_seconds": 3.0},
                   {"max_train_seconds": 3.0, "checkpoint_every": 7}):
        assert build_method("test-tiny-learned", **params).training_key(ctx) == key, params
    assert build_method("test-tiny-learned", max_epochs=3).training_key(ctx) != key
    # the presets have a step budget and no wall-clock cap
    for name in ("explainer", "rtis", "dgmp-bf", "dgmp-cf"):
        assert build_method(name, preset="fast").max_train_seconds is None, name


def test_a_checkpoint_cut_short_by_the_former_wall_clock_cap_is_trained_again(data_root, model, tmp_path):
    method = build_method("test-tiny-learned", max_epochs=1)
    info = method.setup(context(data_root, tmp_path, model))
    meta = Path(info["checkpoint"]).with_suffix(".json")
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "stopped": "time_budget"}))
    first = {k: v.clone() for k, v in method._net.state_dict().items()}
    again = build_method("test-tiny-learned", max_epochs=1)
    assert again.setup(context(data_root, tmp_path, model))["trained_here"]
    assert json.loads(meta.read_text())["stopped"] == "max_epochs"
    # trained again from the seeded initial network, not from the cut-short weights: the same network as before
    assert all(torch.equal(first[k], v) for k, v in again._net.state_dict().items())


def test_distributed_training_resumes_from_rank_0s_progress(data_root, tmp_path):
    """`maskbench train` under torchrun: two CPU processes (gloo) train one network together. The time limit
    stops both at the same step, rank 0 saves every process's state, and the resumed training ends with the
    network of an uninterrupted one (its twin, the same training under another name, trained in the same run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(methods, *params):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "maskbench.benchmark", "train", methods, "--plugin", str(PLUGIN), "--data-root", str(data_root),
               "--cache", str(tmp_path), "--device", "cpu", "--no-progress",
               *[a for p in params for a in ("--param", p)]]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    stopped = train("test-tiny-learned-noisy", "max_train_seconds=0")
    assert stopped.returncode != 0
    assert "training stopped by max_train_seconds=0 after 1 of at most 6 optimiser steps" in stopped.stderr
    assert len(progress_files(tmp_path)) == 1 and final_files(tmp_path) == []
    both = train("test-tiny-learned-noisy,test-tiny-learned-noisy-twin")
    assert both.returncode == 0, both.stderr[-3000:]
    assert both.stdout.count("trained in") == 2 and "world size 2" in both.stdout
    records = sorted((tmp_path / "learned").glob("*.json"))  # test-tiny-learned-noisy-<key>, then -twin-<key>
    assert len(records) == 2 and "-twin-" in records[1].name
    a, b = records
    resumed, whole = json.loads(a.read_text()), json.loads(b.read_text())
    assert resumed["resumed_at_steps"] == [1] and whole["resumed_at_steps"] == []
    # each process took its half of the 48 training images per epoch: 3 steps of 8 per epoch, 2 epochs
    assert whole["world_size"] == 2 and whole["epochs"] == 2 and whole["steps"] == 2 * 3
    assert_same_record(resumed, whole)
    assert_same_network(torch.load(a.with_suffix(".pt"), weights_only=True),
                        torch.load(b.with_suffix(".pt"), weights_only=True))
    assert progress_files(tmp_path) == []


def test_the_training_code_is_part_of_the_training_key(data_root, model, tmp_path, monkeypatch):
    """Editing the code that trains a network trains it again: the key holds the class's code hash (the same one
    that keys its masks), so a network cached by earlier code is never reused for new code."""
    from maskbench.methods import learned

    ctx = context(data_root, tmp_path, model)
    method = build_method("test-tiny-learned")
    key = method.training_key(ctx)
    assert build_method("test-tiny-learned").training_key(ctx) == key  # the same code: the same network
    monkeypatch.setattr(learned, "code_hash", lambda cls: "edited-code")
    assert method.training_key(ctx) != key
