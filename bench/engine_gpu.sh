#!/usr/bin/env bash
# Issue 3, GPU speed: the exact commands the H100 session runs (docs/engine.md, "Speed on a GPU: how to measure").
#
#   1. here (network; the dev machine):      bash bench/engine_gpu.sh wheels
#   2. on the H100 (device `run`, carry .whl): bash bench/engine_gpu.sh tests    # fla kernels vs torch, ~1-2 min
#   3. on the H100 (device `run`, carry .whl): bash bench/engine_gpu.sh bench    # the 15B run, ~3-6 min
#   4. here, with the files of step 3 back:   bash bench/engine_gpu.sh record DIR
#
# Steps 2 and 3 write under $OUT (the device tool's folder that comes back; bench/results/gpu elsewhere).
# The device image has torch, triton, tqdm, safetensors, numpy, pytest, transformers, einops, but not
# pydantic or flash-linear-attention: step 1 downloads their wheels into .whl, carried to the device.
# `supernet-router bench` needs `bench_cli.register(commands)` in router/cli.py.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
OUT=${OUT:-bench/results/gpu}
BENCH_ARGS=(bench engine --shape superapriel-15b --device cuda --dtype bfloat16 --kernels fla
            --context 16384,32768 --batch auto --max-batch 256 --memory-fraction 0.8 --steps 20 --warmup 3 --seed 0)
# Default placements: all-attention, the seven published presets (counts spread evenly over 48 layers), all-gdn.
COMMAND="supernet-router ${BENCH_ARGS[*]} --out engine_gpu.json"
WHEELS=(pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 flash-linear-attention==0.6.0 fla-core==0.6.0)

setup() {  # on the device: install the carried wheels beside the image's torch, show what runs
    export PYTHONUNBUFFERED=1
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    mkdir -p "$OUT"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch, triton, fla, pydantic; print('torch', torch.__version__, 'triton', triton.__version__,
'fla', fla.__version__, torch.cuda.get_device_name())"
}

case "${1:-}" in
wheels)
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    ;;
tests)
    setup
    "$PY" -m pytest -q tests/gpu -s 2>&1 | tee "$OUT/gpu_tests.log"
    ;;
bench)
    setup
    # Table and, last, one JSON summary line on stdout; progress and warnings on stderr.
    "$PY" -m router.cli "${BENCH_ARGS[@]}" --out "$OUT/engine_gpu.json" 2> >(tee "$OUT/engine_gpu.err" >&2) \
        | tee "$OUT/engine_gpu.txt"
    ;;
record)
    dir=${2:?usage: bash bench/engine_gpu.sh record DIR  (the folder holding engine_gpu.json and engine_gpu.txt)}
    cp "$dir/engine_gpu.json" bench/results/engine_gpu.json
    tail -n 1 "$dir/engine_gpu.txt" | .venv/bin/python bench/report.py record engine_gpu --command "$COMMAND"
    .venv/bin/python bench/report.py render
    ;;
*)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
