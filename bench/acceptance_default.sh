#!/usr/bin/env bash
# The default checkpoint's acceptance table: its presets (fastest, fast, balanced) drafting for the quality
# preset (all attention), greedy and at temperature 1, on the held-out stdlib documents the quality table
# was scored on. Writes router/assets/stdlib-supernet-8l/acceptance.json (shipped) unless OUT is given.
#   bash bench/acceptance_default.sh [RUNS]     # about a minute on this CPU; RUNS (default runs) gets heldout.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
ASSET=router/assets/stdlib-supernet-8l
OUT="${OUT:-$ASSET/acceptance.json}"
RUNS="${1:-runs}"
mkdir -p "$RUNS"
DATA="$RUNS/heldout.jsonl"  # the documents bench/train_small.sh scores the quality table on
"$PY" - "$DATA" <<'PYEOF'
import json, sys
from workers.training.corpus import read_documents, split
_, held_out = split(read_documents("stdlib"))
with open(sys.argv[1], "w") as f:
    for d in held_out:
        f.write(json.dumps({"text": d.text}) + "\n")
PYEOF
DRAFTS="$("$PY" -c "
from router.defaults import default_presets, SHIPPED
print(','.join(p.placement for p in default_presets(SHIPPED / 'presets.json') if p.name != 'quality'))")"
"$PY" -m router.cli acceptance --checkpoint "$ASSET" --data "$DATA" --targets AAAAAAAA --drafts "$DRAFTS" \
    --tokens 4 --prompts 8 --prompt-tokens 64 --max-tokens 64 --seed 0 --device cpu --out "$OUT"
