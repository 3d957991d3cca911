#!/usr/bin/env bash
# Install everything the tests need, then lint, type-check and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --test
echo "[test] ruff"
.venv/bin/ruff check node models dicom_sr tests bench scripts
echo "[test] mypy"
.venv/bin/mypy
echo "[test] pytest"
mkdir -p test-artifacts
exec .venv/bin/python -m pytest "$@"
