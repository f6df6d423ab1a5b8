"""Fold a LoRA checkpoint's adapters into its weights and write a plain VLM checkpoint.

    python scripts/merge_lora.py --model_path checkpoints/sft_lora --output_dir checkpoints/sft_merged
"""

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True, help="a checkpoint folder written by a --lora run")
    parser.add_argument("--output_dir", required=True, help="where the merged checkpoint goes")
    args = parser.parse_args(argv)

    from lora import adapter_parameters, merge_adapters
    from model import VLM

    model = VLM.from_pretrained(args.model_path)
    if not model.config.lora:
        raise SystemExit(f"{args.model_path} has no LoRA adapters: nothing to merge")
    adapters = len(adapter_parameters(model))
    merge_adapters(model).save_pretrained(args.output_dir)
    print(f"merged {adapters} adapter tensors of {args.model_path} into {args.output_dir}")


if __name__ == "__main__":
    main()
