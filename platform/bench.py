"""Benchmarks that print numbers, compared side by side in one run (never timed asserts in the tests).

python -m platform.bench train                      # Ray Train loop vs the same loop in a plain process
python -m platform.bench train --epochs 4 backbone=resnet50_fpn
python -m platform.bench train --no-ray --variant amp=bf16 --variant mask_head_channels=128
python -m platform.bench data                       # loader vs model images/s, volume slices/s
python -m platform.bench tiled --mosaic 7000        # tiled inference: s/MP, peak RSS, stitching overhead
python -m platform.bench eval                       # pycocotools vs faster-coco-eval on dense images
python -m platform.bench asha                       # ASHA vs full-budget trials: best metric and compute
python -m platform.bench serve                      # HTTP load test, Serve overhead, batching, tiled mosaic
python -m platform.bench match                      # find in 3D: hit rate, s/query vs library size
python -m platform.bench quality                    # CPU recipe vs the Otsu baseline on unseen DSB2018
python -m platform.bench predict                    # platform.predict vs a direct loop: images/s, peak RSS
python -m platform.bench export                     # exported models: ONNX Runtime, TorchScript vs eager ms
python -m platform.bench quality --checkpoints A B  # score trained checkpoints (and their ensemble) only
python -m platform.bench gpu                        # the GPU check, <= 8 min (make gpu-check, bench/README)
python -m platform.bench gpu --smoke                # every step of it on the CPU with tiny sizes
"""

import argparse
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

from platform import _cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m platform.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="which", required=True)
    train = sub.add_parser("train", help="training throughput: Ray Train (1 worker) vs a plain process")
    train.add_argument("--recipe", default="dsb2018_demo")
    train.add_argument("--epochs", type=int, default=3, help="epochs per side; the first is warm-up")
    train.add_argument("--rounds", type=int, default=2, help="each side runs once per round, interleaved")
    train.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="k=v[,k=v]",
        help="a plain-process side with these config changes (repeatable), e.g. amp=bf16",
    )
    train.add_argument("--no-ray", action="store_true", help="plain-process sides only")
    train.add_argument("--data", help="dataset folder (default: the bundled sample)")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    data = sub.add_parser("data", help="loader images/s (heaviest preset) vs Mask R-CNN images/s; slices/s")
    data.add_argument("--recipe", default="dsb2018_demo", help="model whose step rate the loader must beat")
    data.add_argument("--preset", default="sartorius", help="augmentation preset (sartorius is the heaviest)")
    data.add_argument("--loader-workers", type=int, default=0, help="DataLoader worker processes")
    data.add_argument("--steps", type=int, default=6, help="training steps timed for the model rate")
    data.add_argument("--volumes", help="NIfTI source for slices/s (default: ../shared/data/adrenal3d)")
    tiled = sub.add_parser(
        "tiled", help="tiled inference on a mosaic of the sample images (SAHI if installed)"
    )
    tiled.add_argument("--mosaic", type=int, default=7000, help="mosaic side, pixels")
    tiled.add_argument("--tile-size", type=int, default=512)
    tiled.add_argument("--overlap", type=int, default=64)
    tiled.add_argument("--batch", type=int, default=4, help="tiles per forward call")
    tiled.add_argument("--backbone", default="resnet18_fpn")
    tiled.add_argument("--device", default="cpu")
    predict = sub.add_parser("predict", help="platform.predict's path vs the model in a loop: images/s, RSS")
    predict.add_argument("--recipe", default="dsb2018_cpu", help="model (random weights) and its tiling")
    predict.add_argument("--images", type=int, default=32, help="256 px images in the folder")
    predict.add_argument("--mosaic", type=int, default=2048, help="side of the large image, pixels")
    predict.add_argument("--rounds", type=int, default=1, help="each side runs once per round, interleaved")
    export = sub.add_parser("export", help="ms/image of ONNX Runtime and TorchScript vs PyTorch eager")
    export.add_argument("--images", type=int, default=8, help="inputs per model (sample images, slices)")
    export.add_argument("--rounds", type=int, default=3, help="each side runs once per round, interleaved")
    export.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of every side")
    evaluation = sub.add_parser("eval", help="COCO evaluator time on dense images: pycocotools vs faster")
    evaluation.add_argument("--images", type=int, default=4, help="dense images (sample images tiled)")
    evaluation.add_argument("--grid", type=int, default=3, help="each dense image is grid x grid samples")
    asha = sub.add_parser(
        "asha", help="the same random trials with ASHA and with full budgets: best metric, trial-epochs"
    )
    asha.add_argument("--space", default="classifier")
    asha.add_argument("--recipe", help="default: the space's")
    asha.add_argument("--num-samples", type=int, default=8)
    asha.add_argument("--max-epochs", type=int, default=6)
    asha.add_argument("--grace-period", type=int, default=1)
    asha.add_argument("--reduction-factor", type=float, default=3)
    asha.add_argument("--seed", type=int, default=0)
    asha.add_argument("overrides", nargs="*", metavar="key=value", help="fixed config fields")
    serve = sub.add_parser(
        "serve", help="Serve over loopback HTTP vs in-process; classifier batching on/off; a tiled mosaic"
    )
    serve.add_argument("--detector", help="registered detector (default: a random-init one, temporary store)")
    serve.add_argument("--classifier", help="registered classifier (default: a random-init one)")
    serve.add_argument("--tracking-uri", help="the store of --detector/--classifier")
    serve.add_argument("--clients", type=int, default=8, help="concurrent clients of the segment load test")
    serve.add_argument("--seconds", type=float, default=60, help="length of the main load test")
    serve.add_argument("--batch-clients", type=int, default=16, help="concurrent clients, batching test")
    serve.add_argument("--mosaic", type=int, default=2048, help="side of the tiled mosaic, pixels")
    serve.add_argument("--tile-size", type=int, default=512)
    serve.add_argument("--cpus-per-replica", type=float, default=1)
    match = sub.add_parser("match", help="slice matching: hit rate and time per query vs library size")
    match.add_argument("--volumes", help="folder of .nii.gz volumes (default: ../shared/data/adrenal3d)")
    match.add_argument("--sizes", default="5,15,50", help="library sizes in volumes, comma-separated")
    match.add_argument("--queries", type=int, default=24, help="queries per size (one per volume)")
    quality = sub.add_parser(
        "quality", help="train the CPU recipe, score it on unseen DSB2018 images beside the Otsu baseline"
    )
    quality.add_argument("--recipes", nargs="+", default=["dsb2018_cpu"])
    quality.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; 2+: ensemble")
    quality.add_argument("--checkpoints", nargs="*", default=[], help="score these folders, train nothing")
    quality.add_argument("--tta", default="flips", help="TTA mode scored beside each model (off: none)")
    quality.add_argument("--out", default="bench_out/quality", help="checkpoints and quality.json")
    quality.add_argument("overrides", nargs="*", metavar="key=value", help="config fields of every recipe")
    from platform.benchmarks.gpu import add_arguments  # imports no more than the standard library

    add_arguments(sub.add_parser("gpu", help="the GPU check: training, AMP, GPU tests, inference, quality"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    benches = {"train": bench_train, "data": bench_data, "tiled": bench_tiled, "eval": bench_eval}
    benches |= {"asha": bench_asha, "serve": bench_serve, "match": bench_match, "quality": bench_quality}
    benches["predict"] = bench_predict
    benches["export"] = bench_export
    benches["gpu"] = bench_gpu
    return benches[args.which](args)


def bench_gpu(args) -> int:
    from platform.benchmarks.gpu import run_check

    return run_check(args)


def bench_quality(args) -> int:
    from platform.benchmarks.quality import run

    out = Path(args.out).resolve()
    run(args.recipes, args.seeds, args.checkpoints, args.tta, args.overrides, out)
    print(f"results: {out / 'quality.json'}")
    return 0


def bench_match(args) -> int:
    """Libraries of the first N volumes of a folder; queries: slices of up to --queries of those volumes
    (spread over the library), rotated and noisy (datasets.matching_eval). Prints one row per size."""
    from datasets.errors import UserError
    from datasets.matching import build_library
    from datasets.matching_eval import make_queries, run_queries, summary

    default = _cli.REPO.parent / "shared" / "data" / "adrenal3d" / "volumes"
    folder = Path(args.volumes) if args.volumes else default
    paths = sorted(folder.glob("*.nii*"))
    try:
        sizes = [int(n) for n in args.sizes.split(",")]
    except ValueError:
        raise UserError(f"--sizes: expected comma-separated numbers of volumes, got {args.sizes!r}") from None
    if not paths or max(sizes) > len(paths) or min(sizes) < 1:
        raise UserError(f"--sizes: {folder} has {len(paths)} volumes; sizes must be 1 to {len(paths)}")
    header = ("volumes", "slices", "build s", "MB", "queries", "hit rate", "s/query")
    print(" ".join(f"{h:>8}" for h in header))
    for n in sizes:
        start = time.perf_counter()
        library = build_library(paths[:n])
        built = time.perf_counter() - start
        step = max(1, n // args.queries)
        queries = make_queries(paths[:n:step][: args.queries])
        outcomes = run_queries(library, queries)
        rate, seconds = summary(outcomes)
        mb = (library.thumbs.nbytes + library.masks.nbytes + library.hu.nbytes) / 2**20
        row = (n, len(library), f"{built:.1f}", f"{mb:.1f}", len(queries), f"{rate:.0%}", f"{seconds:.2f}")
        print(" ".join(f"{v:>8}" for v in row), flush=True)
        for o in outcomes:
            if not o.hit:
                print(f"         {o.line()}")
    return 0


def bench_serve(args) -> int:
    from platform.benchmarks.serve import benchmark_serve

    tracking = _cli.tracking_uri(args.tracking_uri) if args.detector and args.classifier else None
    benchmark_serve(
        args.detector,
        args.classifier,
        tracking,
        clients=args.clients,
        seconds=args.seconds,
        batch_clients=args.batch_clients,
        mosaic=args.mosaic,
        tile_size=args.tile_size,
        cpus_per_replica=args.cpus_per_replica,
    )
    return 0


def bench_asha(args) -> int:
    """Two searches drawing the same trial configs (Optuna's random sampler, same seed; its draws do not
    depend on results): every trial to the full budget (FIFO) vs ASHA. Prints the best metric each reached
    and the trial-epochs each spent, read back from the searches' MLflow runs."""
    import csv
    import subprocess
    import sys

    import mlflow

    from search_spaces import default_recipe
    from trainers.recipes import get_recipe
    from trainers.tasks import task_of

    recipe = args.recipe or default_recipe(args.space)
    metric = task_of(get_recipe(recipe)).metric
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for scheduler in ("fifo", "asha"):
            started = time.perf_counter()
            cmd = [sys.executable, "-m", "platform.tune", "--space", args.space, "--recipe", recipe]
            cmd += ["--searcher", "random", "--scheduler", scheduler, "--seed", str(args.seed)]
            cmd += ["--num-samples", str(args.num_samples), "--max-epochs", str(args.max_epochs)]
            cmd += [
                "--grace-period",
                str(args.grace_period),
                "--reduction-factor",
                str(args.reduction_factor),
            ]
            cmd += [
                "--tracking-uri",
                uri,
                "--experiment",
                f"bench-{scheduler}",
                "--storage-path",
                f"{tmp}/ray",
            ]
            cmd += ["--recipe-out", f"{tmp}/{scheduler}.yaml", *args.overrides]
            print(f"--- {scheduler}: {' '.join(cmd[1:])}", flush=True)
            done = subprocess.run(cmd, cwd=_cli.REPO, check=False)
            if done.returncode:
                return done.returncode
            mlflow.set_tracking_uri(uri)
            parent = mlflow.search_runs(
                experiment_names=[f"bench-{scheduler}"],
                filter_string="tags.search_role = 'parent'",
                output_format="list",
            )[0]
            path = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="trials.csv")
            with open(path) as f:
                rows = list(csv.DictReader(f))
            out[scheduler] = dict(rows=rows, wall=time.perf_counter() - started)
    full = args.num_samples * args.max_epochs
    print(
        f"\n{args.num_samples} random trials (seed {args.seed}) of space {args.space}, {recipe}, "
        f"{args.max_epochs} epochs each; ASHA grace {args.grace_period}, reduction {args.reduction_factor:g}"
    )
    print(f"{'scheduler':10s} {'trial-epochs':>12s} {'compute':>8s} {'best ' + metric:>18s} {'wall s':>7s}")
    best = {}
    for scheduler, o in out.items():
        rows = o["rows"]
        epochs = sum(int(r["epochs"]) for r in rows)
        best[scheduler] = max(rows, key=lambda r: float(r[metric] or "-inf"))
        value = float(best[scheduler][metric])
        print(f"{scheduler:10s} {epochs:12d} {epochs / full:8.0%} {value:18.4f} {o['wall']:7.0f}")
    params = list(best["fifo"])[1 : list(best["fifo"]).index("epochs")]  # the searched columns
    same = all(best["fifo"][k] == best["asha"][k] for k in params)
    print(f"same best config in both: {'yes' if same else 'no'}")
    return 0


def bench_predict(args) -> int:
    from platform.benchmarks.predict import benchmark_predict

    benchmark_predict(args.recipe, args.images, args.mosaic, args.rounds)
    return 0


def bench_export(args) -> int:
    from platform.benchmarks.export import benchmark_export

    benchmark_export(args.rounds, args.images, args.threads)
    return 0


def bench_tiled(args) -> int:
    from platform.benchmarks.tiled import benchmark_tiled

    benchmark_tiled(args.mosaic, args.tile_size, args.overlap, args.batch, args.backbone, device=args.device)
    return 0


def bench_eval(args) -> int:
    from platform.benchmarks.evaluation import benchmark_evaluators

    benchmark_evaluators(images=args.images, grid=args.grid)
    return 0


def bench_data(args) -> int:
    """The loader must not be the bottleneck: >= 3x the model's consumption on the same cores."""
    from platform.benchmarks.data import benchmark_data

    volumes = Path(args.volumes) if args.volumes else _cli.REPO.parent / "shared" / "data" / "adrenal3d"
    benchmark_data(args.recipe, args.preset, args.loader_workers, args.steps, volumes)
    return 0


def bench_train(args) -> int:
    """Sides (today's loop in a plain process, the same under Ray Train, and each --variant in a plain
    process) run in turn for --rounds rounds, the order rotated each round, so that a drift of the machine
    (another process, thermal, the page cache) hits every side alike; ratios are taken within a round."""
    from platform.benchmarks.training import plain_side, ray_side
    from trainers.config import apply_overrides, parse_overrides
    from trainers.recipes import get_recipe

    overrides = parse_overrides(args.overrides)
    overrides["epochs"] = args.epochs
    if args.data:
        overrides["data"] = os.path.abspath(args.data)
    cfg = apply_overrides(get_recipe(args.recipe), overrides)
    threads = os.cpu_count() or 1
    sides = {"plain process": partial(plain_side, cfg, threads)}
    if not args.no_ray:
        sides["Ray Train, 1 worker"] = partial(ray_side, cfg, threads)
    for variant in args.variant:
        changed = apply_overrides(cfg, parse_overrides(variant.split(",")))
        sides[f"plain, {variant}"] = partial(plain_side, changed, threads)
    names = list(sides)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            print(f"round {round_ + 1}/{args.rounds}: {name}", flush=True)
            runs[name].append(sides[name]())
    print(
        f"\nrecipe {args.recipe}, backbone {cfg.backbone}, {cfg.min_size}px, batch {cfg.batch_size}, "
        f"{args.epochs} epochs per side and round (first = warm-up, excluded), {threads} CPU threads"
    )
    print(f"{'':36s} {'images/s':>9s} {'vs plain':>9s} {'threads':>8s}  per round: images/s (ratio)")
    plain = [r["images_per_s"] for r in runs["plain process"]]
    for name in names:
        rates = [r["images_per_s"] for r in runs[name]]
        ratios = [rate / base for rate, base in zip(rates, plain, strict=True)]
        per_round = "  ".join(f"{rate:.3f} ({ratio:.3f})" for rate, ratio in zip(rates, ratios, strict=True))
        mean_rate, mean_ratio, used = (
            statistics.mean(rates),
            statistics.mean(ratios),
            runs[name][-1]["threads"],
        )
        print(f"{name:36s} {mean_rate:9.3f} {mean_ratio:9.3f} {used:8d}  {per_round}")
    if not args.no_ray:
        ray_ratio = statistics.mean(
            r["images_per_s"] / b for r, b in zip(runs["Ray Train, 1 worker"], plain, strict=True)
        )
        overhead = 100 * (1 - ray_ratio)
        print(f"Ray/plain throughput ratio: {ray_ratio:.3f} (overhead {overhead:+.1f} %; goal <= 2 %)")
    return 0


if __name__ == "__main__":
    _cli.run(main)
