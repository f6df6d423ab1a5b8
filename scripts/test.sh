#!/usr/bin/env bash
# Install what the tests need and run them (CPU, offline, a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -r requirements-dev.txt
python -m pytest -q tests "$@"
