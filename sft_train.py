"""Stage 2: visual instruction tuning from a stage-1 checkpoint. Projector and LLM train, the vision tower is frozen.

    python sft_train.py --model_path checkpoints/pretrain --data_path datasets/LLaVA-Instruct-150K/llava_instruct_150k.json \
        --image_dir datasets/LLaVA-Instruct-150K/images --output_dir checkpoints/sft
"""

from utils import run_stage_from_args, stage_parser


def main(argv=None):
    parser = stage_parser(__doc__.splitlines()[0], lr=2e-5, train_vision=False, train_projector=True,
                          train_llm=True, max_length=2048, batch_size=8)
    return run_stage_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
