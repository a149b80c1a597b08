"""``maskbench perf`` (``make perf``): our method implementations against the reference implementations, timed
side by side in one run on the same classifier, images, classes and settings.

For every method it measures

* our time and images per second, and (where a reference exists) the reference's, with the ratio;
* peak memory of each (CUDA: ``max_memory_allocated`` above what was allocated before; CPU: the largest
  growth of the process's resident set, sampled every 2 ms after freed heap memory was returned to the OS with
  ``malloc_trim``: an approximation, since memory the allocator keeps from earlier runs is not counted);
* the *bare-pass ratio*: while our method runs, a recorder counts every classifier call (batch size, and
  whether a backward pass follows); the same calls are then replayed on the bare classifier with random inputs
  and timed. ``ratio_to_bare`` = our time / replay time: 1.0 would mean the method costs exactly the classifier
  passes it needs;
* agreement with the reference on the same inputs: mean per-map Spearman rank correlation and Pearson
  correlation, and for EP the mean IoU of the top-``area`` regions of each area's mask. For RISE, whose two
  implementations draw different random masks, also our RISE against itself with another seed: the Monte
  Carlo ceiling of any agreement between two RISE runs.

Every method (and every cheap reference) runs once on one image before it is timed, so that no timing includes
one-off initialisation.

Pairs: Grad-CAM (Captum ``LayerGradCam``) and our Grad-CAM++ vs pytorch-grad-cam's ``GradCAM`` /
``GradCAMPlusPlus``; our RISE and EP vs TorchRay's ``rise`` / ``extremal_perturbation``; Captum IG and our
batched SmoothGrad vs the naive loop (one image, one step or sample per pass). References are optional (the
``compare`` extra: ``pip install -e ".[compare]"``); a missing one is reported, not required. TorchRay is
CC BY-NC and is only imported here, never by the benchmark. A second table times our methods' ``fast`` presets
for 1, 8, 32 and 128 images. On CUDA the classifier runs under bf16 autocast in channels-last layout while the
masks and their optimisers stay in fp32.
"""

from __future__ import annotations

import csv
import ctypes
import importlib.util
import io
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from maskbench.core.storage import atomic_write, write_json

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class PerfConfig:
    dataset: str = "synthetic"
    model: str = "smallcnn"
    images: int = 8
    scaling: tuple[int, ...] = (1, 8, 32, 128)
    methods: tuple[str, ...] = ()  # empty: every pair below
    device: str = "auto"
    cache_dir: str | None = None
    out_dir: str = "results/perf"
    ep_iterations: int = 800
    preset: str = "paper"  # our methods' preset in the side-by-side runs (the references get the same settings)
    untrained: bool = False  # time an untrained classifier (e.g. resnet50: the papers' size) instead of the trained one
    image_size: int | None = None  # resize the images (e.g. 224 with --untrained resnet50)
    seed: int = 0
    progress: bool = True


# ------------------------------------------------------------------------------------------------ measuring


def _expose_layers(wrapper: nn.Module, model: nn.Module) -> None:
    """Give a wrapper the classifier's ``cam_layer`` / ``feature_layers``, which Grad-CAM style methods read."""
    for name in ("cam_layer", "feature_layers"):
        if hasattr(model, name):
            setattr(wrapper, name, getattr(model, name))


class PassRecorder(nn.Module):
    """Forwards to ``model`` and records every call: (batch size, whether its output carries a gradient)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls: list[tuple[int, bool]] = []
        _expose_layers(self, model)

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        self.calls.append((x.shape[0], bool(out.requires_grad)))
        return out


class _AutocastClassifier(nn.Module):
    """CUDA only: the classifier in bf16 autocast and channels-last; logits returned in fp32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)
        _expose_layers(self, model)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return self.model(x.contiguous(memory_format=torch.channels_last)).float()


def _return_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc), so that resident-set growth reflects new allocations."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakMemory:
    """Peak memory growth during a block, in MB (CUDA allocator peak, or sampled resident set on the CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, float("nan")

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif os.path.exists("/proc/self/statm"):
            _return_freed_memory()
            self._base = self._peak = self._rss()
            self._stop = threading.Event()

            def sample() -> None:
                while not self._stop.wait(0.002):
                    self._peak = max(self._peak, self._rss())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, self._rss()) - self._base
            self.peak_mb /= 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, min_seconds: float = 2.0,
          max_repeats: int = 5) -> tuple[float, float, Any]:
    """(seconds, peak MB, result): the first call measures memory; a call shorter than ``min_seconds`` is
    repeated (without the memory sampling, which returns memory to the OS and so slows the next allocations)
    up to ``max_repeats`` times or ``min_seconds`` in all, and the median time is reported."""
    _sync(device)
    with _PeakMemory(device) as mem:
        start = time.perf_counter()
        result = fn()
        _sync(device)
        first = time.perf_counter() - start
    if first >= min_seconds:
        return first, mem.peak_mb, result
    times: list[float] = []
    while len(times) < max_repeats and sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], mem.peak_mb, result


def replay(model: nn.Module, calls: list[tuple[int, bool]], shape: tuple[int, ...], device: torch.device) -> float:
    """Seconds for the recorded classifier calls on the bare model (random inputs, backward where recorded);
    the median of repeated replays when one is short (see :func:`timed`)."""
    gen = torch.Generator(device=device).manual_seed(0) if device.type == "cuda" else torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(n, *shape, generator=gen, device=device) for n in {n for n, _ in calls}}

    def run() -> None:
        for n, grad in calls:
            x = inputs[n].detach().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                out = model(x)
                if grad:
                    out.float().sum().backward()

    return timed(run, device)[0]


# ------------------------------------------------------------------------------------------------ agreement


def _ranks(x: Tensor) -> Tensor:
    return x.argsort(-1).argsort(-1).double()


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Per-row Pearson correlation of two (N, D) tensors (NaN for a constant row)."""
    a, b = a.double() - a.double().mean(-1, keepdim=True), b.double() - b.double().mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Per-row Spearman rank correlation (ties broken by position)."""
    return pearson(_ranks(a), _ranks(b))


def top_area_iou(a: Tensor, b: Tensor, area: float) -> Tensor:
    """Per-row IoU of the top ``area`` fraction of the pixels of two (N, D) maps."""
    k = max(1, int(round(area * a.shape[-1])))
    ta = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, a.topk(k, -1).indices, True)
    tb = torch.zeros_like(b, dtype=torch.bool).scatter_(-1, b.topk(k, -1).indices, True)
    return (ta & tb).sum(-1).double() / (ta | tb).sum(-1).double()


def agreement(ours: Tensor, ref: Tensor) -> dict[str, float]:
    a, b = ours.flatten(2).flatten(0, 1).cpu(), ref.flatten(2).flatten(0, 1).cpu()
    return {"rank_corr": float(spearman(a, b).nanmean()), "pearson": float(pearson(a, b).nanmean())}


# ------------------------------------------------------------------------------------------------ references


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def ref_gradcam(model: nn.Module, images: Tensor, classes: Tensor, plusplus: bool) -> Tensor:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = GradCAMPlusPlus if plusplus else GradCAM
    x = images.detach().clone().requires_grad_(True)  # the frozen classifier has no parameter to carry a graph
    with cls(model=model, target_layers=[model.cam_layer]) as cam:
        cols = [torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in col]))
                for col in classes.T]
    return torch.stack(cols, 1)


def ref_rise(model: nn.Module, images: Tensor, classes: Tensor, method: Any) -> Tensor:
    from torchray.attribution.rise import rise

    out = []
    for img, cls in zip(images, classes, strict=True):
        sal = rise(model, img[None], seed=method.seed, num_masks=method.num_masks, num_cells=method.num_cells,
                   p=method.p)  # (1, C, H, W), every class
        out.append(sal[0, cls])
    return torch.stack(out)


def ref_extremal(model: nn.Module, images: Tensor, classes: Tensor, method: Any) -> Tensor:
    """TorchRay's EP per (image, class), areas batched: (B, K, A, H, W). Its blur pyramid's maximum sigma is set
    to ours (TorchRay fixes 20 px, meant for 224 px images), and step and sigma are ours, scaled alike."""
    import torchray.attribution.extremal_perturbation as tr

    h = min(images.shape[-2:])
    scale = h / 224.0
    original = tr.Perturbation.__init__

    def scaled_init(self, input, num_levels=8, max_blur=20, type="blur"):  # noqa: A002 (TorchRay's names)
        original(self, input, num_levels=num_levels, max_blur=method.max_blur * scale, type=type)

    reward = {"contrastive": tr.contrastive_reward, "simple": tr.simple_reward}[method.reward]
    tr.Perturbation.__init__ = scaled_init
    try:
        out = []
        for img, cls in zip(images, classes, strict=True):
            per_class = []
            for c in cls.tolist():
                masks, _ = tr.extremal_perturbation(
                    model, img[None], int(c), areas=list(method.areas), max_iter=method.max_iter,
                    num_levels=method.levels, step=max(1, int(round(method.step * scale))),
                    sigma=method.sigma * scale, jitter=method.jitter, variant=method.variant, reward_func=reward,
                    smooth=method.smooth)
                per_class.append(masks[:, 0])
            out.append(torch.stack(per_class))
    finally:
        tr.Perturbation.__init__ = original
        for p in model.parameters():  # TorchRay switches requires_grad off for good; ours are off anyway
            p.requires_grad_(False)
    return torch.stack(out)


def naive_integrated_gradients(model: nn.Module, images: Tensor, classes: Tensor, method: Any) -> Tensor:
    """IG one image and one step at a time, with Captum's step sizes and alphas (so the maps must agree)."""
    from captum.attr._utils.approximation_methods import approximation_parameters

    from maskbench.methods.gradients import clip_and_normalize

    step_sizes_fn, alphas_fn = approximation_parameters(method.rule)
    sizes, alphas = step_sizes_fn(method.steps), alphas_fn(method.steps)
    mean, std = method._norm(images)
    black = (-mean / std)[0]
    maps = torch.zeros(*classes.shape, *images.shape[-2:], device=images.device)
    for i, img in enumerate(images):
        for j, c in enumerate(classes[i].tolist()):
            total = torch.zeros_like(img)
            for size, alpha in zip(sizes, alphas, strict=True):
                x = (black + alpha * (img - black))[None].requires_grad_(True)
                (g,) = torch.autograd.grad(model(x)[0, c], x)
                total += size * g[0]
            maps[i, j] = ((img - black) * total).sum(0).abs()
    return clip_and_normalize(maps, method.clip_percentile)


def naive_smoothgrad(model: nn.Module, images: Tensor, classes: Tensor, method: Any) -> Tensor:
    """SmoothGrad one image and one noisy sample at a time, with the same noise as ours."""
    from maskbench.methods.gradients import clip_and_normalize

    _, std = method._norm(images)
    noise = method._noise(images) * (method.noise_level / std.amin())
    maps = torch.zeros(*classes.shape, *images.shape[-2:], device=images.device)
    for i, img in enumerate(images):
        for j, c in enumerate(classes[i].tolist()):
            total = torch.zeros_like(img)
            for s in range(method.samples):
                x = (img + noise[i, s])[None].requires_grad_(True)
                (g,) = torch.autograd.grad(model(x)[0, c], x)
                total += g[0]
            maps[i, j] = (total / method.samples).abs().amax(0)
    return clip_and_normalize(maps, method.clip_percentile)


@dataclass
class Pair:
    """One of our methods, its settings for the side-by-side run, and its reference (or None)."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    reference: str = ""
    needs: str = ""  # the module the reference needs
    ref_fn: Callable[..., Tensor] | None = None
    warm_reference: bool = False  # cheap enough to run once on one image before timing


EP_SETTINGS = {"areas": [0.05, 0.1, 0.2, 0.3], "reward": "contrastive", "variant": "preserve", "area_domain": "full",
               "smooth": 0.0}
PAIRS = [
    Pair("gradcam", {}, "pytorch-grad-cam GradCAM", "pytorch_grad_cam",
         lambda model, x, c, m: ref_gradcam(model, x, c, plusplus=False), warm_reference=True),
    Pair("gradcam++", {}, "pytorch-grad-cam GradCAMPlusPlus", "pytorch_grad_cam",
         lambda model, x, c, m: ref_gradcam(model, x, c, plusplus=True), warm_reference=True),
    Pair("gradient"),
    Pair("smoothgrad", {"samples": 50}, "naive loop (1 image x 1 sample per pass)", "captum", naive_smoothgrad,
         warm_reference=True),
    Pair("integrated-gradients", {"steps": 200}, "naive loop (1 image x 1 step per pass)", "captum",
         naive_integrated_gradients, warm_reference=True),
    Pair("rise", {"num_masks": 8000, "num_cells": 7, "p": 0.5, "score": "sigmoid", "normalize": "none"},
         "TorchRay rise", "torchray", ref_rise),
    Pair("extremal-perturbation", {**EP_SETTINGS, "resolution": "pixel"}, "TorchRay extremal_perturbation",
         "torchray", ref_extremal),
    Pair("extremal-perturbation", {**EP_SETTINGS, "resolution": "cell"}, "TorchRay extremal_perturbation",
         "torchray", ref_extremal),
    Pair("igos++"),
    Pair("meaningful-perturbation"),
]


# ------------------------------------------------------------------------------------------------ the run


def _load(config: PerfConfig) -> tuple[nn.Module, Tensor, Tensor, torch.device, dict[str, Any]]:
    """The benchmark's classifier and the first images of the test split, with each image's top class."""
    from maskbench.classifiers import get_classifier
    from maskbench.core.device import resolve_device
    from maskbench.core.storage import cache_root
    from maskbench.datasets import build_dataset, collate

    device = resolve_device(config.device)
    cache = Path(config.cache_dir) if config.cache_dir else cache_root()

    def datasets(split: str):
        return build_dataset(config.dataset, split=split)

    test = datasets("test")
    n = max(config.images, *config.scaling)
    if config.untrained:  # timing only: the papers' classifier size without weights to download
        from maskbench.classifiers import build_classifier, freeze

        options = {"pretrained_backbone": False} if config.model != "smallcnn" else {}
        model = freeze(build_classifier(config.model, test.num_classes, **options)).to(device)
        info = {"checkpoint": f"untrained {config.model}"}
    else:
        model, info = get_classifier(config.model, datasets, datasets("train").fingerprint(), test.num_classes,
                                     device, cache, None, config.progress)
    images = collate([test.load(i) for i in test.image_ids[:n]]).to(device).images
    if config.image_size:
        images = torch.nn.functional.interpolate(images, size=(config.image_size,) * 2, mode="bilinear",
                                                 align_corners=False)
    with torch.no_grad():
        classes = model(images).argmax(1, keepdim=True)
    if device.type == "cuda":
        model = _AutocastClassifier(model)
    return model, images, classes, device, {"classifier": info.get("checkpoint", ""), "mean": test.mean,
                                            "std": test.std}


def _build(name: str, preset: str, params: dict[str, Any], data: dict[str, Any]):
    from maskbench.methods import METHODS, MethodContext, build_method

    if name not in METHODS:
        return None
    method = build_method(name, preset=preset, **params)
    if hasattr(method, "_norm"):  # gradient methods read the data set's normalisation in setup()
        method.setup(MethodContext(None, "", None, 0, torch.device("cpu"), Path("."), mean=tuple(data["mean"]),
                                   std=tuple(data["std"])))
    return method


WARM_UP = {"max_iter": 2, "iterations": 1, "ig_iter": 1, "num_masks": 64, "samples": 2, "steps": 2}


def _cheap(params: dict[str, Any], method: Any) -> dict[str, Any]:
    """``params`` with the method's iteration counts cut to a minimum, for the warm-up run."""
    fields = set(method.config())
    return {**params, **{k: v for k, v in WARM_UP.items() if k in fields}}


def _run_ours(method: Any, model: nn.Module, images: Tensor, classes: Tensor, device: torch.device,
              ep_areas: bool = False) -> tuple[float, float, float, list[tuple[int, bool]], Tensor]:
    recorder = PassRecorder(model)

    def fn() -> Tensor:
        recorder.calls.clear()  # the calls of the last repeat
        if ep_areas:
            return method.area_masks(recorder, images, classes)[0]
        return method.explain(recorder, images, classes)

    seconds, peak, maps = timed(fn, device)
    bare = replay(model, recorder.calls, tuple(images.shape[1:]), device)
    return seconds, peak, bare, recorder.calls, maps


def _warm_up(model: nn.Module, images: Tensor, device: torch.device) -> None:
    """A few forward and backward passes first, so that no timing includes one-off initialisation."""
    for n in (1, len(images), 4 * len(images)):
        x = images[:1].expand(n, -1, -1, -1).clone().requires_grad_(True)
        model(x).sum().backward()
    _sync(device)


def run_perf(config: PerfConfig) -> dict[str, Path]:
    from tqdm import tqdm

    model, all_images, all_classes, device, data = _load(config)
    images, classes = all_images[: config.images], all_classes[: config.images]
    out_dir = Path(config.out_dir)
    pairs = [p for p in PAIRS if not config.methods or p.method in config.methods]
    rows: list[dict[str, Any]] = []
    references: dict[str, tuple[float, float, Tensor]] = {}  # a reference run serves every variant of ours
    _warm_up(model, images, device)
    for pair in tqdm(pairs, desc="perf: side by side", disable=not config.progress):
        params = dict(pair.params)
        if pair.method == "extremal-perturbation":
            params["max_iter"] = config.ep_iterations
        method = _build(pair.method, config.preset, params, data)
        if method is None:
            rows.append({"method": pair.method, "note": "not registered"})
            continue
        is_ep = pair.method == "extremal-perturbation"
        warm = _build(pair.method, "fast", _cheap({**params}, method), data)
        warm.explain(model, images[:1], classes[:1])  # one-off initialisation (imports, first allocations)
        if pair.warm_reference and _have(pair.needs):
            pair.ref_fn(model, images[:1], classes[:1], method)
        ours_s, ours_mb, bare_s, calls, ours_maps = _run_ours(method, model, images, classes, device, ep_areas=is_ep)
        row: dict[str, Any] = {
            "method": pair.method, "variant": params.get("resolution", ""), "reference": pair.reference or "",
            "images": len(images),
            "classes_per_image": classes.shape[1], "settings": json.dumps(params, sort_keys=True),
            "ours_seconds": ours_s, "ours_images_per_s": len(images) / ours_s, "ours_peak_mb": ours_mb,
            "bare_seconds": bare_s, "ratio_to_bare": ours_s / bare_s if bare_s > 0 else float("nan"),
            "passes_with_backward": sum(n for n, g in calls if g),
            "passes_forward_only": sum(n for n, g in calls if not g),
        }
        if pair.ref_fn is not None and _have(pair.needs):
            if pair.reference not in references:
                references[pair.reference] = timed(lambda p=pair, m=method: p.ref_fn(model, images, classes, m),
                                                   device)
            ref_s, ref_mb, ref_maps = references[pair.reference]
            row.update({"ref_seconds": ref_s, "ref_images_per_s": len(images) / ref_s, "ref_peak_mb": ref_mb,
                        "speedup": ref_s / ours_s})
            ref_maps = ref_maps.to(ours_maps.device).float()
            if is_ep:
                row.update(agreement(ours_maps.flatten(1, 2), ref_maps.flatten(1, 2)))
                ious = [top_area_iou(ours_maps[:, :, a].flatten(2).flatten(0, 1).cpu(),
                                     ref_maps[:, :, a].flatten(2).flatten(0, 1).cpu(), area)
                        for a, area in enumerate(method.areas)]
                row["top_area_iou"] = float(torch.stack(ious).mean())
            else:
                row.update(agreement(ours_maps, ref_maps))
            if pair.method == "rise":  # Monte Carlo ceiling: our RISE against itself with other random masks
                other = _build(pair.method, config.preset, {**params, "seed": method.seed + 1}, data)
                self_agree = agreement(ours_maps, other.explain(model, images, classes))
                row["self_rank_corr"], row["self_pearson"] = self_agree["rank_corr"], self_agree["pearson"]
        elif pair.reference:
            row["note"] = f"reference unavailable (needs {pair.needs}: pip install -e '.[compare]')"
        rows.append(row)
    scaling = []
    names = list(dict.fromkeys(p.method for p in pairs))
    for name in tqdm(names, desc="perf: scaling (fast presets)", disable=not config.progress):
        method = _build(name, "fast", {}, data)
        if method is None:
            continue
        for n in config.scaling:
            seconds, peak, _ = timed(lambda m=method, k=n: m.explain(model, all_images[:k], all_classes[:k]), device)
            scaling.append({"method": name, "preset": "fast", "images": n, "seconds": seconds,
                            "images_per_s": n / seconds, "peak_mb": peak})
    return _write(out_dir, rows, scaling, config, device, data)


def _write(out_dir: Path, rows: list[dict[str, Any]], scaling: list[dict[str, Any]], config: PerfConfig,
           device: torch.device, data: dict[str, Any]) -> dict[str, Path]:
    from maskbench.core.provenance import git_revision

    cols = ["method", "variant", "reference", "images", "classes_per_image", "ours_seconds", "ours_images_per_s",
            "ref_seconds", "ref_images_per_s", "speedup", "ours_peak_mb", "ref_peak_mb", "bare_seconds",
            "ratio_to_bare", "passes_with_backward", "passes_forward_only", "rank_corr", "pearson", "top_area_iou",
            "self_rank_corr", "self_pearson",
            "settings", "note"]
    paths = {"methods": out_dir / "methods.csv", "scaling": out_dir / "scaling.csv", "meta": out_dir / "perf.json"}
    for path, table, header in ((paths["methods"], rows, cols),
                                (paths["scaling"], scaling, ["method", "preset", "images", "seconds", "images_per_s",
                                                             "peak_mb"])):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
        w.writeheader()
        for r in table:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
        atomic_write(path, buf.getvalue())
    write_json(paths["meta"], {"config": asdict(config), "device": str(device), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "git": git_revision(),
                               "classifier": data["classifier"]})
    return paths
