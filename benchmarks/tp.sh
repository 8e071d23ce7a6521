#!/usr/bin/env bash
# plait tensor parallel vs DTensor, side by side; extra flags pass through
# (e.g. --set parallel.sequence_parallel=true).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/plait bench tp --json "$@"
