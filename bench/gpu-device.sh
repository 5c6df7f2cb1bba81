#!/usr/bin/env bash
# The GPU check on a bare GPU machine: one with python3, torch, torchvision, timm, numpy, scikit-image,
# scikit-learn, opencv, tifffile, pillow, pyyaml, tqdm, pytest, requests, but none of this project's other
# dependencies and no network (bench/README.md says which machine, and which steps that skips).
#
#   here:  bash bench/gpu-device.sh prepare      the cp312 wheels into .whl/, the unseen DSB2018 images into
#                                                .gpu-data/ (both git-ignored; carry them to the machine)
#   there: bash bench/gpu-device.sh run [ARGS]   install the wheels into /tmp/site, unpack the images, run
#                                                `python3 -m platform.bench gpu ARGS`; with $OUT set, the
#                                                results and the log are written there as they come
set -euo pipefail
cd "$(dirname "$0")/.."

# What the steps import that such a machine lacks, at the versions .venv has (pyproject.toml's pins and their
# dependencies): COCO scoring, augmentation (albumentations needs pydantic, typing_extensions >= 4.16 and
# albucore's SIMD libraries), NIfTI (imported by the classifier's module). Not Ray: its wheel alone is 76 MiB,
# over the 64 MiB a device call carries, so the ray_train and serve steps are skipped there.
WHEELS=(
    pycocotools==2.0.11 faster-coco-eval==1.8.0 albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2
    simsimd==6.5.16 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing_extensions==4.16.0 nibabel==5.4.2
)
SHARED=../shared/data/dsb2018/stage1_train

prepare() {
    rm -rf .whl && mkdir -p .whl .gpu-data
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    # the quality step's validation images: those of ../shared/data that the bundled sample lacks (176)
    comm -23 <(ls "$SHARED" | sort) <(ls datasets/sample/dsb2018 | sort) |
        tar czf .gpu-data/dsb2018-unseen.tar.gz -C "$SHARED" -T -
    du -ch .whl/*.whl .gpu-data/* | tail -1
}

run() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site
    else
        echo "no .whl/ here (not carried?): the steps that need pycocotools or albumentations will fail" >&2
    fi
    export PYTHONUNBUFFERED=1
    if [ -f .gpu-data/dsb2018-unseen.tar.gz ]; then
        mkdir -p /tmp/dsb2018 && tar xzf .gpu-data/dsb2018-unseen.tar.gz -C /tmp/dsb2018
    fi
    # With $OUT set (the device call), the results are written there as each row is measured: a run that the
    # call's time limit kills still brings back what it measured (only $OUT comes back). Beside them go the
    # latest CPU figures (what the GPU's are compared with) and today's results of an earlier call, which a
    # rerun of some steps (--only STEP) adds to.
    local out=${OUT:-} log=/tmp/gpu-check.log
    if [ -n "$out" ]; then
        cp "$(ls bench/results/*-cpu.json | tail -1)" "$out"/
        cp bench/results/"$(date +%F)"-* "$out"/ 2>/dev/null || true
        log=$out/gpu-check.log
        set -- --out "$out" "$@"
    fi
    python3 -m platform.bench gpu --dsb2018 /tmp/dsb2018 "$@" 2>&1 | tee "$log"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift && run "$@" ;;
    *) echo "usage: bash bench/gpu-device.sh prepare | run [platform.bench gpu arguments]" >&2 && exit 2 ;;
esac
