#!/usr/bin/env bash
# One command on a fresh machine: install, create the embedded profile (SQLite + ZeroMQ) in .aiida/ of this
# project, and run the main job: the refinement campaign workflows/si_refinement.yaml (Si labeled with the real
# pw.x, a committee of 2 `accurate` MACE models, EOS, relaxed-ion Cij, phonons and MD validated against the same
# DFT, targeted labels and retraining until it passes or the budget is spent), then its HTML report in reports/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export AIIDA_PATH="$PWD/.aiida" OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
.venv/bin/aiida-mlip setup
.venv/bin/aiida-mlip campaign run workflows/si_refinement.yaml | tee .aiida/si_refinement.log
pk=$(sed -n 's/^CampaignWorkChain<\([0-9]*\)>.*/\1/p' .aiida/si_refinement.log | tail -n 1)
.venv/bin/verdi process status "$pk" | head -n 40
.venv/bin/aiida-mlip report "$pk" -o reports/si_refinement
