#!/usr/bin/env bash
# One command on a fresh machine: install, create the embedded profile (SQLite + ZeroMQ) in .aiida/ of this
# project, and run the main job: the reference campaign workflows/si_reference.yaml (Si labeled with the real pw.x,
# a committee of 3 tiny MACE models, EOS + elastic validated against DFT), then its HTML report in reports/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export AIIDA_PATH="$PWD/.aiida" OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
.venv/bin/aiida-mlip setup
.venv/bin/aiida-mlip campaign run workflows/si_reference.yaml | tee .aiida/si_reference.log
pk=$(sed -n 's/^CampaignWorkChain<\([0-9]*\)>.*/\1/p' .aiida/si_reference.log | tail -n 1)
.venv/bin/verdi process status "$pk" | head -n 40
.venv/bin/aiida-mlip report "$pk" -o reports/si_reference
