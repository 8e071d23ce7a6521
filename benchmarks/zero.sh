#!/usr/bin/env bash
# plait ZeRO-3 vs torch fully_shard (the default), or --zero 1 / --zero 2 vs ZeroRedundancyOptimizer + DDP.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/plait bench zero --json "$@"
