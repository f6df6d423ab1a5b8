#!/usr/bin/env bash
# Stage 2 with FSDP2: parameters, gradients and optimizer state sharded over the GPUs (same results as DDP).
# For users whose GPUs cannot hold a full replica plus AdamW state; the final checkpoint is a plain folder.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-4}
torchrun --standalone --nproc_per_node "$NPROC" sft_train.py \
    --model_path checkpoints/pretrain \
    --data_path datasets/LLaVA-Instruct-150K/llava_instruct_150k.json \
    --image_dir datasets/LLaVA-Instruct-150K/images \
    --output_dir checkpoints/sft_fsdp --fsdp \
    --num_epochs 1 --batch_size 8 --grad_accum 4 --lr 2e-5 --warmup_ratio 0.03 \
    --max_length 2048 --num_workers 8 --gradient_checkpointing --save_steps 500 --skip_bad_samples --resume "$@"
