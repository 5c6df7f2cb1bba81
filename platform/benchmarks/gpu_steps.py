"""The steps of the GPU check (`python -m platform.bench gpu`; platform/benchmarks/gpu.py runs them in
STEPS's order, most valuable first). Each measures one thing on the device it is given with the project's
own code (the training step, the one inference path, the benchmarks of `bench train`, `tiled`, `serve` and
`quality`), adds its results row by row to its Context (each row is saved as it comes, so a run cut short
keeps what it measured) and keeps to its time budget. Each imports what it needs only when it runs: a GPU
machine with torch but without Ray, MLflow or FastAPI runs every step that needs none of them, and the
others are skipped naming the missing package. `--smoke` gives every step tiny sizes (SMOKE) so that the
test suite runs them all on a CPU and the check cannot rot before a GPU shows up."""

import os
import re
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AMP_MODES = ("off", "bf16", "fp16")
# Detectron2's MODEL_ZOO.md: mask_rcnn_R_50_FPN_1x trains at 0.261 s/iter with 2 images per V100 (800-1333 px,
# FrozenBN, stem and res2 frozen): the published figure the R50-FPN rows are read against.
DETECTRON2_S_PER_ITER, DETECTRON2_IMAGES_PER_GPU = 0.261, 2
QUALITY_RECIPE = "dsb2018_cpu"
# What trainers/recipes.py measured of QUALITY_RECIPE on 2 CPU cores, for the quality step's table.
CPU_RECIPE_NOTE = (
    "the same recipe on 2 CPU cores (trainers/recipes.py): 90 epochs in ~20-33 min; on these 176 images segm "
    "AP / Kaggle, at the cut-off each seed chose: seed 1 0.353 / 0.417 without TTA, 0.364 / 0.431 with "
    "tta=flips; seed 0 0.357 / 0.437 with tta=flips; Otsu 0.312 / 0.416, Otsu + watershed 0.321 / 0.423"
)
CLASSIFIER_CLASSES = 12  # ForamDeepSlice's species (RECIPES.md 2): the head's size hardly matters
# A smoke run's Mask R-CNN: native 64 px tiles (nothing to resize, masks included), light heads and few
# proposals and detections (random weights fill every detection slot, and the mask head costs per slot),
# no bf16 (emulated, slow, on CPUs without AVX-512 BF16)
SMOKE_DETECTOR = {
    "tile_size": 64,
    "tile_overlap": 16,
    "augment": "flips",
    "mask_head_channels": 16,
    "rpn_batch_size_per_image": 32,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 16,
    "box_detections_per_img": 10,
    "amp": "off",
}


class Skipped(Exception):
    """A step, or a part of one, that cannot run here; the message says why."""


@dataclass(frozen=True)
class Sizes:
    """How much each step does: GPU (the real run), CPU_REFERENCE (`--device cpu`: the CPU figures the
    GPU's are compared with) and SMOKE (every step in seconds on a CPU)."""

    batches: tuple[int, ...] = (2, 4, 8)  # Mask R-CNN images per step (per GPU)
    warm_steps: int = 2  # untimed steps before each timed configuration (allocations, kernel choice)
    timed_steps: int = 8  # timed Mask R-CNN steps per configuration
    classifier_steps: int = 20  # timed classifier steps per configuration
    image_side: int = 1024  # the whole image of the s/image figure
    repeats: int = 5  # timed calls on it; the median counts
    mosaic: int = 2048  # side of the tiled-inference mosaic
    tile_size: int = 512
    tile_batch: int = 8  # tiles per forward call
    train_s: float = 180.0  # the quality step's training, at most
    score_reserve_s: float = 40.0  # of the quality step's budget, kept for scoring after training
    serve_s: float = 12.0  # length of the serve load tests (`bench serve --seconds`)
    serve_mosaic: int = 2048
    ray_epochs: int = 3  # epochs per side of the plain/Ray Train comparison, the first one warm-up
    amps: tuple[str, ...] = AMP_MODES  # the AMP modes of the throughput rows
    budget_factor: float = 1.0  # the steps' budgets and the run's minutes are for a GPU: times this
    detections: int = 100  # detections per image of the inference step's random-weight model
    smoke: bool = False  # tiny models and data in every step (SMOKE_DETECTOR)


GPU = Sizes()
CPU_REFERENCE = replace(GPU, repeats=1, tile_batch=4, budget_factor=20.0)
SMOKE = Sizes(
    batches=(2,),
    warm_steps=0,
    timed_steps=1,
    classifier_steps=1,
    image_side=128,
    repeats=1,
    mosaic=192,
    tile_size=128,
    tile_batch=2,
    train_s=0.0,
    score_reserve_s=0.0,
    serve_s=1.5,
    serve_mosaic=256,
    ray_epochs=2,
    amps=("off", "fp16"),
    detections=10,
    budget_factor=4.0,  # a CPU starting Ray and Serve, not a GPU node's 16 cores
    smoke=True,
)


@dataclass
class Context:
    """What a step gets: the device, its sizes, when it must be done, where its data and the earlier results
    are, a temporary folder, and the lists its rows and notes go to (`add` and `note` save them)."""

    device: str  # "cuda" or "cpu"
    sizes: Sizes
    deadline: float  # time.perf_counter() by which the step should be done
    started: float  # time.perf_counter() at the start of the run, for the progress lines
    dsb2018: Path  # DSB2018 image folders; those not in the bundled sample are the quality step's images
    results: Path  # the results folder: the latest CPU run there gives the CPU figures
    work: Path
    save: Callable[[], None] = lambda: None
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s] {text}", flush=True)

    def add(self, **row) -> None:
        self.rows.append(row)
        self.say(", ".join(f"{k} {_short(v)}" for k, v in row.items()))
        self.save()

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.say(text)
        self.save()


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Step:
    name: str
    title: str  # its section's heading in the results
    budget_s: float  # its share of the run's 8 minutes
    run: Callable[[Context], None]
    needs: tuple[str, ...] = ()  # modules it cannot run without, checked before it starts


def _free_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def maskrcnn_configs(smoke: bool) -> list[tuple[str, object]]:
    """(name, config) of the two Mask R-CNN recipes the throughput rows are for: R50-FPN at the DSB2018
    recipe's size (2x upsampled 512 px crops, short side 512) and the ResNet-18 CPU recipe (256 px tiles)."""
    from trainers.config import apply_overrides
    from trainers.recipes import get_recipe

    # dsb2018_maskrcnn without its COCO weights (no download) and trained from res3 up, as Detectron2's
    # anchor figure is (the recipe's first phase trains the heads only)
    r50 = apply_overrides(get_recipe("dsb2018_maskrcnn"), {"weights": "", "trainable_backbone_layers": 3})
    r18 = get_recipe("dsb2018_cpu")
    if smoke:
        r50, r18 = apply_overrides(r50, SMOKE_DETECTOR), apply_overrides(r18, SMOKE_DETECTOR)
    return [
        (f"R50-FPN dsb2018_maskrcnn {r50.tile_size or r50.min_size} px", r50),
        (f"R18-FPN dsb2018_cpu {r18.tile_size} px tiles", r18),
    ]


def sample_pool(cfg, count: int) -> list:
    """`count` training samples of `cfg` (the bundled sample, augmented as training augments it), made
    once: the batches of every configuration are cut from them, so the GPU's rate is not the loader's."""
    from trainers.detection.train import config_split, train_set_of

    dataset = train_set_of(cfg, config_split(cfg)[0], rank=0)
    return [dataset[i % len(dataset)] for i in range(count)]


def batches_of(pool: list, batch: int, count: int) -> list:
    from datasets.instances import collate

    return [collate([pool[(k * batch + j) % len(pool)] for j in range(batch)]) for k in range(count)]


def measure_config(ctx: Context, cfg, pool: list, channels_last: bool, measure) -> dict:
    """One configuration's row: its numbers, or why there are none (out of memory is a result)."""
    import torch

    from datasets.errors import UserError

    s = ctx.sizes
    warm, timed = (
        batches_of(pool, cfg.batch_size, s.warm_steps),
        batches_of(pool, cfg.batch_size, s.timed_steps),
    )
    try:
        numbers = measure(cfg, warm, timed, ctx.device, channels_last)
    except torch.cuda.OutOfMemoryError:
        _free_gpu_memory()  # after the except block: its traceback held the model's tensors
        return {"status": "out of memory"}
    except UserError as e:  # amp=fp16 on a CPU
        return {"status": f"not run: {e}"}
    except Exception as e:  # a non-finite loss, ...: this row's result, the next configuration still runs
        _free_gpu_memory()
        return {"status": f"error: {type(e).__name__}: {str(e)[:300]}"}
    rate = numbers["images_per_s"]
    return {"status": "measured", "images_per_s": rate, "s_per_iter": cfg.batch_size / rate, **numbers}


def sweep(ctx: Context, name: str, cfg, pool: list, channels_last: bool, measure) -> None:
    """AMP off/bf16/fp16 x each batch size of one model and memory layout, a row each. A batch size that ran
    out of memory ends that AMP mode's larger ones; once the step's budget is spent the rest are listed as
    not run."""
    for amp in ctx.sizes.amps:
        out_of_memory_at = None
        for batch in ctx.sizes.batches:
            row = dict(model=name, amp=amp, batch=batch, channels_last=channels_last)
            if out_of_memory_at is not None:
                ctx.add(**row, status=f"not run: out of memory at batch {out_of_memory_at}")
            elif ctx.left() <= 0:
                ctx.add(**row, status="not run: step budget spent")
            else:
                result = measure_config(
                    ctx, replace(cfg, amp=amp, batch_size=batch), pool, channels_last, measure
                )
                ctx.add(**row, **result)
                if result["status"] == "out of memory":
                    out_of_memory_at = batch


def maskrcnn_step(ctx: Context) -> None:
    """Mask R-CNN training images/s of both recipes: AMP x batch per GPU x channels-last, peak GPU memory;
    Detectron2's published R50-FPN figure beside them."""
    from platform.benchmarks.training import train_rate

    s = ctx.sizes
    models = [(name, cfg, sample_pool(cfg, 2 * max(s.batches))) for name, cfg in maskrcnn_configs(s.smoke)]
    for channels_last in (False, True):  # both models' default layout first: the rows a short budget keeps
        for name, cfg, pool in models:
            sweep(ctx, name, cfg, pool, channels_last, train_rate)
    anchor = DETECTRON2_IMAGES_PER_GPU / DETECTRON2_S_PER_ITER
    ours = [r for r in ctx.rows if r["model"].startswith("R50") and r.get("images_per_s") and r["batch"] == 2]
    best = max(ours, key=lambda r: r["images_per_s"], default=None)
    line = (
        f"anchor: Detectron2 R50-FPN Mask R-CNN trains at {DETECTRON2_S_PER_ITER} s/iter with "
        f"{DETECTRON2_IMAGES_PER_GPU} images per V100 = {anchor:.1f} images/s (800-1333 px)"
    )
    if best:
        line += (
            f"; here {best['model']}, batch 2: up to {best['images_per_s']:.1f} images/s "
            f"(amp {best['amp']}, channels-last {'on' if best['channels_last'] else 'off'})"
        )
    ctx.note(line)
    ctx.note("batches are prepared before the timing: the model's rate, not the loader's (`bench data`)")


def classifier_configs(smoke: bool) -> list[tuple[str, object]]:
    """(name, config): the ResNet-18 CPU recipe and foramdeepslice's ConvNeXt-Large with random weights."""
    from trainers.config import apply_overrides
    from trainers.recipes import get_recipe

    resnet = get_recipe("adrenal3d_cpu")
    convnext = apply_overrides(get_recipe("foramdeepslice"), {"pretrained": ""})  # no download
    if smoke:
        resnet = apply_overrides(resnet, {"input_size": 32, "batch_size": 4})
        convnext = apply_overrides(
            convnext, {"model_name": "convnext_atto", "input_size": 32, "batch_size": 2}
        )
    return [
        (f"ResNet-18 adrenal3d_cpu {resnet.input_size} px", resnet),
        (f"{convnext.model_name} foramdeepslice {convnext.input_size} px", convnext),
    ]


def classifier_rate(model, cfg, steps: int, warm: int, device: str) -> dict:
    """Training steps of the classifier (trainers.classification.train.train_step: AdamW, autocast to
    cfg.amp, fp16's GradScaler) on one batch of random slices: images/s and peak GPU memory."""
    import torch

    from trainers.classification.train import train_step
    from trainers.run import autocast_dtype, grad_scaler

    images = torch.randn(cfg.batch_size, cfg.in_chans, cfg.input_size, cfg.input_size, device=device)
    targets = torch.randint(0, CLASSIFIER_CLASSES, (cfg.batch_size,), device=device)
    options = dict(
        optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay),
        loss_fn=torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        scaler=grad_scaler(cfg),
        amp_dtype=autocast_dtype(cfg, device),
    )
    model.train()
    for _ in range(warm):
        train_step(model, images, targets, **options)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, images, targets, **options)  # returns loss.item(): each step has finished
    rate = cfg.batch_size * steps / (time.perf_counter() - started)
    return {"images_per_s": rate, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def classifier_step(ctx: Context) -> None:
    """Slice classifier training images/s, AMP off/bf16/fp16, at each recipe's input size and batch."""
    import torch

    from datasets.errors import UserError
    from trainers.classification.model import build_classifier

    s = ctx.sizes
    for name, cfg in classifier_configs(s.smoke):
        torch.manual_seed(0)
        model = build_classifier(cfg, CLASSIFIER_CLASSES).to(ctx.device)
        for amp in s.amps:
            row = dict(model=name, amp=amp, batch=cfg.batch_size)
            if ctx.left() <= 0:
                ctx.add(**row, status="not run: step budget spent")
                continue
            try:
                numbers = classifier_rate(
                    model, replace(cfg, amp=amp), s.classifier_steps, s.warm_steps, ctx.device
                )
            except UserError as e:  # amp=fp16 on a CPU
                ctx.add(**row, status=f"not run: {e}")
                continue
            ctx.add(**row, status="measured", **numbers)
        del model
        _free_gpu_memory()


def junit_rows(report: Path) -> list[dict]:
    """One row per test case of a pytest JUnit XML report: test, outcome, seconds, message."""
    rows = []
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "failed" if child.tag == "failure" else child.tag
                message = (child.get("message") or "").strip().split("\n")[0][:300]
        rows.append(
            dict(test=case.get("name"), outcome=outcome, seconds=float(case.get("time", 0)), message=message)
        )
    return rows


def verbose_rows(output: str) -> list[dict]:
    """Rows from the progress lines of `pytest -v`: what a run stopped at the budget had printed."""
    lines = re.finditer(r"^tests/\S+::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", output, re.MULTILINE)
    return [dict(test=m[1], outcome=m[2].lower(), seconds=None, message="") for m in lines]


def gpu_tests_step(ctx: Context) -> None:
    """`pytest -m gpu tests/test_gpu.py`: what only a GPU can check (AMP steps, sync_bn, NCCL, tiled
    inference against the CPU, Serve on a GPU), one row per test."""
    report = ctx.work / "junit.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "tests/test_gpu.py",
        "-v",
        "-p",
        "no:cacheprovider",
    ]
    try:
        done = subprocess.run(
            [*command, f"--junitxml={report}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=max(ctx.left(), 10),
        )
        output, summary = done.stdout, (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    except subprocess.TimeoutExpired as e:  # its output so far is bytes, whatever text= says
        output, summary = (e.stdout or b"").decode(errors="replace"), "stopped at the step's budget"
    for row in junit_rows(report) if report.exists() else verbose_rows(output):
        ctx.add(**row)
    ctx.note(f"pytest: {summary}")


def cpu_figures(results: Path) -> dict[str, float]:
    """The latest CPU reference run's inference figures in `results` ({measure: value}), or {}."""
    import json

    for path in sorted(results.glob("*-cpu.json"), reverse=True):
        step = json.loads(path.read_text()).get("steps", {}).get("inference", {})
        if step.get("status") == "measured":
            return {r["measure"]: r["value"] for r in step["rows"] if isinstance(r.get("value"), float)}
    return {}


def whole_image_seconds(ctx: Context) -> tuple[float, float | None]:
    """(median s/image, peak GPU GiB) of a side x side image through the one inference path, whole, with a
    random-weight R50-FPN at that input size (one untimed call first)."""
    import torch

    from platform.benchmarks.tiled import random_detector_config, sample_mosaic
    from trainers.detection.inference import predict_image
    from trainers.detection.model import build_model

    side, repeats = ctx.sizes.image_side, ctx.sizes.repeats
    cfg = random_detector_config("resnet50_fpn", side, detections=ctx.sizes.detections)
    torch.manual_seed(0)
    model = build_model(cfg, 1).to(ctx.device).eval()
    image = sample_mosaic(side)
    predict_image(model, image, ctx.device, cfg=cfg)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        predict_image(model, image, ctx.device, cfg=cfg)  # returns COCO results on the host: finished
        seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.cuda else None
    return statistics.median(seconds), peak


def inference_step(ctx: Context) -> None:
    """s/image of a 1024 px image and s/MP of tiled inference on a mosaic (R50-FPN, random weights), beside
    the latest CPU reference run's figures."""
    from platform.benchmarks.tiled import benchmark_tiled

    s = ctx.sizes
    cpu = {} if not ctx.cuda else cpu_figures(ctx.results)

    def add(measure: str, value: float, **more) -> None:
        row = dict(measure=measure, value=value, **more)
        if measure in cpu:
            row.update(cpu=cpu[measure], cpu_over_this=cpu[measure] / value)
        ctx.add(**row)

    seconds, peak = whole_image_seconds(ctx)
    add(f"s/image, {s.image_side} px image, whole", seconds, peak_gib=peak, repeats=s.repeats)
    tiled = benchmark_tiled(
        s.mosaic,
        s.tile_size,
        64,
        s.tile_batch,
        "resnet50_fpn",
        device=ctx.device,
        sahi=False,
        detections=s.detections,
    )
    what = f"{s.tile_size} px tiles, batch {s.tile_batch}, {tiled['tiles']} tiles"
    add("s/MP tiled", tiled["seconds_per_megapixel"], detail=f"{s.mosaic} px mosaic, {what}")
    add(
        "tiling and stitching overhead %",
        tiled["overhead_percent"],
        detail="over the sum of the tiles' forwards",
    )
    add(
        "peak RSS MiB, tiled", tiled["peak_rss_mib"], detail=f"the mosaic itself {tiled['image_mib']:.0f} MiB"
    )
    if ctx.cuda and not cpu:
        ctx.note(
            "no CPU figures: run `python -m platform.bench gpu --device cpu --only inference` on a CPU "
            "machine and commit its results"
        )
    elif cpu:
        ctx.note(
            "cpu: the latest `--device cpu` run in the results folder (its mosaic is smaller; s/MP compares)"
        )


def smoke_split(work: Path, train: int = 1, val: int = 1) -> Path:
    """A split file of the first bundled sample images (`train`, then `val` of them): a smoke run's data."""
    import json

    from datasets.instances import SAMPLE_DATA, read_records

    ids = [r.image_id for r in read_records(SAMPLE_DATA)[: train + val]]
    path = work / "smoke-split.json"
    path.write_text(json.dumps({"train": ids[:train], "val": ids[train:]}))
    return path


def ray_train_step(ctx: Context) -> None:
    """The training loop of the R50-FPN recipe (bf16 on a GPU, batch 2) in a plain process and as one Ray
    Train worker (`bench train`'s two sides): images/s each, and Ray's overhead (goal <= 2 %)."""
    from platform.benchmarks.training import plain_side, ray_side
    from trainers.config import apply_overrides

    s = ctx.sizes
    cfg = apply_overrides(maskrcnn_configs(s.smoke)[0][1], {"batch_size": 2, "epochs": s.ray_epochs})
    cfg = replace(cfg, amp="bf16" if ctx.cuda else "off")
    if s.smoke:
        cfg = apply_overrides(cfg, {"split_file": str(smoke_split(ctx.work, train=2))})
    threads = os.cpu_count() or 1
    plain = plain_side(cfg, threads, ctx.device)
    ctx.add(side="plain process", images_per_s=plain["images_per_s"], epoch_s=plain["epoch_s"], ratio=1.0)
    ray = ray_side(cfg, threads, gpus=1 if ctx.cuda else 0)
    ratio = ray["images_per_s"] / plain["images_per_s"]
    ctx.add(side="Ray Train, 1 worker", images_per_s=ray["images_per_s"], epoch_s=ray["epoch_s"], ratio=ratio)
    ctx.note(
        f"Ray/plain throughput {ratio:.3f}: overhead {100 * (1 - ratio):+.1f} % (goal <= 2 %); "
        f"{s.ray_epochs} epochs per side, the first one warm-up; {threads} CPU threads"
    )


def serve_step(ctx: Context) -> None:
    """`bench serve` on this machine: Serve's p50 overhead over the in-process call for /v1/segment and
    /v1/classify (goal <= 5 ms), batching on and off, the detector and classifier sharing the GPU."""
    from platform.benchmarks.serve import benchmark_serve

    s = ctx.sizes
    numbers = benchmark_serve(
        None,
        None,
        None,
        clients=2 if s.smoke else 8,
        seconds=s.serve_s,
        batch_clients=4 if s.smoke else 16,
        mosaic=s.serve_mosaic,
        tile_size=s.tile_size,
        gpus_per_replica=0.5 if ctx.cuda else 0,  # two deployments on one GPU
    )
    for group in ("in_process", "batching_on", "batching_off"):
        for test, r in numbers[group].items():
            ctx.add(test=f"{group} {test}", **{k: v for k, v in r.items()})
    for key, value in numbers["overheads"].items():
        ctx.note(f"{key}: {value:+.1f} ms (goal <= 5 ms)" if key.endswith("_ms") else f"{key}: {value:.2f}x")
    mosaic = numbers["mosaic"]
    ctx.note(
        f"mosaic {mosaic['mosaic']} px through /v1/segment: HTTP {mosaic['status']}, {mosaic['tiles']} "
        f"tiles, {mosaic['seconds']:.2f} s, detector replica peak RSS {mosaic['peak']:.0f} MB"
    )


def quality_row(row) -> dict:
    """platform.benchmarks.quality's Row as a results row."""
    from platform.benchmarks.quality import SHOWN

    return dict(model=row.name, **{k: row.metrics.get(k) for k in SHOWN}, seconds=row.seconds, note=row.note)


def fit_epochs(ctx: Context, overrides: list[str]) -> list[str]:
    """The recipe's epochs, or as many as fit the training budget (one epoch timed on a 2-epoch run,
    validation and checkpoint included), with its lr steps moved to the same fraction of the run."""
    from platform.benchmarks.quality import train_recipe
    from trainers.recipes import get_recipe

    recipe = get_recipe(QUALITY_RECIPE)
    reports = train_recipe(QUALITY_RECIPE, 0, [*overrides, "epochs=2"], ctx.work / "timing", ctx.device)[2]
    epoch_s = reports[1]["wall_s"] - reports[0]["wall_s"]
    budget = min(ctx.sizes.train_s, ctx.left() - ctx.sizes.score_reserve_s)
    epochs = max(1, min(recipe.epochs, int(budget / epoch_s)))
    steps = ",".join(str(max(1, round(e * epochs / recipe.epochs))) for e in recipe.lr_steps)
    ctx.note(
        f"one epoch of {QUALITY_RECIPE} takes {epoch_s:.2f} s here (validation and checkpoint included): "
        f"{epochs} of its {recipe.epochs} epochs fit a {max(budget, 0):.0f} s training budget"
    )
    return [*overrides, f"epochs={epochs}"] + ([f"lr_steps={steps}"] if steps else [])


def quality_step(ctx: Context) -> None:
    """The CPU recipe trained from scratch for at most 3 minutes with its AMP on this device, on the bundled
    sample as it trains on a CPU, scored on the DSB2018 images not in the bundle beside the Otsu baseline."""
    from datasets.errors import UserError
    from datasets.instances import InstanceDataset, coco_ground_truth
    from platform.benchmarks.quality import (
        score_baselines,
        score_checkpoints,
        train_recipe,
        validation_records,
    )

    try:
        records = validation_records(ctx.dsb2018)
    except UserError as e:
        raise Skipped(str(e)) from None
    overrides = []
    if ctx.sizes.smoke:  # the two smallest images; one training and one validation image of the bundle
        records = sorted(records, key=lambda r: r.image_path.stat().st_size)[:2]
        smoke = {**SMOKE_DETECTOR, "tile_size": 128, "tile_overlap": 0, "split_file": smoke_split(ctx.work)}
        overrides = [f"{k}={v}" for k, v in smoke.items()]
    ctx.note(f"validation: {len(records)} DSB2018 images not in the bundled sample ({ctx.dsb2018})")
    gt = coco_ground_truth(InstanceDataset(records))
    for row in score_baselines(records, gt, methods=("otsu",)):
        ctx.add(**quality_row(row))
    overrides = fit_epochs(ctx, overrides)
    folder, seconds, reports = train_recipe(QUALITY_RECIPE, 0, overrides, ctx.work, ctx.device)
    last = reports[-1]
    ctx.add(
        model=f"training {folder.name} on {ctx.device}",
        seconds=seconds,
        note=f"{' '.join(overrides)}; best epoch {last['best_epoch']:.0f}, segm_AP "
        f"{last['best_segm_AP']:.3f} on the recipe's own validation images",
    )
    # scored without TTA: flips would take 4x the step's scoring time
    for row in score_checkpoints([folder], records, gt, "off", ctx.device):
        ctx.add(**quality_row(row))
    ctx.note(CPU_RECIPE_NOTE)


STEPS = (
    Step("maskrcnn", "Mask R-CNN training throughput", 70, maskrcnn_step),
    Step("classifier", "Slice classifier training throughput", 15, classifier_step),
    Step("gpu_tests", "pytest -m gpu (tests/test_gpu.py)", 45, gpu_tests_step, needs=("pytest",)),
    Step("inference", "Inference: a whole 1024 px image, a tiled mosaic", 25, inference_step),
    Step(
        "ray_train", "The training loop in a plain process and under Ray Train", 45, ray_train_step, ("ray",)
    ),
    Step(
        "serve",
        "Serve over HTTP vs in-process, batching on/off",
        30,
        serve_step,
        ("ray", "mlflow", "fastapi"),
    ),
    Step("quality", "3-minute training, scored on the unseen DSB2018 images", 250, quality_step),
)
