#!/usr/bin/env bash
# Stage 2 with FSDP2: parameters, gradients and optimizer state sharded over the GPUs (same results as DDP), for
# GPUs that cannot hold a full replica plus AdamW state. scripts/sft.sh plus these flags (later flags win).
set -euo pipefail
exec bash "$(dirname "$0")/sft.sh" --output_dir checkpoints/sft_fsdp --fsdp "$@"
