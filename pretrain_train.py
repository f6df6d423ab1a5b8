"""Stage 1: align the vision features to the LLM. Only the projector trains by default (LLaVA's recipe), on
captions in LLaVA's plain format: the image tokens, then the caption, no chat template (--prompt_format chat keeps it).

    python pretrain_train.py --data_path datasets/LLaVA-CC3M-Pretrain-595K/chat.json \
        --image_dir datasets/LLaVA-CC3M-Pretrain-595K/images --output_dir checkpoints/pretrain
"""

from settings import StageSettings
from utils import run_stage_from_args, stage_parser


def build_parser():
    return stage_parser(__doc__.splitlines()[0], lr=1e-3, train_vision=False, train_projector=True,
                        train_llm=False, max_length=1024, batch_size=32,
                        prompt_format="plain")


def main(argv=None):
    # A checkpoint's LoRA adapters stay adapters here (DPO folds them in: its starting model is its reference).
    return run_stage_from_args(StageSettings.from_args(build_parser().parse_args(argv), merge_loaded_adapters=False))


if __name__ == "__main__":
    main()
