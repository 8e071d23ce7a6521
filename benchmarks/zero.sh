#!/usr/bin/env bash
# plait ZeRO-1 (or --zero 2) vs torch ZeroRedundancyOptimizer + DDP, side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/plait bench zero --json "$@"
