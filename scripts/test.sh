#!/usr/bin/env bash
# Install what the tests need and run them (CPU, offline, a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -r requirements-dev.txt
python -m pip install -q --no-deps -e .  # the project importable from scripts/, benchmarks/ and tests/
# lmms-eval without its ~50 dependencies (requirements-lmms.txt says why), for the benchmark adapter's tests.
python -m pip install -q --no-deps "lmms-eval==0.7.3"
python -m pip install -q -r requirements-lmms.txt
# The demo's browser test drives Debian's chromium; where it cannot be installed that one test is skipped.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "chromium not installed"
fi
python -m pytest -q tests "$@"
