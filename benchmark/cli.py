"""The ``maskbench`` command line.

    maskbench bench   [--dataset synthetic] [--model smallcnn] [--methods gradcam,rise] [--limit N] ...
    maskbench tables  [--results results] [--plugin mod]   rebuild every table from stored rows (no model)
    maskbench verify  [--run results/synthetic/smallcnn]   recompute a run from an empty cache, compare cells
                      [--resamples 1000 --seed 0 --no-ci]
    maskbench methods [--plugin mod]               list registered methods, presets and origin
    maskbench metrics [--plugin mod]               list registered metrics, polarity, table and origin
    maskbench datasets | models                    list the other registries
    maskbench generate-synthetic --out DIR         write the synthetic data set (VOC + COCO formats)
    maskbench download voc|coco [--root DIR]       fetch, verify and extract the official archives (resumable)
    maskbench paper-smoke [--out DIR]              the papers' settings end to end on data written here

Errors that come from bad input print one line naming the culprit (and the valid choices) and exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from maskbench.core.errors import MaskbenchError
from maskbench.core.registry import import_plugin

from .config import DEFAULT_METHODS, PRESETS, RunConfig

EXAMPLES = """examples:
  maskbench bench                                   # the default benchmark (synthetic, smallcnn, fast preset)
  maskbench bench --methods gradcam,rise --limit 50
  maskbench bench --dataset voc --data-root ~/data/VOCdevkit --model vgg16 --preset paper
  maskbench bench --plugin examples/input_x_gradient.py --methods input-x-gradient
  maskbench bench --methods rise,gradcam --param rise.num_masks=4000
  maskbench tables                                  # rebuild results/*/*/*.csv|.tex from stored rows
  maskbench bench --plugin examples/energy_pointing.py --methods gradcam,rise   # a plugin metric (and its table)
  maskbench tables --plugin examples/energy_pointing.py   # tables of stored rows, plugin metrics' tables included
"""


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _param(text: str) -> tuple[str, object]:
    """``key=value`` with the value read as a Python literal when it is one (1, 0.5, True, None), else a string."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param expects key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _add_run_args(b: argparse.ArgumentParser, d: RunConfig) -> None:
    """Options shared by ``bench`` and ``train``: data, classifier, device, presets, cache."""
    b.add_argument("--dataset", default=d.dataset, help="registered data set (see `maskbench datasets`)")
    b.add_argument("--model", default=None,
                   help="registered classifier (see `maskbench models`); default: smallcnn for synthetic, "
                   "vgg16 for voc/coco, resnet50 for imagenet")
    b.add_argument("--device", default=d.device, help="auto (CUDA if present), cpu, cuda, cuda:N")
    b.add_argument("--seed", type=int, default=d.seed)
    b.add_argument("--preset", default=d.preset, choices=PRESETS,
                   help="method settings: fast (CPU default run) or paper (published settings)")
    b.add_argument("--param", action="append", type=_param, default=[], metavar="KEY=VALUE",
                   help="override a hyperparameter: --param rise.num_masks=4000 (one method) or --param "
                   "num_masks=4000 (every method of the run that has it); repeatable")
    b.add_argument("--data-root", default=None,
                   help="data set root (VOCdevkit, COCO folder); synthetic: a folder written by "
                   "`maskbench generate-synthetic` (default: generated into the cache)")
    b.add_argument("--image-size", type=int, default=None, help="resize images to this square size")
    b.add_argument("--cache", dest="cache_dir", default=None, help="cache dir (default $MASKBENCH_CACHE or "
                   "~/.cache/maskbench): data, checkpoints, masks")
    b.add_argument("--checkpoint", default=None, help="use this classifier checkpoint instead of training one")
    b.add_argument("--classifier-param", action="append", type=_param, default=[], metavar="KEY=VALUE",
                   help="override the classifier's training recipe (epochs=2, lr=1e-4, batch_size=8, ...) or "
                   "build it without ImageNet weights (pretrained_backbone=False: a code-path check, its numbers "
                   "mean nothing); repeatable, part of the classifier's cache key and the run's folder name")
    b.add_argument("--train-classifier", action="store_true",
                   help="train a new classifier even where the shipped or a cached one fits the data")
    b.add_argument("--threads", default=d.threads,
                   help="torch intra-op threads: auto (default: the cores idle at start; see `maskbench "
                   "perf-threads`) or a number; $MASKBENCH_THREADS sets it too")
    b.add_argument("--no-progress", dest="progress", action="store_false")
    _add_plugin_arg(b)


def _config(args: argparse.Namespace, **extra: object) -> RunConfig:
    return RunConfig(
        dataset=args.dataset, model=args.model, methods=args.methods, device=args.device, seed=args.seed,
        preset=args.preset, method_params=dict(args.param), data_root=args.data_root, image_size=args.image_size,
        cache_dir=args.cache_dir, plugins=args.plugin, checkpoint=args.checkpoint, progress=args.progress,
        train_classifier=args.train_classifier, threads=args.threads,
        classifier_params=dict(args.classifier_param), **extra,
    )


def _add_plugin_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import a module (dotted name or .py path) that registers methods, metrics or tables; "
                   "repeatable")


def _import_plugins(args: argparse.Namespace) -> None:
    for p in args.plugin:
        import_plugin(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskbench", description="Benchmark image attribution methods on a frozen classifier.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="explain, score and tabulate", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d = RunConfig()
    _add_run_args(b, d)
    b.add_argument("--methods", type=_csv_list, default=list(DEFAULT_METHODS),
                   help="comma-separated method names, optionally name.preset (default: %(default)s)")
    b.add_argument("--split", default=d.split)
    b.add_argument("--limit", type=int, default=None, help="explain only the first N images of the split")
    b.add_argument("--batch-size", type=int, default=d.batch_size)
    b.add_argument("--results", dest="results_dir", default=d.results_dir)
    b.add_argument("--table-classes", type=_csv_list, default=None,
                   help="classes explained for every image (default: the data set's table classes)")
    b.add_argument("--no-resume", dest="resume", action="store_false", help="recompute rows already stored")
    b.add_argument("--extra-metrics", type=_csv_list, default=[], metavar="NAME,...",
                   help="optional metrics to score too, by metric or table name (e.g. road: ROAD MoRF/LeRF, too "
                   "slow for the default run); the run's folder is the same, its stored rows and cached masks are "
                   "reused")
    b.add_argument("--run-name", default=None,
                   help="results folder <results>/<dataset>/<NAME> (default: named after the run, e.g. smallcnn "
                   "for the default run, smallcnn-limit50 for --limit 50)")
    b.add_argument("--dist-timeout", type=float, default=None,
                   help="under torchrun: seconds any collective may take (default $MASKBENCH_DIST_TIMEOUT or 1800); "
                   "waiting for other ranks has no limit, a rank whose heartbeat stops for "
                   "$MASKBENCH_HEARTBEAT_TIMEOUT (60) s ends the run")
    b.add_argument("--overwrite", action="store_true",
                   help="with --run-name: replace the folder's results if it holds another run")
    b.add_argument("--no-figures", dest="figures", action="store_false",
                   help="do not draw the figures at the end (maskbench figures draws them from the stored run)")

    tr = sub.add_parser("train", help="train (or load from the cache) learned methods; runs under torchrun too")
    tr.add_argument("methods", type=_csv_list, help="comma-separated learned method names, e.g. explainer,rtis")
    _add_run_args(tr, d)

    t = sub.add_parser("tables", help="rebuild every table from stored per-image rows (no model is run)")
    t.add_argument("--results", default="results")
    t.add_argument("--resamples", type=int, default=1000,
                   help="bootstrap resamples over images for the 95%% intervals (default 1000)")
    t.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    t.add_argument("--no-ci", dest="ci", action="store_false", help="LaTeX without the +- interval half-widths")
    _add_plugin_arg(t)  # plugin metrics declare their tables: import them to rebuild those too

    fg = sub.add_parser("figures", help="draw a stored run's figures (PNG and PDF under <run>/figures/) from its "
                        "tables and cached masks, and write the results pages (<run>/index.html, "
                        "<results>/index.html); no model is run")
    fg.add_argument("--run", default="results/synthetic/smallcnn", help="the stored run folder (default: %(default)s)")
    fg.add_argument("--images", type=_csv_list, default=None,
                    help="image ids of the mask grid (default: one image per class)")
    fg.add_argument("--cache-dir", default=None, help="the cache bench used (default: $MASKBENCH_CACHE or "
                    "~/.cache/maskbench)")
    fg.add_argument("--data-root", default=None, help="the data root bench used (default: the data set's own)")
    fg.add_argument("--no-masks", dest="masks", action="store_false", help="skip the mask grid (needs the data)")

    v = sub.add_parser("verify", help="recompute a stored run from an empty cache and compare every table cell")
    v.add_argument("--run", default="results/synthetic/smallcnn",
                   help="the stored run folder to verify (default: %(default)s, the published default run)")
    v.add_argument("--scratch", default=None, help="scratch folder for the new cache and results (default: a new "
                   "temporary folder)")
    v.add_argument("--no-progress", dest="progress", action="store_false")

    m = sub.add_parser("methods", help="list registered attribution methods")
    _add_plugin_arg(m)
    sub.add_parser("datasets", help="list registered data sets")
    sub.add_parser("models", help="list registered classifiers")
    mt = sub.add_parser("metrics", help="list registered metrics")
    _add_plugin_arg(mt)

    pf = sub.add_parser("perf", help="time our methods against the reference implementations (make perf)")
    pf.add_argument("--images", type=int, default=8, help="images for the side-by-side runs (default: %(default)s)")
    pf.add_argument("--scaling", type=lambda t: tuple(int(x) for x in _csv_list(t)), default=(1, 8, 32, 128),
                    help="image counts for the scaling table (default: 1,8,32,128)")
    pf.add_argument("--methods", type=_csv_list, default=[], help="only these methods (default: every pair)")
    pf.add_argument("--ep-iterations", type=int, default=800)
    pf.add_argument("--preset", default="paper", help="our methods' preset in the side-by-side runs")
    pf.add_argument("--model", default="smallcnn")
    pf.add_argument("--untrained", action="store_true",
                    help="time an untrained --model (e.g. resnet50, the papers' size) instead of the trained one")
    pf.add_argument("--image-size", type=int, default=None, help="resize the images, e.g. 224")
    pf.add_argument("--device", default="auto")
    pf.add_argument("--cache", dest="cache_dir", default=None)
    pf.add_argument("--out", default="results/perf")
    pf.add_argument("--no-progress", dest="progress", action="store_false")

    sn = sub.add_parser("sanity", help="model-parameter randomisation test (cascading and independent) of the run's "
                        "methods on its first images, with a noise control row (randomisation.csv/.tex)")
    _add_run_args(sn, d)
    sn.add_argument("--methods", type=_csv_list, default=None, help="methods (default: the default run's)")
    sn.add_argument("--images", type=int, default=32, help="first N test images (default: %(default)s)")
    sn.add_argument("--retrain-learned", choices=("auto", "yes", "no"), default="auto",
                    help="retrain the learned methods against the top-1, fully randomised and permuted-label "
                         "classifiers (a full training each; auto: yes on the synthetic sets, no elsewhere, where "
                         "they are then left out)")
    sn.add_argument("--data-randomisation", choices=("auto", "yes", "no"), default="auto",
                    help="train the classifier on permuted labels and compare the maps (auto: yes on the synthetic "
                         "sets)")
    sn.add_argument("--results", dest="results_dir", default=d.results_dir)

    lk = sub.add_parser("leakage", help="class leakage through MoRF removal masks, from the mask alone and through "
                        "each substrate (leakage.csv/.tex); reads a finished run's cached masks, runs no classifier")
    _add_run_args(lk, d)
    lk.add_argument("--methods", type=_csv_list, default=list(DEFAULT_METHODS))
    lk.add_argument("--limit", type=int, default=None, help="the run's --limit (first N test images)")
    lk.add_argument("--results", dest="results_dir", default=d.results_dir)

    pr = sub.add_parser("perf-ranks", help="throughput of 1 and 2 processes under torchrun, one thread each, for EP "
                        "and the Explainer's training (results/perf/scaling-ranks.csv)")
    pr.add_argument("--images", type=int, default=32)
    pr.add_argument("--steps", type=int, default=60)
    pr.add_argument("--out", default="results/perf")

    pj = sub.add_parser("project", help="projected GPU hours of each published setting and method, from the passes "
                        "`make perf` counted and the papers' GPU (results/perf/projection.csv; a projection)")
    pj.add_argument("--out", default="results/perf", help="folder holding methods.csv (default: %(default)s)")

    th = sub.add_parser("perf-threads", help="time a slice of the default run with 1 and 2 threads, alone and "
                        "beside a busy torch process (results/perf/threads.csv)")
    th.add_argument("--images", type=int, default=24)
    th.add_argument("--out", default="results/perf")

    d = sub.add_parser("download", help="fetch, verify and extract VOC-2007 or COCO-2014 from the official archives")
    d.add_argument("dataset", help="voc or coco")
    d.add_argument("--root", default=None, help="where to extract (default: <cache>/data/<dataset>, where bench "
                   "looks when --data-root and $MASKBENCH_<DATASET>_ROOT are unset)")
    d.add_argument("--mirror", default=None, help="base URL replacing the official one for every archive "
                   "(default: $MASKBENCH_<DATASET>_MIRROR)")
    d.add_argument("--checksums", default=None, help="md5sum file for a mirror's archives "
                   "(default: $MASKBENCH_<DATASET>_CHECKSUMS, else the published checksums)")
    d.add_argument("--archives", dest="archive_dir", default=None,
                   help="where the archives are downloaded (default: <cache>/downloads/<dataset>)")
    d.add_argument("--delete-archives", dest="keep_archives", action="store_false",
                   help="delete the archives after a successful extraction")
    d.add_argument("--skip-checksum", action="store_true", help="do not verify the archives (said in the record)")
    d.add_argument("--no-progress", dest="progress", action="store_false")

    ps = sub.add_parser("paper-smoke", help="drive the papers' settings end to end on data written here (VOC, COCO, "
                        "ImageNet formats via the download code; every method at its paper preset, capped): its "
                        "numbers mean nothing (make paper-smoke)")
    ps.add_argument("--out", default=None, help="work folder for the trees, archives, cache and results (default: a "
                    "new temporary folder, kept and printed)")
    ps.add_argument("--limit", type=int, default=None, help="images per setting (default: 1 for VGG-16 on VOC, 2 "
                    "for the ResNet-50 settings)")
    ps.add_argument("--image-size", type=int, default=64,
                    help="run size; the trees are 224 px (default: %(default)s)")
    ps.add_argument("--no-progress", dest="progress", action="store_false")

    g = sub.add_parser("generate-synthetic", help="write the synthetic data set in VOC and COCO formats")
    g.add_argument("--out", required=True)
    g.add_argument("--n-train", type=int, default=4800)
    g.add_argument("--n-val", type=int, default=200)
    g.add_argument("--n-test", type=int, default=200)
    g.add_argument("--resolution", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    return parser


def _join_torchrun(args: argparse.Namespace, log_dir: Path) -> int:
    """Under torchrun: join the process group, make SIGTERM (torchrun ending the run) a clean exit, and send a
    non-zero rank's output to ``<log_dir>/rank<r>.log``. Returns the rank (0 outside torchrun)."""
    import os
    import signal

    from . import distributed as mdist

    rank, world = mdist.init_from_env(args.device, args.dist_timeout)
    if world == 1:
        return 0

    def stopped(signum: int, frame: object) -> None:
        print(f"maskbench: rank {rank}: stopped by signal {signum} (torchrun ends every process when one fails; its "
              f"report names the failed rank). Rerun the same command to resume.", file=sys.__stderr__, flush=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)
    if rank != 0:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = open(log_dir / f"rank{rank}.log", "a", buffering=1)  # noqa: SIM115 (the process's output until exit)
        sys.stdout = sys.stderr = log
        args.progress = False
    return rank


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import distributed as mdist
    from .runner import run

    rank = _join_torchrun(args, Path(args.results_dir) / "logs")
    cfg = _config(args, split=args.split, limit=args.limit, batch_size=args.batch_size,
                  results_dir=args.results_dir, table_classes=args.table_classes, resume=args.resume,
                  run_name=args.run_name, overwrite=args.overwrite, extra_metrics=args.extra_metrics)
    try:
        result = run(cfg)
    finally:
        mdist.shutdown()
    if rank != 0:
        return 1 if result.failed else 0
    clf = result.manifest["classifier"]
    quality = (f"torchvision's {clf['weights']}, not fine-tuned" if clf.get("weights")
               else f"test mAP {clf.get('test_map', 'n/a')}")
    print(f"classifier {cfg.model}: {quality} ({clf.get('checkpoint')})")
    print(f"{'method':>16} {'images':>6} {'stored':>6} {'cached':>6} {'new':>5} {'failed':>6} "
          f"{'const':>5} {'seconds':>8}")
    for s in result.summaries:
        print(f"{s.method:>16} {s.images:>6} {s.skipped:>6} {s.from_cache:>6} {s.computed:>5} {s.failed:>6} "
              f"{s.constant_maps:>5} {s.seconds:>8.2f}")
        for err in s.errors[:3]:
            print(f"{'':>16}   error: {err}")
        for warning in s.warnings[:5]:
            print(f"{'':>16}   note: {warning}")
    for method, why in result.manifest.get("excluded_from_tables", {}).items():
        print(f"{method:>16}   not in the tables: {why} (rerun it, or delete its per_image files)")
    names = sorted({p.stem for p in result.tables})
    print(f"wrote {result.run_dir}/manifest.json and tables {', '.join(names)} (.csv/.tex) "
          f"({result.manifest['wall_seconds']:.1f} s)")
    if args.figures:
        figures = _draw_figures(result.run_dir, cfg.cache_dir, cfg.data_root)
        print(f"wrote {len(figures)} figure and page files: {result.run_dir}/index.html, figures/ "
              f"(maskbench figures redraws them)")
    if result.failed:
        print(f"WARNING: {result.failed} (method, image) pairs failed and are not in the tables; see the "
              f"manifest.", file=sys.stderr)
        return 1
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    """Train learned methods; under ``torchrun`` every process joins one data-parallel training."""
    from . import distributed as mdist
    from .runner import train

    cfg = _config(args)
    rank, _ = mdist.init_from_env(cfg.device)
    try:
        records = train(cfg)
    finally:
        mdist.shutdown()
    if rank == 0:
        for r in records:
            print(f"{r['method']}: {'trained' if r.get('trained_here') else 'loaded'} in "
                  f"{r.get('train_seconds', 0):.1f} s, {r.get('epochs', '?')} epochs, stopped by "
                  f"{r.get('stopped', '?')}, best val loss {r.get('best_val_loss', '?')}, world size "
                  f"{r.get('world_size', 1)} -> {r.get('checkpoint')}")
    return 0


def _unregistered_metrics(results: str) -> dict[Path, list[str]]:
    """Per run folder, the metrics its last ``bench`` scored (``manifest.json``) that are not registered now:
    their stored rows are kept, but their tables cannot be rebuilt without the plugin that defines them."""
    from maskbench.core.storage import read_json
    from maskbench.metrics import METRICS

    out = {}
    for manifest in sorted(Path(results).glob("*/*/manifest.json")):
        try:
            scored = read_json(manifest).get("metrics", {})
        except (OSError, ValueError, AttributeError):
            continue  # tables reports damaged run files itself
        missing = [m for m in scored if m not in METRICS]
        if missing:
            out[manifest.parent] = missing
    return out


def _cmd_tables(args: argparse.Namespace) -> int:
    from .tables import write_all_tables

    if args.resamples < 1:
        raise MaskbenchError(f"--resamples must be at least 1, got {args.resamples}.")
    _import_plugins(args)
    written = write_all_tables(args.results, resamples=args.resamples, seed=args.seed, ci=args.ci)
    if not written:
        raise MaskbenchError(f"No stored results under '{args.results}' (expected <dataset>/<model>/per_image/).")
    for p in written:
        print(p)
    for run_dir, missing in _unregistered_metrics(args.results).items():
        print(f"note: {run_dir} has rows of metric(s) {', '.join(missing)}, which no imported module registers: "
              f"their tables were not rebuilt (pass the plugin that defines them with --plugin).", file=sys.stderr)
    return 0


def _draw_figures(run_dir: Path, cache_dir: str | None, data_root: str | None,
                  images: list[str] | None = None, masks: bool = True) -> list[Path]:
    from maskbench.core.storage import cache_root

    from .figures import figures_for_run

    written, note = figures_for_run(run_dir, cache=Path(cache_dir) if cache_dir else cache_root(),
                                    data_root=data_root, images=images, masks=masks)
    if note:
        print(f"note: no mask grid: {note}", file=sys.stderr)
    from .page import write_pages

    return written + write_pages(Path(run_dir).parent.parent)


def _cmd_figures(args: argparse.Namespace) -> int:
    for p in _draw_figures(Path(args.run), args.cache_dir, args.data_root, args.images, args.masks):
        print(p)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .verify import summary, verify

    table, path = verify(Path(args.run), Path(args.scratch) if args.scratch else None, progress=args.progress)
    print(summary(table))
    print(f"wrote {path}")
    return 0 if bool(table["within"].all()) else 1


def _cmd_methods(args: argparse.Namespace) -> int:
    _import_plugins(args)
    from maskbench.methods import METHODS, method_presets

    print(f"{'name':<18} {'family':<13} {'presets':<12} origin")
    for name in METHODS.list():
        cls = METHODS.get(name)
        print(f"{name:<18} {cls.family or '-':<13} {','.join(method_presets(cls)):<12} {METHODS.origin(name)}")
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    _import_plugins(args)
    from maskbench.metrics import METRICS, MetricSpec

    print(f"{'name':<16} {'better':<7} {'table':<18} {'origin':<36} description")
    for name in METRICS.list():
        spec: MetricSpec = METRICS.get(name)
        origin = METRICS.origin(name)  # the module that registered it
        print(f"{name:<16} {'higher' if spec.higher_is_better else 'lower':<7} {spec.table:<18} {origin:<36} "
              f"{spec.description}")
    return 0


def _cmd_list(kind: str) -> int:
    if kind == "datasets":
        from maskbench.datasets import DATASETS as reg
    else:
        from maskbench.classifiers import CLASSIFIERS as reg
    for name in reg.list():
        obj = reg.get(name)
        desc = getattr(obj, "description", "") or (obj.__doc__ or "").strip().split("\n")[0]
        print(f"{name:<16} {desc}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from maskbench.datasets.download import download

    download(args.dataset, args.root, mirror=args.mirror, checksums=args.checksums, archive_dir=args.archive_dir,
             keep_archives=args.keep_archives, skip_checksum=args.skip_checksum, progress=args.progress)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from maskbench.datasets import generate_synthetic

    path = generate_synthetic(args.out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                              image_size=args.resolution, seed=args.seed)
    print(path)
    return 0


def _cmd_paper_smoke(args: argparse.Namespace) -> int:
    import tempfile

    from .smoke import run_smoke

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="maskbench-paper-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    result = run_smoke(work, work / "results", limit=args.limit, image_size=args.image_size, progress=args.progress)
    failed = {name: r.failed for name, r in result.runs.items() if r.failed}
    print(f"paper-smoke: {len(result.runs)} settings in {result.seconds['total']:.0f} s ({result.seconds}); tables "
          f"and reproduction reports under {work / 'results'} (their numbers mean nothing: see SMOKE.md)")
    if failed:
        print(f"paper-smoke: FAILED (method, image) pairs: {failed}", file=sys.stderr)
        return 1
    return 0


def _cmd_sanity(args: argparse.Namespace) -> int:
    import copy
    import dataclasses

    from maskbench.core.storage import write_json

    from .randomisation import permuted_label_classifier, randomisation_rows, write_randomisation
    from .runner import build_methods, prepare

    if args.images < 1:
        raise MaskbenchError(f"--images must be positive, got {args.images}.")
    synthetic = args.dataset.startswith("synthetic")
    retrain = args.retrain_learned == "yes" or (args.retrain_learned == "auto" and synthetic)
    permute = args.data_randomisation == "yes" or (args.data_randomisation == "auto" and synthetic)
    args.methods = args.methods or list(DEFAULT_METHODS)
    cfg = _config(args, results_dir=args.results_dir)
    built = [m for m in build_methods(cfg) if retrain or m.family != "learned"]
    session = prepare(cfg)
    ctx = session.method_context()
    for m in built:
        m.setup(ctx)

    def retrained(method, model, tag: str):
        """A copy of ``method`` trained for ``model`` (cached under the randomised classifier's own key)."""
        out = copy.deepcopy(method)
        out.setup(dataclasses.replace(ctx, model=model, classifier_key=f"{session.clf_key}/{tag}"))
        return out

    permuted = None
    if permute:
        permuted, info = permuted_label_classifier(
            cfg.model, session.datasets, session.test.num_classes, session.datasets("train").fingerprint(),
            session.device, session.cache, cfg.classifier_params, cfg.dataset, cfg.seed, cfg.progress)
        print(f"permuted-label classifier: training mAP {info['train_map_permuted']:.3f} on the permuted labels, "
              f"test mAP {info['test_map_true_labels']:.3f} on the true labels ({info['checkpoint']})")
        write_json(session.run_dir / "sanity" / "permuted_classifier.json", info)
    ids = session.image_ids[: args.images]
    batch = session.load_batch(ids)
    rows = randomisation_rows(built, session.model, batch.images, batch.labels.cpu(), ids, batch, cfg.seed,
                              retrain=retrained if retrain else None, permuted=permuted)
    labels = {m.name: m.display_name() for m in built}
    where = f"{cfg.dataset}, {cfg.model}, first {len(ids)} images, preset {cfg.preset}"
    for path in write_randomisation(session.run_dir, rows, labels, where):
        print(path)
    return 0


def _cmd_leakage(args: argparse.Namespace) -> int:
    from .leakage import leakage_rows, write_leakage
    from .runner import build_methods, method_masks, prepare

    cfg = _config(args, results_dir=args.results_dir, limit=args.limit)
    methods = build_methods(cfg)
    session = prepare(cfg)
    ids = session.image_ids
    maps: dict[str, dict] = {}
    for m in methods:
        cache = method_masks(session, m)
        found = {iid: cache.get(iid) for iid in ids}
        missing = [iid for iid, v in found.items() if v is None]
        if missing:
            raise MaskbenchError(f"leakage: {m.name} has no cached masks for {len(missing)} of the {len(ids)} images "
                                 f"(e.g. {missing[0]}) under {cache.root}; run `maskbench bench` with the same "
                                 f"options first.")
        maps[m.name] = found
    batch = session.load_batch(ids)
    labels = {iid: batch.labels[i].cpu() for i, iid in enumerate(ids)}
    rows, detection = leakage_rows(maps, batch.images.cpu(), labels, ids, session.test.num_classes, cfg.seed,
                                   progress=(lambda msg: print(msg, file=sys.stderr)) if cfg.progress else None)
    where = f"{cfg.dataset}, {cfg.model}, {len(ids)} images, preset {cfg.preset}"
    for path in write_leakage(session.run_dir, rows, detection, {m.name: m.display_name() for m in methods}, where):
        print(path)
    return 0


def _cmd_perf(args: argparse.Namespace) -> int:
    from .perf import PerfConfig, run_perf

    if args.images < 1 or any(n < 1 for n in args.scaling):
        raise MaskbenchError(f"--images and --scaling need positive counts, got {args.images} and {args.scaling}")
    paths = run_perf(PerfConfig(images=args.images, scaling=args.scaling, methods=tuple(args.methods),
                                device=args.device, cache_dir=args.cache_dir, out_dir=args.out,
                                ep_iterations=args.ep_iterations, progress=args.progress, preset=args.preset,
                                model=args.model, untrained=args.untrained, image_size=args.image_size))
    print(Path(paths["methods"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "tables":
            return _cmd_tables(args)
        if args.command == "verify":
            return _cmd_verify(args)
        if args.command == "perf-threads":
            from .threads import measure

            path = measure(Path(args.out), limit=args.images)
            print(path.read_text())
            return 0
        if args.command == "figures":
            return _cmd_figures(args)
        if args.command == "methods":
            return _cmd_methods(args)
        if args.command == "metrics":
            return _cmd_metrics(args)
        if args.command in ("datasets", "models"):
            return _cmd_list(args.command)
        if args.command == "generate-synthetic":
            return _cmd_generate(args)
        if args.command == "download":
            return _cmd_download(args)
        if args.command == "perf":
            return _cmd_perf(args)
        if args.command == "paper-smoke":
            return _cmd_paper_smoke(args)
        if args.command == "leakage":
            return _cmd_leakage(args)
        if args.command == "sanity":
            return _cmd_sanity(args)
        if args.command == "perf-ranks":
            from .scaling import measure_ranks

            print(measure_ranks(Path(args.out), args.images, args.steps).read_text())
            return 0
        if args.command == "project":
            from .projection import write_projection

            print(write_projection(Path(args.out)).read_text())
            return 0
    except MaskbenchError as exc:
        print(f"maskbench: error: {exc}", file=sys.stderr)
        return 2
    return 0  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
