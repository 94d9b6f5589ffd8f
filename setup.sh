#!/usr/bin/env bash
# Creates .venv and installs the pinned requirements (CPU build of jax).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt -r requirements-test.txt
