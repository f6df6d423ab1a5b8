#!/usr/bin/env bash
# Stage 2 of the real recipe on 4 GPUs: from checkpoints/pretrain, projector + LLM, LLaVA-Instruct-150K.
# Global batch 128 = 4 GPUs x 8 x 4 accumulation; lr 2e-5 (projector the same); one epoch.
# --group_by_length: batches of similar length (LLaVA-1.5 groups by length in this stage too).
# For the Chinese data, add its file after the English one: --data_path a.json b.json (they are concatenated).
# Run it with bash (NPROC=4 bash scripts/sft.sh [flags]): it calls torchrun itself (scripts/_torchrun.sh,
# which also reads NNODES, MASTER_ADDR and MASTER_PORT to span several machines).
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/_torchrun.sh sft_train.py \
    --model_path checkpoints/pretrain \
    --data_path datasets/LLaVA-Instruct-150K/llava_instruct_150k.json \
    --image_dir datasets/LLaVA-Instruct-150K/images \
    --output_dir checkpoints/sft \
    --num_epochs 1 --batch_size 8 --grad_accum 4 --lr 2e-5 --warmup_ratio 0.03 \
    --max_length 2048 --num_workers 8 --gradient_checkpointing --group_by_length --save_steps 500 --skip_bad_samples \
    --resume "$@"
