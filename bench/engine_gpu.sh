#!/usr/bin/env bash
# Every pending GPU check, as the GPU session runs them (docs/engine.md, "Speed on a GPU: how to measure"):
# issue 2's kernel tests (now also issue 15's Triton decode kernels, compiled), issue 15's launches per decode
# step (bench/decode_ops.py --device cuda), issue 4's 15B speed table, issue 3's 15B engine bench (its engine
# steps are issue 15's: paged pools, Triton decode, fla chunked prefill).
#
#   1. here (network; the dev machine):        bash bench/engine_gpu.sh wheels
#   2. on the GPU (device `run`, carry .whl):  bash bench/engine_gpu.sh first    # tests + 15B speed table, ~4-6 min
#   3. on the GPU (device `run`, carry .whl):  bash bench/engine_gpu.sh bench    # the 15B engine run, ~3-6 min
#   4. here, with the files of steps 2 and 3:  bash bench/engine_gpu.sh record DIR2 DIR3
#   5. here (CPU, ~30 min):                    bash bench/engine_gpu.sh simulate  # issues 6 and 19 on the measured table
#   6. here (CPU, seconds):                    bash bench/engine_gpu.sh speculation  # issue 16 on the measured table
# (`tests` and `profile` run step 2's halves alone.) Fifteen minutes of device time hold steps 2 and 3 and
# one machine start; give the machine back after step 3.
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
# The default CUDA grid (workers/profiling.py): batches 1-64, contexts 1k-32k, prefill chunk 2048.
PROFILE_ARGS=(profile --shape superapriel-15b --device cuda --dtype bfloat16)
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
profile)
    setup
    "$PY" -m router.cli "${PROFILE_ARGS[@]}" --out "$OUT/speed-15b.json" 2>&1 | tee "$OUT/profile.log"
    ;;
first)  # one device call for three checks; a failing test does not stop the rest
    setup
    # The GPU kernel tests: tests/gpu (fla prefill + Triton decode) and the Triton kernels compiled (not interpreted).
    "$PY" -m pytest -q tests/gpu tests/unit/model/test_triton_kernels.py -s 2>&1 | tee "$OUT/gpu_tests.log" || true
    # Issue 15: launches per decode step on CUDA do not grow with the batch (default checkpoint, bf16).
    "$PY" bench/decode_ops.py --device cuda --repeats 1 2>&1 | tee "$OUT/decode_ops_cuda.txt" || true
    "$PY" -m router.cli "${PROFILE_ARGS[@]}" --out "$OUT/speed-15b.json" 2>&1 | tee "$OUT/profile.log"
    ;;
bench)
    setup
    # Table and, last, one JSON summary line on stdout; progress and warnings on stderr.
    "$PY" -m router.cli "${BENCH_ARGS[@]}" --out "$OUT/engine_gpu.json" 2> >(tee "$OUT/engine_gpu.err" >&2) \
        | tee "$OUT/engine_gpu.txt"
    ;;
record)
    first=${2:?usage: bash bench/engine_gpu.sh record DIR2 DIR3  (step 2's files: speed-15b.json; step 3's: engine_gpu.*)}
    dir=${3:-$first}
    if [ -f "$first/speed-15b.json" ]; then  # shipped beside the roofline model, named by the GPU it ran on
        gpu=$(.venv/bin/python -c "import json, re, sys
name = json.load(open(sys.argv[1]))['fingerprint']['device']  # e.g. 'cuda: NVIDIA H100 80GB HBM3'
print(re.search(r'\b[A-Z]+[0-9]{2,}\b', name).group().lower())" "$first/speed-15b.json")
        mkdir -p router/assets/tables
        cp "$first/speed-15b.json" "router/assets/tables/speed-superapriel-15b-$gpu.json"
        cp "$first/gpu_tests.log" "bench/results/gpu_tests-$gpu.log"
    fi
    if [ -f "$first/decode_ops_cuda.txt" ]; then
        tail -n 1 "$first/decode_ops_cuda.txt" | .venv/bin/python bench/report.py record decode_ops_cuda \
            --command "python bench/decode_ops.py --device cuda --repeats 1"
    fi
    if [ -f "$dir/engine_gpu.json" ]; then
        cp "$dir/engine_gpu.json" bench/results/engine_gpu.json
        tail -n 1 "$dir/engine_gpu.txt" | .venv/bin/python bench/report.py record engine_gpu --command "$COMMAND"
        .venv/bin/python bench/report.py render
    fi
    ;;
speculation)  # issue 16: the router's predicted speculation gain at 4k/16k/32k on the measured 15B table
    table=$(ls router/assets/tables/speed-superapriel-15b-*.json | head -n 1)
    .venv/bin/python bench/report.py run speculation -- --only predict --speed "$table"
    ;;
simulate)  # issue 6: the simulator on the measured table instead of the roofline model
    table=$(ls router/assets/tables/speed-superapriel-15b-*.json | head -n 1)
    OMP_NUM_THREADS=1 .venv/bin/python bench/report.py run simulate -- --speed "$table" --requests 600 \
        --loads 2,4,5,6,7,8 --stats-period 0.1 --plot docs/img/simulation.png \
        --out bench/results/simulation-sweep-measured.json
    # issue 19: the autoscaling comparison (static peak fleet, scale-only, degrade-first) on the same table; the
    # static fleet is sized by what one replica serves on all-attention within budgets on this table: where the
    # sweep's fixed all-attention attainment crosses 95% (linear between loads), per replica (roofline: ~0.95/s).
    rate=$(.venv/bin/python -c "import json, sys
d = json.load(open(sys.argv[1]))
pts = [(r['rate'], r['fixed:all-attention']['attainment']) for r in d['sweep']]
at = pts[0][0]
for (r0, a0), (r1, a1) in zip(pts, pts[1:]):
    if a0 >= 0.95 > a1:
        at = r0 + (r1 - r0) * (a0 - 0.95) / (a0 - a1)
        break
    if a1 >= 0.95:
        at = r1
print(round(at / d['replicas'], 3))" \
        bench/results/simulation-sweep-measured.json)
    OMP_NUM_THREADS=1 .venv/bin/python bench/report.py run autoscale_sim -- --speed "$table" --replica-rate "$rate" \
        --jobs 2 --plot docs/img/autoscale-sim-measured.png --out bench/results/autoscale-sim-timeline-measured.json
    .venv/bin/python bench/report.py render
    ;;
*)
    sed -n '2,18p' "$0"
    exit 2
    ;;
esac
