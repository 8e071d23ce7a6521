#!/usr/bin/env bash
# Measured pipeline bubble of a real step against the simulator, N runs of one recorded step.
# usage: benchmarks/bubble.sh [runs=10] [schedule=1f1b] [extra plait train flags...]
# Default: pp=2, 8 micro-batches of 2 sequences (default model), step 5 of 6 recorded.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}; schedule=${2:-1f1b}; shift $(( $# < 2 ? $# : 2 ))
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for i in $(seq 1 "$runs"); do
  .venv/bin/plait train --pp 2 --steps 6 --set train.micro_batch=2 --set parallel.schedule="$schedule" \
    --timeline 5 --sample 0 --no-progress --out "$tmp/run$i" "$@" >/dev/null 2>"$tmp/log" || { cat "$tmp/log"; exit 1; }
done
.venv/bin/python - "$tmp" "$runs" "$schedule" <<'PY'
import json, statistics, sys
tmp, runs, schedule = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print(f"schedule {schedule}: bubble of step 5 (idle share), measured vs the simulator")
print("run  measured  replay  (ratio)  expected  (ratio)  at-means  (ratio)  transfer_ms")
ratios = {"simulated": [], "expected": [], "predicted": []}
for i in range(1, runs + 1):
    r = json.load(open(f"{tmp}/run{i}/timeline.json"))
    m = r["measured"]["bubble_fraction"]
    cells = []
    for k in ratios:
        b = r[k]["bubble_fraction"]
        ratios[k].append(m / b)
        cells.append(f"{b:6.3f}  ({m / b:5.3f})")
    print(f"{i:3d}  {m:8.3f}  " + "  ".join(cells) + f"  {r['comm_s'] * 1e3:8.3f}")
for k, v in ratios.items():
    worst = max(v, key=lambda x: abs(x - 1))
    inside = sum(abs(x - 1) <= 0.1 for x in v)
    print(f"measured/{k}: median {statistics.median(v):.3f}, worst {worst:.3f}, within 10% in {inside} of {len(v)}")
PY
