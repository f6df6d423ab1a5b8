#!/usr/bin/env bash
# Stage 1 of the real recipe on 4 GPUs: SigLIP-so400m + Qwen2.5-0.5B-Instruct, projector only, LLaVA-CC3M-Pretrain-595K.
# Global batch 256 = 4 GPUs x 32 x 2 accumulation; lr 1e-3; one epoch. Downloads: docs/REFERENCE.md, "The real recipe: downloads".
# Components are hub ids; point --vision_model / --llm_model at checkpoints/<folder> to use local copies.
# Run it with bash (NPROC=4 bash scripts/pretrain.sh [flags]): it calls torchrun itself (scripts/_torchrun.sh,
# which also reads NNODES, MASTER_ADDR and MASTER_PORT to span several machines).
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/_torchrun.sh pretrain_train.py \
    --vision_model "${VISION_MODEL:-google/siglip-so400m-patch14-384}" \
    --llm_model "${LLM_MODEL:-Qwen/Qwen2.5-0.5B-Instruct}" \
    --data_path datasets/LLaVA-CC3M-Pretrain-595K/chat.json \
    --image_dir datasets/LLaVA-CC3M-Pretrain-595K/images \
    --output_dir checkpoints/pretrain \
    --num_epochs 1 --batch_size 32 --grad_accum 2 --lr 1e-3 --warmup_ratio 0.03 \
    --max_length 1024 --num_workers 8 --save_steps 500 --skip_bad_samples --resume "$@"
