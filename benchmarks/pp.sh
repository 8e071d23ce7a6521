#!/usr/bin/env bash
# plait 1F1B vs torch.distributed.pipelining Schedule1F1B, side by side; extra flags pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/plait bench pp --json "$@"
