#!/usr/bin/env bash
# plait data parallel vs torch DDP, side by side; pass extra flags through (e.g. --nproc 4).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/plait bench dp --json "$@"
