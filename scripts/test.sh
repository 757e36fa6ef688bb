#!/usr/bin/env bash
# Install the package with its test extras into .venv (created if missing) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps "lpips==0.1.4"  # LPIPS heads (vgg.pth) for the equivalence test; its torchvision import is never used
.venv/bin/python -m pytest -q tests "$@"
