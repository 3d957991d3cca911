#!/usr/bin/env bash
# Run the main job end to end on embedded defaults (SQLite, local spool, no Docker,
# no PostgreSQL): see `hpb-node demo --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/hpb-node demo "$@"
