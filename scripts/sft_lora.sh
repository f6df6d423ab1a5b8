#!/usr/bin/env bash
# Stage 2 with LoRA adapters on the LLM (rank 64) and a fully trained projector: scripts/sft.sh plus these flags
# (later flags win). Add --load_in_4bit for QLoRA. Merge afterwards with:
#   python scripts/merge_lora.py --model_path checkpoints/sft_lora --output_dir checkpoints/sft_merged
set -euo pipefail
exec bash "$(dirname "$0")/sft.sh" --output_dir checkpoints/sft_lora \
    --lora --lora_r 64 --lora_alpha 128 --lora_dropout 0.05 --lr 2e-4 --projector_lr 2e-5 "$@"
