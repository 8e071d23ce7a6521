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
print(f"schedule {schedule}: bubble of step 5 (idle share), measured vs simulator")
print("run  measured  replay  (ratio)  predicted  (ratio)  transfer_ms")
rr, rp = [], []
for i in range(1, runs + 1):
    r = json.load(open(f"{tmp}/run{i}/timeline.json"))
    m, s, p = (r[k]["bubble_fraction"] for k in ("measured", "simulated", "predicted"))
    rr.append(m / s); rp.append(m / p)
    print(f"{i:3d}  {m:8.3f}  {s:6.3f}  ({m / s:5.3f})  {p:9.3f}  ({m / p:5.3f})  {r['comm_s'] * 1e3:8.3f}")
print(f"measured/replay: median {statistics.median(rr):.3f}, worst {max(rr, key=lambda x: abs(x - 1)):.3f}; "
      f"measured/predicted: median {statistics.median(rp):.3f}, worst {max(rp, key=lambda x: abs(x - 1)):.3f}")
PY
