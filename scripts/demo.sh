#!/usr/bin/env bash
# One command on a fresh machine: install, create the embedded profile (SQLite + ZeroMQ) in .aiida/ of this
# project, and run the main job: DFT labeling of the reference Si structures with the real pw.x.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export AIIDA_PATH="$PWD/.aiida" OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
.venv/bin/aiida-mlip setup
.venv/bin/python examples/label_si.py
.venv/bin/verdi process list -a -p 1 | tail -n 15
