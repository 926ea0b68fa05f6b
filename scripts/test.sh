#!/usr/bin/env bash
# One command on a fresh machine: install everything and run the test suite (real pw.x, real MACE training).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export AIIDA_PATH="$PWD/.aiida-test" OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
mkdir -p "$AIIDA_PATH"
# Two pytest-xdist workers, each module in one worker (tests/conftest.py): a single test stream keeps one core busy
# about two thirds of the time (engine polling, process start-up). Pass -n 0 to run serially.
exec .venv/bin/python -m pytest -n 2 --dist loadgroup --no-loadscope-reorder "$@"
