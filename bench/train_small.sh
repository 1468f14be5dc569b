#!/usr/bin/env bash
# The embedded default model, end to end on a CPU: train the teacher, distil the supernet, ship it with its tables.
#
#     bash bench/train_small.sh [RUNS]            # RUNS defaults to runs/ (git-ignored)
#     SKIP_TRAIN=1 bash bench/train_small.sh      # only the tables, from RUNS/supernet
#
# Steps (each resumes or is skipped when its output exists):
#   1. train teacher   (all attention, next-token loss)          RUNS/teacher
#   2. train supernet  (stochastic distillation from the teacher) RUNS/supernet
#   3. copy the checkpoint into router/assets/stdlib-supernet-8l (the embedded default)
#   4. held-out text: the corpus's held-out documents, all and in two halves (alternate documents)
#   5. evaluate 500 sampled placements + the 4 pure ones; fit the surrogate
#   6. profile this CPU; frontier + presets with the CPU table and with the 15B H100 roofline table
#   7. measure the presets and the pure placements on both halves (the noise check)
# The last line of stdout is one JSON summary (bench/report.py record model_small).
set -euo pipefail

cd "$(dirname "$0")/.."
RUNS="${1:-runs}"
ASSET=router/assets/stdlib-supernet-8l
ROUTER=.venv/bin/supernet-router
PY=.venv/bin/python
TEACHER_STEPS="${TEACHER_STEPS:-1000}"
SUPERNET_STEPS="${SUPERNET_STEPS:-350}"
TOKENS="${EVAL_TOKENS:-8192}"  # held-out tokens scored per placement (windows of 256)
mkdir -p "$RUNS" "$ASSET"

if [ -z "${SKIP_TRAIN:-}" ]; then
    "$ROUTER" train teacher --corpus stdlib --out "$RUNS/teacher" --steps "$TEACHER_STEPS" --device cpu
    "$ROUTER" train supernet --teacher "$RUNS/teacher" --corpus stdlib --out "$RUNS/supernet" \
        --steps "$SUPERNET_STEPS" --device cpu
fi
for f in config.json model.safetensors tokenizer.json tokenizer_config.json; do cp "$RUNS/supernet/$f" "$ASSET/$f"; done

"$PY" - "$RUNS" <<'PYEOF'
import json, sys
from workers.training.corpus import read_documents, split
runs = sys.argv[1]
_, held_out = split(read_documents("stdlib"))
def write(name, docs):
    with open(f"{runs}/{name}", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d.text}) + "\n")
write("heldout.jsonl", held_out)
write("heldout-a.jsonl", held_out[0::2])
write("heldout-b.jsonl", held_out[1::2])
print(f"{len(held_out)} held-out documents", file=sys.stderr)
PYEOF

PURE=(--placement AAAAAAAA --placement SSSSSSSS --placement GGGGGGGG --placement KKKKKKKK)
EVAL=(--context 256 --max-tokens "$TOKENS" --batch-windows 16 --device cpu)
"$ROUTER" evaluate --checkpoint "$ASSET" --data "$RUNS/heldout.jsonl" --placements 500 "${PURE[@]}" --seed 0 \
    "${EVAL[@]}" --out "$ASSET/quality.json"
"$ROUTER" fit --quality "$ASSET/quality.json" --out "$ASSET/surrogate.json"

[ -f "$ASSET/speed-cpu.json" ] || "$ROUTER" profile --checkpoint "$ASSET" --device cpu --repeats 9 --out "$ASSET/speed-cpu.json"
"$ROUTER" frontier --quality "$ASSET/quality.json" --surrogate "$ASSET/surrogate.json" --speed "$ASSET/speed-cpu.json" \
    --batch 8 --context 1024 --presets 4 --out "$ASSET/presets.json" --plot "$ASSET/frontier-cpu.png"
"$PY" bench/roofline_table.py --layers 8 --out "$RUNS/speed-h100-roofline.json" >/dev/null
"$ROUTER" frontier --quality "$ASSET/quality.json" --surrogate "$ASSET/surrogate.json" \
    --speed "$RUNS/speed-h100-roofline.json" --batch 64 --context 16384 --presets 4 \
    --out "$ASSET/presets-h100.json" --plot "$ASSET/frontier-h100.png"

PRESETS=($("$PY" -c '
import json, sys
codes = {p["placement"] for f in sys.argv[1:] for p in json.load(open(f))["presets"]}
print(" ".join(f"--placement {c}" for c in sorted(codes)))' "$ASSET/presets.json" "$ASSET/presets-h100.json"))
"$ROUTER" evaluate --checkpoint "$ASSET" --data "$RUNS/heldout.jsonl" "${PRESETS[@]}" "${EVAL[@]}" \
    --out "$RUNS/presets-measured.json"
for half in a b; do
    "$ROUTER" evaluate --checkpoint "$ASSET" --data "$RUNS/heldout-$half.jsonl" "${PURE[@]}" "${PRESETS[@]}" \
        "${EVAL[@]}" --out "$RUNS/halves-$half.json"
done
"$PY" bench/model_summary.py "$RUNS" "$ASSET"
