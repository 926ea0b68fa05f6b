#!/usr/bin/env bash
# Install everything aiida-mlip needs on a fresh Debian machine: pw.x and its pseudopotentials (apt),
# a virtual environment in .venv with torch 2.13.0 (CPU) FIRST, then the package and its test extra.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# slurm-wlm and munge: the one-node SLURM of scripts/slurm_local.sh (tests/test_slurm.py); installed here so that
# the test run does not spend its time in apt.
APT_PACKAGES=(quantum-espresso quantum-espresso-data chromium openssh-server openssh-client slurm-wlm munge)
missing=()
for package in "${APT_PACKAGES[@]}" ${EXTRA_APT_PACKAGES:-}; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  echo "== pip install torch==2.13.0 (CPU) first"
  $PIP install torch==2.13.0
fi
echo "== pip install -e .[tests]"
$PIP install -c scripts/constraints.txt -e '.[tests]' 2>&1 | grep -vE "is ignored|^\s*$" || true
.venv/bin/python -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__' \
  || { echo "torch was changed by a dependency" >&2; exit 1; }
# importlib.metadata, not `import aiida`: importing aiida without AIIDA_PATH would create ~/.aiida.
echo "== installed: $(.venv/bin/python -c 'from importlib.metadata import version as v; print("aiida-core", v("aiida-core"), "| mace-torch", v("mace-torch"), "| torch", v("torch"))')"
