#!/usr/bin/env bash
# The recipe's standard benchmarks through lmms-eval (eval_lmms.py), on every visible GPU, results beside the
# checkpoint in CHECKPOINT/lmms_eval/. The datasets come from the Hugging Face Hub on first use (cached in HF_HOME).
#   bash scripts/eval_benchmarks.sh checkpoints/sft                  # the suite below
#   TASKS=pope,mme bash scripts/eval_benchmarks.sh checkpoints/sft --limit 200
# The suite, and what each task measures:
#   pope            hallucination: "Is there a <object> in the image?" on COCO, yes/no (F1; random, popular and
#                   adversarial negatives)
#   mme             perception and cognition, 14 subtasks of yes/no pairs (perception score out of 2000)
#   mmbench_en_dev  multiple choice over 20 abilities (accuracy)
#   textvqa_val     reading text in images (VQA accuracy)
#   scienceqa_img   science multiple choice with an image (accuracy)
#   gqa             compositional questions about scenes (accuracy)
# Not in the default suite: mmmu_val has questions with several images, which the adapter refuses (the model
# places one image per conversation), and such a question stops the run.
# Environment: NPROC (default: every GPU), BATCH_SIZE (16 per GPU), DTYPE (auto: bf16 where the GPU has it).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: bash scripts/eval_benchmarks.sh CHECKPOINT [lmms-eval flags]}
shift
TASKS=${TASKS:-pope,mme,mmbench_en_dev,textvqa_val,scienceqa_img,gqa}
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
if ! python -c "import lmms_eval" 2>/dev/null; then
    python -m pip install -q --no-deps "lmms-eval==0.7.3"
    python -m pip install -q -r requirements-lmms.txt
fi
exec accelerate launch --num_processes "$NPROC" eval_lmms.py --model mary_vlm \
    --model_args "pretrained=$MODEL,dtype=${DTYPE:-auto}" --tasks "$TASKS" --batch_size "${BATCH_SIZE:-16}" \
    --log_samples --output_path "$MODEL/lmms_eval" "$@"
