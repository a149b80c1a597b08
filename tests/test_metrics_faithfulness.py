"""Faithfulness metrics (DGMP eq. 8 M_F, clipped M_F, RISE insertion / deletion) on models with known answers."""

import math

import pytest
import torch
from mb_testutils import make_batch, tiny_model
from torch import nn

import maskbench.metrics.faithfulness as faith
from maskbench.core.images import gaussian_blur, scaled_sigma
from maskbench.metrics.base import METRICS, MetricInputs
from maskbench.metrics.faithfulness import faithfulness_scores, reveal_fractions

H = W = 32
NAMES = ("mf", "mf_clipped", "insertion", "deletion")


# ---------------------------------------------------------------------------------------------------------------
# helpers and known-answer models


class FixedLogits(nn.Module):
    """Logits independent of the input: every curve is flat at sigmoid(logit)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


class RevealMeter(nn.Module):
    """Measures how far an input has moved from ``start`` towards ``image``: per pixel the least-squares r in
    z = start + r (image - start), averaged over pixels, i.e. the revealed fraction f (exact for a reveal whose
    sum is f * H * W). Class ``cls`` gets probability ``prob(f)``, the other classes logit 0."""

    def __init__(self, image, start, prob, cls=0, num_classes=4):
        super().__init__()
        self.image, self.start, self.prob, self.cls, self.num_classes = image, start, prob, cls, num_classes

    def forward(self, z):
        d = self.image - self.start
        r = ((z - self.start) * d).sum(1) / (d * d).sum(1)
        f = r.flatten(1).mean(1).clamp(0, 1)
        q = self.prob(f)
        out = torch.zeros(z.shape[0], self.num_classes)
        out[:, self.cls] = torch.log(q / (1 - q))
        return out


def region(r0, c0, size=8):
    m = torch.zeros(H, W)
    m[r0 : r0 + size, c0 : c0 + size] = 1
    return m


R0, R1 = region(0, 0), region(16, 16)  # each 1/16 of the image


class RegionNet(nn.Module):
    """logit_c = gain * (mean over region c of the channel-mean of z^2 - bias); a class with region None gets
    logit 0. Only the region's pixels matter, and its high-frequency content is what the blur removes."""

    def __init__(self, regions, gain=6.0, bias=0.6):
        super().__init__()
        self.regions, self.gain, self.bias = regions, gain, bias

    def forward(self, z):
        e = (z * z).mean(1)
        cols = []
        for reg in self.regions:
            if reg is None:
                cols.append(torch.zeros(z.shape[0]))
            else:
                cols.append(self.gain * ((e * reg).sum((1, 2)) / reg.sum() - self.bias))
        return torch.stack(cols, 1)


def checker_image(regions=(R0, R1)):
    """Checkerboard +-1 inside the regions, 0 (the mean colour) elsewhere."""
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    chk = ((ii + jj) % 2 * 2 - 1).float()
    inside = torch.stack(regions).amax(0)
    return (chk * inside).expand(3, H, W)[None].clone()


def textured_image(seed=3):
    """Every pixel far from both blurs and from 0, so RevealMeter is well conditioned."""
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    chk = ((ii + jj) % 2 * 2 - 1).float()
    mag = 1 + 0.5 * torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(seed))
    return chk * mag


def blur_mf(x):
    return gaussian_blur(x, scaled_sigma(10.0, x.shape[-1]), 4.0, "constant")


def blur_ins(x):
    return gaussian_blur(x, scaled_sigma(5.0, x.shape[-1]), 1.0, "constant")


def tied_map(b=1, k=1, seed=0):
    """Random maps quantised like the float16 cache, with many exact ties."""
    m = torch.rand(b, k, H, W, generator=torch.Generator().manual_seed(seed))
    return (m * 8).floor().half().float() / 8


def score(model, images, masks, labels, classes, ids=None):
    batch = make_batch(labels, torch.zeros(images.shape[0], 4, H, W), images=images)
    if ids is not None:
        batch.image_ids = list(ids)
    inputs = MetricInputs(model, images, masks, torch.as_tensor(classes), batch)
    return {n: METRICS.get(n).fn(inputs) for n in NAMES}, inputs


# ---------------------------------------------------------------------------------------------------------------
# tie-aware reveal


def test_distinct_scores_reveal_exactly_the_top_n():
    p = 7 * 9
    scores = torch.randperm(p, generator=torch.Generator().manual_seed(0)).float().view(1, 7, 9)
    fr = torch.tensor([0.0, 0.1, 0.5, 0.77, 1.0])
    r = reveal_fractions(scores, fr)
    assert r.shape == (1, 5, 7, 9)
    for s, f in enumerate(fr.tolist()):
        n = round(f * p)
        assert torch.equal(r[0, s], (scores[0] >= p - n).float())
    # with distinct scores the seed changes nothing
    assert torch.equal(reveal_fractions(scores, fr, seeds=[123]), r)


def test_tie_group_straddling_the_threshold_is_cut_by_the_seeded_order():
    s = torch.zeros(16)
    s[[2, 5, 11]] = 5.0  # 3 on top
    s[[0, 7, 8, 14]] = 2.0  # 4 tied below them, 9 zeros
    top, tie, low = s == 5, s == 2, s == 0
    chosen = set()
    for seed in range(20):
        r = reveal_fractions(s.view(1, 4, 4), [6 / 16, 8 / 16, 3 / 16, 0.0], seeds=[seed]).view(4, 16)
        assert r[0, top].sum() == 3 and r[0, tie].sum() == 3 and r[0, low].sum() == 0  # 6 = 3 above + 3 of 4 tied
        assert r[1, top | tie].sum() == 7 and r[1, low].sum() == 1
        assert torch.equal(r[2], top.float()) and torch.equal(r[3], torch.zeros(16))
        chosen.add(tuple(torch.nonzero(r[0, tie] == 0).flatten().tolist()))
    assert len(chosen) == 4  # which tied pixel is left out depends on the seed only


def test_constant_map_is_revealed_in_a_seeded_random_order():
    fr = torch.arange(33) / 32
    maps = torch.full((2, 4, 8), 0.25).half()
    r = reveal_fractions(maps, fr, seeds=[7, 7])
    assert set(r.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(r[0], r[1])  # same seed, same order
    assert torch.equal(reveal_fractions(maps, fr, seeds=[7, 7]), r)  # and every time
    assert not torch.equal(reveal_fractions(maps[:1], fr, seeds=[8])[0], r[0])
    for s, f in enumerate(fr.tolist()):
        assert r[0, s].sum().item() == round(f * 32)
    # over many seeds every pixel comes first equally often: no top-left (row-major) bias
    half = torch.stack([reveal_fractions(maps[:1], [0.5], seeds=[sd])[0, 0] for sd in range(400)]).mean(0)
    assert half[:2].mean().item() == pytest.approx(0.5, abs=0.06) and half[2:].mean().item() == pytest.approx(
        0.5, abs=0.06)


def test_reveal_sums_to_the_rounded_count_and_nan_ranks_last():
    maps = tied_map(3, 2).view(6, H, W)
    maps[0] = 0.5  # constant
    maps[1, :4] = float("nan")  # NaN ranks last
    fr = torch.linspace(0, 1, 29)
    r = reveal_fractions(maps[:, :7, :9], fr, seeds=range(6))  # odd-sized crop
    counts = torch.round(fr.double() * 63)
    assert torch.equal(r.sum((2, 3)).double(), counts.expand(6, -1))
    assert set(r.unique().tolist()) <= {0.0, 1.0}
    nan_rows = r[1, :, :4].flatten(1).sum(1)  # the 36 NaN pixels of the crop come after the 27 others
    assert torch.equal(nan_rows, (counts - 27).clamp(min=0).float())


def test_tie_seed_depends_on_image_and_class_only():
    assert faith.tie_seed("img7", 3) == faith.tie_seed("img7", 3)
    assert len({faith.tie_seed("img7", 3), faith.tie_seed("img7", 4), faith.tie_seed("img8", 3)}) == 3


def test_reveal_chunking_gives_the_same_answer(monkeypatch):
    maps = tied_map(2, 3).view(6, H, W)
    fr = torch.arange(33) / 32
    whole = reveal_fractions(maps, fr)
    monkeypatch.setattr(faith, "CHUNK_BYTES", 1)
    assert torch.equal(reveal_fractions(maps, fr), whole)


# ---------------------------------------------------------------------------------------------------------------
# M_F (DGMP eq. 8) and its clipped form


@pytest.mark.parametrize("power", [1, 2])
def test_mf_closed_form_when_q_is_a_power_of_the_revealed_fraction(power):
    x = textured_image()
    model = RevealMeter(x, blur_mf(x), lambda f: 0.1 + 0.8 * f**power)
    s, _ = score(model, x, tied_map(), [[0]], [[0]])
    # q_k = 0.1 + 0.8 (k/32)^p, q_F = 0.1, q_O = 0.9; right Riemann sum over k = 1..32
    clipped = 100 * sum((k / 32) ** power for k in range(1, 33)) / 32  # p = 1: 51.5625, p = 2: 34.912...
    eq8 = clipped + 100 * 0.1 / 0.8  # the map-independent floor q_F / (q_O - q_F)
    assert s["mf_clipped"].item() == pytest.approx(clipped, abs=1e-3)
    assert s["mf"].item() == pytest.approx(eq8, abs=1e-3)


def test_curve_helpers_by_hand():
    # q_F = 0.2, q_O = 0.6, gap 0.4; interior 0.8 overshoots q_O, 0.1 undershoots q_F; Delta = 1/4
    curve = torch.tensor([[0.2, 0.8, 0.1, 0.4, 0.6], [0.5, 0.5, 0.5, 0.5, 0.53]])
    assert faith.mf_eq8(curve)[0].item() == pytest.approx(100 * (0.8 + 0.1 + 0.4 + 0.6) / 0.4 / 4)
    assert faith.mf_clipped(curve)[0].item() == pytest.approx(100 * (1 + 0 + 0.5 + 1) / 4)
    assert torch.isnan(faith.mf_eq8(curve)[1]) and torch.isnan(faith.mf_clipped(curve)[1])  # gap 0.03 < 0.05
    assert faith.auc_trapezoid(curve)[0].item() == pytest.approx(100 * (0.8 + 0.1 + 0.4 + 0.1 + 0.3) / 4)


def test_mf_clipped_clamps_a_non_monotone_curve():
    x = textured_image()

    def prob(f):
        return (0.2 + 0.5 * f + 0.5 * torch.sin(3 * math.pi * f)).clamp(0.01, 0.99)

    s, _ = score(RevealMeter(x, blur_mf(x), prob), x, tied_map(), [[0]], [[0]])
    q = [float(prob(torch.tensor(k / 32))) for k in range(33)]
    gap = q[-1] - q[0]
    assert max(q) > q[-1] and min(q) < q[0]  # overshoots both ends
    clipped = 100 * sum(min(1.0, max(0.0, (qk - q[0]) / gap)) for qk in q[1:]) / 32
    assert s["mf_clipped"].item() == pytest.approx(clipped, abs=1e-3)
    assert s["mf"].item() == pytest.approx(100 * sum(q[1:]) / gap / 32, abs=1e-3)


@pytest.mark.parametrize("gap, defined", [(0.04, False), (0.06, True)])
def test_mf_is_undefined_below_the_min_gap(gap, defined):
    x = textured_image()
    model = RevealMeter(x, blur_mf(x), lambda f: 0.5 + gap * f)
    s, _ = score(model, x, tied_map(), [[0]], [[0]])
    assert math.isnan(s["mf"].item()) != defined and math.isnan(s["mf_clipped"].item()) != defined
    if defined:  # linear in f: clipped = 100 * sum k / 32^2
        assert s["mf_clipped"].item() == pytest.approx(51.5625, abs=0.05)


def test_fixed_logits_give_nan_mf_and_flat_auc():
    x = textured_image()
    logits = [0.3, -1.0, 2.0, 0.0]
    s, _ = score(FixedLogits(logits), x, tied_map(), [[0]], [[0]])
    assert math.isnan(s["mf"].item()) and math.isnan(s["mf_clipped"].item())
    q = torch.sigmoid(torch.tensor(0.3)).item()
    assert s["insertion"].item() == pytest.approx(100 * q, abs=1e-4)
    assert s["deletion"].item() == pytest.approx(100 * q, abs=1e-4)


def test_mf_known_answer_for_a_region_map():
    model = RegionNet([R0, R1])
    x = checker_image()
    s, inputs = score(model, x, R0[None, None].clone(), [[0]], [[0]])
    # by hand: reveal k*32 of the 1024 pixels; the 64 tied pixels of R0 come first (in the seeded order of
    # image "img0", class 0), then the 960 tied others
    ranks = faith.pixel_ranks(R0.view(1, -1), [faith.tie_seed("img0", 0)]).view(H, W)
    assert ranks[R0 > 0].max() == 63 and ranks[R0 == 0].min() == 64
    a = blur_mf(x)
    rs = [(ranks < 32 * k).float() for k in range(33)]
    q = torch.sigmoid(model(a + torch.stack(rs)[:, None] * (x - a))[:, 0])
    gap = q[-1] - q[0]
    assert gap > 0.5
    eq8 = 100 * (q[1:] / gap).sum() / 32
    clipped = 100 * ((q[1:] - q[0]) / gap).clamp(0, 1).sum() / 32
    assert s["mf"].item() == pytest.approx(eq8.item(), rel=1e-5)
    assert s["mf_clipped"].item() == pytest.approx(clipped.item(), rel=1e-5)
    assert torch.allclose(faithfulness_scores(inputs).curves["mf"][0, 0], q, atol=1e-6)
    assert s["mf_clipped"].item() > 95


def test_region_first_beats_region_last():
    model = RegionNet([R0, R1])
    x = checker_image()
    good, _ = score(model, x, R0[None, None].clone(), [[0]], [[0]])
    bad, _ = score(model, x, (1 - R0)[None, None].clone(), [[0]], [[0]])
    assert good["mf_clipped"].item() > 95 and bad["mf_clipped"].item() < 10
    assert good["mf"].item() > bad["mf"].item() + 50
    assert good["insertion"].item() > bad["insertion"].item() + 30
    assert good["deletion"].item() < bad["deletion"].item() - 30


def test_each_class_is_scored_with_its_own_mask():
    model = RegionNet([R0, R1])
    x = checker_image()
    right, inputs = score(model, x, torch.stack([R0, R1])[None], [[0, 1]], [[0, 1]])
    swapped, _ = score(model, x, torch.stack([R1, R0])[None], [[0, 1]], [[0, 1]])
    slot = faithfulness_scores(inputs).per_slot["mf_clipped"][0]
    assert (slot > 95).all()
    assert right["mf_clipped"].item() == pytest.approx(slot.mean().item())
    assert swapped["mf_clipped"].item() < 60


# ---------------------------------------------------------------------------------------------------------------
# RISE insertion / deletion


def test_insertion_and_deletion_trapezoid_closed_form():
    x = textured_image()
    n = H  # W pixels per step -> H steps
    trap = (sum((k / n) ** 2 for k in range(n + 1)) - 0.5) / n  # trapezoid of f^2 on [0, 1] with n steps
    expected = 100 * (0.1 + 0.8 * trap)
    assert expected != pytest.approx(100 * (0.1 + 0.8 / 3), abs=0.01)  # differs from the exact integral
    ins, _ = score(RevealMeter(x, blur_ins(x), lambda f: 0.1 + 0.8 * f**2), x, tied_map(), [[0]], [[0]])
    assert ins["insertion"].item() == pytest.approx(expected, abs=1e-3)
    # deletion towards 0: the meter started at 0 measures the kept fraction 1 - k/n; same area by symmetry
    dele, _ = score(RevealMeter(x, torch.zeros_like(x), lambda f: 0.1 + 0.8 * f**2), x, tied_map(), [[0]], [[0]])
    assert dele["deletion"].item() == pytest.approx(expected, abs=1e-3)


def test_good_map_beats_its_inverse_on_a_small_cnn():
    torch.manual_seed(0)
    model = tiny_model(4)
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(2))
    x.requires_grad_(True)
    model(x)[0, 1].backward()
    sal = (x.grad * x).sum(1).detach()  # gradient x input for class 1
    x = x.detach()
    good, _ = score(model, x, sal[:, None], [[1]], [[1]])
    bad, _ = score(model, x, -sal[:, None], [[1]], [[1]])
    assert good["deletion"].item() < bad["deletion"].item()
    assert good["insertion"].item() > bad["insertion"].item()


# ---------------------------------------------------------------------------------------------------------------
# aggregation, batching, caching, registry


def test_mean_over_true_classes_duplicates_once_and_nan_without_true_class():
    logits = [0.3, -1.0, 2.0, 0.5]
    q = torch.sigmoid(torch.tensor(logits))
    x = textured_image().expand(4, -1, -1, -1).clone()
    classes = [[0, 2, 0], [1, 3, 1], [0, 1, 0], [0, 0, 0]]
    labels = [[0, 2], [1], [3], []]
    s, _ = score(FixedLogits(logits), x, tied_map(4, 3), labels, classes)
    ins = s["insertion"]
    assert ins[0].item() == pytest.approx(100 * (q[0] + q[2]).item() / 2, abs=1e-4)  # class 0 counted once
    assert ins[1].item() == pytest.approx(100 * q[1].item(), abs=1e-4)  # class 3 is not a true class
    assert math.isnan(ins[2].item()) and math.isnan(ins[3].item())
    assert torch.isnan(s["mf"]).all()


def test_image_mean_skips_undefined_classes():
    model = RegionNet([R0, None, None, None])  # class 1: flat, so its M_F is undefined
    x = checker_image()
    both, inputs = score(model, x, torch.stack([R0, R1])[None], [[0, 1]], [[0, 1]])
    alone, _ = score(model, x, R0[None, None].clone(), [[0]], [[0]])
    slot = faithfulness_scores(inputs).per_slot
    assert math.isnan(slot["mf"][0, 1].item()) and not math.isnan(slot["insertion"][0, 1].item())
    assert both["mf"].item() == pytest.approx(alone["mf"].item())
    assert both["mf_clipped"].item() == pytest.approx(alone["mf_clipped"].item())
    assert both["insertion"].item() == pytest.approx((alone["insertion"].item() + 50) / 2, rel=1e-5)


def test_batch_and_chunking_do_not_change_values(monkeypatch):
    model = tiny_model(4)
    x = torch.randn(3, 3, H, W, generator=torch.Generator().manual_seed(4))
    masks = tied_map(3, 2, seed=1)
    labels, classes = [[0, 2], [1], [1, 3]], [[0, 2], [1, 1], [3, 1]]
    whole, _ = score(model, x, masks, labels, classes)
    for i in range(3):
        one, _ = score(model, x[i : i + 1], masks[i : i + 1], [labels[i]], [classes[i]], ids=[f"img{i}"])
        for n in NAMES:
            assert torch.allclose(one[n], whole[n][i : i + 1], atol=1e-4, equal_nan=True), n
    monkeypatch.setattr(faith, "CHUNK_BYTES", 40 * H * W * 30)  # a few rows per chunk: slots and steps split
    chunked, _ = score(model, x, masks, labels, classes)
    for n in NAMES:
        assert torch.allclose(chunked[n], whole[n], atol=1e-4, equal_nan=True), n
    assert not torch.isnan(whole["insertion"]).any()


class CountingModel(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.model(x)


def test_four_metrics_share_one_computation():
    model = CountingModel(RegionNet([R0, R1, None, None]))
    x = checker_image().expand(2, -1, -1, -1).clone()
    masks = torch.stack([R0, R1, R0])[None].expand(2, -1, -1, -1).clone()
    batch = make_batch([[0, 1], [2]], torch.zeros(2, 4, H, W), images=x)
    inputs = MetricInputs(model, x, masks, torch.tensor([[0, 1, 0], [2, 2, 2]]), batch)
    METRICS.get("mf").fn(inputs)
    # endpoints 3 B + 1; M_F interior 31 per defined slot (classes 0, 1; class 2 is flat); RISE 2 (H - 1) per slot
    expected = 3 * 2 + 1 + 31 * 2 + 2 * (H - 1) * 3
    assert model.rows == expected
    for n in NAMES[1:]:
        METRICS.get(n).fn(inputs)
    assert model.rows == expected
    inputs.masks.mul_(0.5)  # modified in place: recomputed
    METRICS.get("deletion").fn(inputs)
    assert model.rows == 2 * expected


def test_registry_entries():
    want = {
        "mf": (True, "M_F (eq. 8)"),
        "mf_clipped": (True, "M_F clipped"),
        "insertion": (True, "Insertion"),
        "deletion": (False, "Deletion"),
    }
    for name, (hib, label) in want.items():
        spec = METRICS.get(name)
        assert (spec.higher_is_better, spec.label, spec.table) == (hib, label, "faithfulness")


# ---------------------------------------------------------------------------------------------------------------
# stored curves (figures)


def curves_of(inputs):
    out = METRICS.get("curves").fn(inputs)
    return {n: y for n, y in out.y.items()}, out.x


def test_stored_curves_are_the_measured_curves_and_their_areas_the_scores():
    """At 32 px RISE's grid (W pixels per step) is k/32: the stored insertion curve is q(f) = 0.1 + 0.8 f^2 at
    f = k/32 exactly (the meter reads the revealed fraction), its trapezoid is the insertion score, and the
    normalised M_F curve's right Riemann sum is M_F clipped."""
    x = textured_image()
    f = torch.arange(33, dtype=torch.float64) / 32
    ins, inputs = score(RevealMeter(x, blur_ins(x), lambda v: 0.1 + 0.8 * v**2), x, tied_map(), [[0]], [[0]])
    ys, xs = curves_of(inputs)
    assert set(ys) == {"insertion", "deletion", "mf"} and all(torch.equal(v.cpu(), f) for v in xs.values())
    torch.testing.assert_close(ys["insertion"][0].double(), 0.1 + 0.8 * f**2, atol=2e-4, rtol=0)
    area = 100 * (ys["insertion"][0].sum() - ys["insertion"][0, 0] / 2 - ys["insertion"][0, -1] / 2) / 32
    assert area.item() == pytest.approx(ins["insertion"].item(), abs=1e-4)
    mf, inputs = score(RevealMeter(x, blur_mf(x), lambda v: 0.2 + 0.6 * v**3), x, tied_map(), [[0]], [[0]])
    ys, _ = curves_of(inputs)
    torch.testing.assert_close(ys["mf"][0].double(), f**3, atol=2e-4, rtol=0)  # (q - q_F) / (q_O - q_F)
    assert (100 * ys["mf"][0, 1:].mean()).item() == pytest.approx(mf["mf_clipped"].item(), abs=1e-4)


def test_curves_average_the_true_classes_and_are_nan_without_one():
    """FixedLogits: every curve is flat at q of its class; an image's curve is the mean over its true classes
    (a repeated class once), NaN without a true class; M_F is undefined for flat curves (gap 0): NaN."""
    logits = [0.3, -1.0, 2.0, 0.5]
    q = torch.sigmoid(torch.tensor(logits))
    x = textured_image().expand(3, -1, -1, -1).clone()
    _, inputs = score(FixedLogits(logits), x, tied_map(3, 3), [[0, 2], [1], []], [[0, 2, 0], [1, 3, 1], [0, 0, 0]])
    ys, _ = curves_of(inputs)
    for name in ("insertion", "deletion"):
        torch.testing.assert_close(ys[name][0], torch.full((33,), ((q[0] + q[2]) / 2).item()), atol=1e-6, rtol=0)
        torch.testing.assert_close(ys[name][1], torch.full((33,), q[1].item()), atol=1e-6, rtol=0)
        assert torch.isnan(ys[name][2]).all()
    assert torch.isnan(ys["mf"]).all()


def test_resample_is_exact_for_linear_curves_and_a_subset_at_64_px():
    """Linear interpolation reproduces a linear function of x at any grid (here RISE's at 48 px, whose steps
    k/48 do not contain k/32); at 64 px the k/32 points are every other native point, unchanged."""
    target = torch.arange(33, dtype=torch.float64) / 32
    native48 = torch.arange(49, dtype=torch.float64) / 48
    torch.testing.assert_close(faith.resample(0.3 + 0.5 * native48, native48, target), 0.3 + 0.5 * target)
    native64 = torch.arange(65, dtype=torch.float64) / 64
    curve = torch.rand(2, 65, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(faith.resample(curve, native64, target), curve[:, ::2], rtol=0, atol=1e-12)
