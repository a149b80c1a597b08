"""The measuring parts of ``maskbench perf`` on cases with known answers (the timed runs themselves are not
unit-tested: timings belong in ``make perf``, not in tests)."""

import pytest
import torch
from mb_testutils import tiny_model

from maskbench.benchmark.perf import PassRecorder, pearson, replay, spearman, timed, top_area_iou
from maskbench.methods import build_method


def test_rank_and_linear_correlation():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[10.0, 20.0, 30.0, 1000.0], [4.0, 3.0, 2.0, 1.0]])
    torch.testing.assert_close(spearman(a, b), torch.tensor([1.0, -1.0], dtype=torch.float64))
    r = pearson(a, b)
    assert r[0] < 0.9 and r[1] == pytest.approx(-1.0)  # monotone but not linear
    assert torch.isnan(pearson(torch.ones(1, 4), a[:1]))[0]  # a constant map has no correlation


def test_top_area_iou():
    a = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 4.0, 3.0, 2.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    # top 40 %: {0, 1, 2, 3} vs {4, 1, 2, 3}: 3 shared of 5
    assert float(top_area_iou(a, b, 0.4)) == pytest.approx(3 / 5)
    assert float(top_area_iou(a, a, 0.2)) == 1.0


def test_pass_recorder_counts_every_call_and_replay_runs_them():
    model = tiny_model(4)
    rec = PassRecorder(model)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([[0, 1], [1, 2], [3, 0]])
    build_method("gradient").explain(rec, images, classes)
    assert rec.calls == [(6, True)]  # one batched pass over the 3 x 2 (image, class) pairs, with a backward
    rec.calls.clear()
    build_method("rise", num_masks=40, batch_size=30).explain(rec, images, classes)
    assert rec.calls == [(30, False)] * 4  # 3 images x 40 masks in chunks of 10 masks, no gradient
    seconds = replay(model, [(6, True), (30, False)], (3, 32, 32), torch.device("cpu"))
    assert seconds > 0
    assert all(not p.requires_grad for p in model.parameters())


def test_timed_returns_the_result():
    seconds, peak, out = timed(lambda: torch.ones(1000).sum(), torch.device("cpu"))
    assert out == 1000 and seconds >= 0 and peak == peak  # peak is a number (not NaN) where /proc exists


def test_reference_gradcam_agrees_with_ours_when_installed():
    pytest.importorskip("pytorch_grad_cam")
    from maskbench.benchmark.perf import agreement, ref_gradcam

    model = tiny_model(4)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([[0], [2]])
    ours = build_method("gradcam").explain(model, images, classes)
    ref = ref_gradcam(model, images, classes, plusplus=False)
    assert agreement(ours, ref)["pearson"] > 0.99
