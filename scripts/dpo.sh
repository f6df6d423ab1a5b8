#!/usr/bin/env bash
# Stage 3 of the real recipe on 4 GPUs: DPO from checkpoints/sft on RLAIF-V-style pairs.
# Global batch 64 = 4 GPUs x 8 x 2 accumulation; lr 1e-6; beta 0.1; reference log-probs precomputed in a first pass.
# Data: a JSON/JSONL/parquet of {"image", "question", "chosen", "rejected"} (RLAIF-V's parquet files work as they
# are: their image column holds the bytes). RLAIF-V is CC BY-NC 4.0: non-commercial use only.
# Run it with bash (NPROC=4 bash scripts/dpo.sh [flags]): it calls torchrun itself (scripts/_torchrun.sh,
# which also reads NNODES, MASTER_ADDR and MASTER_PORT to span several machines).
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/_torchrun.sh dpo_train.py \
    --model_path checkpoints/sft \
    --data_path datasets/RLAIF-V-Dataset \
    --output_dir checkpoints/dpo \
    --num_epochs 1 --batch_size 8 --grad_accum 2 --lr 1e-6 --beta 0.1 --warmup_ratio 0.1 \
    --max_length 2048 --num_workers 8 --gradient_checkpointing --precompute_ref \
    --save_steps 500 --skip_bad_samples --resume "$@"
