"""Stage 2: visual instruction tuning from a stage-1 checkpoint. Projector and LLM train, the vision tower is frozen.

    python sft_train.py --model_path checkpoints/pretrain --data_path datasets/LLaVA-Instruct-150K/llava_instruct_150k.json \
        --image_dir datasets/LLaVA-Instruct-150K/images --output_dir checkpoints/sft
"""

from settings import StageSettings
from utils import run_stage_from_args, stage_parser


def build_parser():
    return stage_parser(__doc__.splitlines()[0], lr=2e-5, train_vision=False, train_projector=True,
                        train_llm=True, max_length=2048, batch_size=8)


def main(argv=None):
    # A checkpoint's LoRA adapters stay adapters here (DPO folds them in: its starting model is its reference).
    return run_stage_from_args(StageSettings.from_args(build_parser().parse_args(argv), merge_loaded_adapters=False))


if __name__ == "__main__":
    main()
