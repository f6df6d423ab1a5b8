#!/usr/bin/env bash
# Stage 2 with LoRA adapters on the LLM (rank 64) and a fully trained projector; add --load_in_4bit for QLoRA.
# Merge afterwards with: python scripts/merge_lora.py --model_path checkpoints/sft_lora --output_dir checkpoints/sft_merged
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-4}
torchrun --standalone --nproc_per_node "$NPROC" sft_train.py \
    --model_path checkpoints/pretrain \
    --data_path datasets/LLaVA-Instruct-150K/llava_instruct_150k.json \
    --image_dir datasets/LLaVA-Instruct-150K/images \
    --output_dir checkpoints/sft_lora \
    --lora --lora_r 64 --lora_alpha 128 --lora_dropout 0.05 \
    --num_epochs 1 --batch_size 8 --grad_accum 4 --lr 2e-4 --projector_lr 2e-5 --warmup_ratio 0.03 \
    --max_length 2048 --num_workers 8 --gradient_checkpointing --save_steps 500 --skip_bad_samples --resume "$@"
