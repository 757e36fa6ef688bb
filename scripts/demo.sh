#!/usr/bin/env bash
# Install the package into .venv (created if missing), train the default DDPM on the embedded
# shapes dataset, and write a sample grid. Extra arguments go to train.py (e.g. --config.training.num_steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${WORKDIR:-workdirs/ddpm_shapes}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
.venv/bin/python train.py --config=configs/ddpm_shapes.py --workdir="$WORKDIR" "$@"
.venv/bin/python sample.py --workdir="$WORKDIR" --num=16 --steps=50 --seed=0 \
  --out="$WORKDIR/samples/final_grid.png"
