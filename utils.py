"""Shared entry points of the three stage scripts: their command-line flags and the hand-off to the stage runner.

The flags come in groups, and `settings.py` turns each group into one typed dataclass. The code itself is split by
concern: `data.py` (records, validation, collate), `training.py` (the loop and the stage runner) and the modules it
builds on (`model_setup.py`, `distributed.py`, `checkpoints.py`, `sampler.py`, `feature_cache.py`). This module
imports none of them until a stage runs, so `--help` works without loading torch or transformers.
"""

from __future__ import annotations

import argparse

# The real recipe's components: the stages build from these when no other is named.
DEFAULT_VISION_MODEL = "google/siglip-so400m-patch14-384"
DEFAULT_LLM = "Qwen/Qwen2.5-0.5B-Instruct"


def non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value}: give 0 or more")
    return number


def output_norm(value: str) -> str | float:
    """--projector_output_norm: none, embedding, or a positive number."""
    if value in ("none", "embedding"):
        return value
    try:
        norm = float(value)
    except ValueError:
        norm = 0.0
    if not 0 < norm < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r}: give none, embedding, or a positive number")
    return norm


def stage_parser(description: str, without: tuple[str, ...] = (), **defaults) -> argparse.ArgumentParser:
    """The flags every stage shares; a stage passes its own defaults (learning rate, what trains, ...) and the
    shared flags it cannot honour (`without`: left out of its --help and refused, their values fixed at the
    default)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    on_off = argparse.BooleanOptionalAction

    def optional(group, flag: str, **kwargs) -> None:
        if flag in without:
            parser.set_defaults(**{flag.lstrip("-"): kwargs.get("default")})
        else:
            group.add_argument(flag, **kwargs)

    model = parser.add_argument_group("model (give one of --model_path, --preset, or the two components)")
    model.add_argument("--model_path", default=None, help="a VLM checkpoint folder to start from")
    model.add_argument("--vision_model", default=DEFAULT_VISION_MODEL, help="vision tower: hub id or folder")
    model.add_argument("--llm_model", default=DEFAULT_LLM, help="causal LM and its tokenizer: hub id or folder")
    model.add_argument("--image_size", type=int, default=None,
                       help="with the two components: resize every image to this square for the vision tower "
                            "(fewer patches and image tokens); default: what its image processor does")
    model.add_argument("--max_tiles", type=int, default=None,
                       help="dynamic resolution: cut each image into up to this many tower-sized tiles (the grid "
                            "that fits its aspect ratio) plus a global view; default: the checkpoint's setting, "
                            "1 (one view per image) for a new model")
    model.add_argument("--vision_feature_layer", type=int, default=None,
                       help="new model: the tower layer whose patch features the projector reads (-1: the last "
                            "hidden state, -2: the layer before it, as LLaVA-1.5 does); default -1")
    model.add_argument("--projector_input_norm", default=None, choices=["none", "layernorm", "whiten"],
                       help="new model: what the projector does to the tower's features before its MLP, saved "
                            "with the model: whiten (the training features' mean removed and ZCA-whitened, fitted "
                            "once on the first 2,048 training images), layernorm (each token), or none (LLaVA-1.5's "
                            "MLP); default none")
    model.add_argument("--projector_output_norm", default=None, type=output_norm, metavar="{none,embedding,NORM}",
                       help="new model: every image token leaves the projector rescaled to this norm: embedding (the "
                            "LLM's mean input-embedding norm, measured when the model is built) or a number; saved "
                            "with the model; default none (the plain MLP)")
    model.add_argument("--preset", default=None, choices=["tiny", "small", "real"],
                       help="build a randomly initialised VLM of a named size instead of loading components")
    model.add_argument("--tokenizer", default=None,
                       help="tokenizer for --preset (hub id or folder); default: a BPE learnt from the training text")
    model.add_argument("--tokenizer_vocab_size", type=int, default=512, help="vocabulary of that learnt BPE")

    data = parser.add_argument_group("data")
    data.add_argument("--data_path", nargs="+", required=True,
                      help="LLaVA JSON/JSONL, parquet, folders of parquet files (a downloaded Hub dataset) or "
                           "save_to_disk folders; several are concatenated")
    data.add_argument("--image_dir", default=None, help="folder that the records' image paths are relative to")
    data.add_argument("--max_length", type=int, default=2048,
                      help="longest sample in tokens, image tokens included; longer ones are errors (never cut)")
    data.add_argument("--check_data", action="store_true",
                      help="validate every sample (images decoded, tokens counted), print a summary and exit")
    data.add_argument("--skip_bad_samples", action="store_true",
                      help="drop and count unusable samples instead of stopping at the first")
    data.add_argument("--num_workers", type=int, default=2, help="dataloader worker processes per rank")
    optional(data, "--packing", action="store_true", default=False,
             help="pack each batch's samples into rows of up to --max_length tokens (no padding between them, no "
                  "attention across them)")
    optional(data, "--prompt_format", default="chat", choices=["chat", "plain"],
             help="chat: the tokenizer's chat template with a system prompt; plain: LLaVA's stage-1 format, the "
                  "image tokens then the caption and the end token (no template, the question dropped). Saved with "
                  "the model, so evaluation and chat prompt it the same way")
    data.add_argument("--group_by_length", action="store_true",
                      help="batch samples of similar length together (less padding; order still shuffled per "
                           "epoch in groups of 64 batches)")
    optional(data, "--cache_vision_features", default=None, metavar="DIR",
             help="frozen tower only: encode every image once (fp16 on disk, memory-mapped) and train from the "
                  "cache in every epoch; reused while the tower and data are unchanged")

    run = parser.add_argument_group("run: its length and batch, what trains, where and in what precision")
    run.add_argument("--output_dir", required=True, help="checkpoints, log.jsonl and the final model go here")
    run.add_argument("--num_epochs", type=float, default=1.0, help="passes over the data (if --max_steps <= 0)")
    run.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides --num_epochs if > 0")
    run.add_argument("--batch_size", type=int, default=8, help="samples per device per micro-batch")
    run.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    run.add_argument("--train_vision", action=on_off, default=False, help="train the vision tower")
    run.add_argument("--train_projector", action=on_off, default=True,
                     help="train the projector (DPO: on unless --lora, whose reference is the model without its "
                          "adapters)")
    run.add_argument("--train_llm", action=on_off, default=True, help="train the language model")
    run.add_argument("--llm_frozen_layers", type=non_negative, default=0,
                     help="with --train_llm: keep the LLM's input embeddings (and an output head tied to them) "
                          "and its first N blocks frozen; their weight gradients and updates are skipped")
    run.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile each transformer block (the first steps are slower while it compiles)")
    run.add_argument("--fsdp", action="store_true",
                     help="under torchrun, shard parameters, gradients and optimizer state with FSDP2 instead of "
                          "replicating them with DDP (same results, less memory per GPU)")
    run.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="autocast dtype; auto: bf16 on GPUs that have it, else fp16 with loss scaling; on a CPU "
                          "bf16 where it measures clearly faster than fp32, else fp32 (the choice is printed)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (None: cuda if available)")
    run.add_argument("--seed", type=int, default=42, help="seeds initialisation and data order")

    optimizer = parser.add_argument_group("optimizer: AdamW, a learning rate per module, the schedule")
    optimizer.add_argument("--lr", type=float, default=2e-5, help="learning rate of every module without its own")
    optimizer.add_argument("--projector_lr", type=float, default=None, help="projector learning rate (default --lr)")
    optimizer.add_argument("--llm_lr", type=float, default=None, help="LLM learning rate (default --lr)")
    optimizer.add_argument("--vision_lr", type=float, default=None, help="vision tower learning rate (default --lr)")
    optimizer.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (matrices only)")
    optimizer.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    optimizer.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    optimizer.add_argument("--lr_scheduler_type", default="cosine",
                           choices=["cosine", "linear", "constant_with_warmup", "warmup_stable_decay"],
                           help="learning-rate schedule after the warmup (transformers' get_scheduler); "
                                "warmup_stable_decay holds the peak and decays over the last --decay_ratio of the "
                                "steps")
    optimizer.add_argument("--decay_ratio", type=float, default=0.2,
                           help="warmup_stable_decay: share of the steps spent decaying to zero (cosine)")
    optimizer.add_argument("--warmup_ratio", type=float, default=0.03, help="linear warmup, as a share of all steps")
    optimizer.add_argument("--warmup_steps", type=int, default=-1, help="linear warmup steps; overrides the ratio")
    optimizer.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (<= 0: off)")

    lora = parser.add_argument_group("LoRA and k-bit (QLoRA)")
    lora.add_argument("--lora", action="store_true",
                      help="train LoRA adapters instead of the weights of each trained tower (the projector and "
                           "anything without adapters still train fully)")
    lora.add_argument("--lora_r", type=int, default=16, help="adapter rank")
    lora.add_argument("--lora_alpha", type=int, default=32, help="adapter scale numerator (scale = alpha / r)")
    lora.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the adapter input")
    lora.add_argument("--lora_target", nargs="+", default=["llm"], choices=["llm", "vision"],
                      help="towers whose linear layers (attention and MLP projections, by module type) get adapters")
    lora.add_argument("--load_in_4bit", action="store_true",
                      help="QLoRA: the frozen LLM in 4-bit NF4 (bitsandbytes; with --lora; saved dequantized)")
    lora.add_argument("--load_in_8bit", action="store_true",
                      help="the frozen LLM in 8-bit (bitsandbytes; with --lora; saved dequantized)")

    evaluate = parser.add_argument_group("held-out evaluation during training (a learning curve)")
    evaluate.add_argument("--eval_data_path", default=None,
                          help="questions with answers, as eval_vlm.py reads them (JSONL, LLaVA JSON, parquet): "
                               "answered greedily every --eval_steps steps and at the end; exact match per question "
                               "type (object recall for captions) goes to log.jsonl, the progress bar and wandb, the "
                               "last answers to OUTPUT_DIR/predictions.jsonl and eval_results.json")
    evaluate.add_argument("--eval_image_dir", default=None, help="folder of its images (default: --image_dir)")
    evaluate.add_argument("--eval_steps", type=int, default=0,
                          help="evaluate every this many steps (<= 0: only after the last step)")
    evaluate.add_argument("--eval_batch_size", type=int, default=64, help="questions per generation batch")
    evaluate.add_argument("--eval_max_new_tokens", type=int, default=32, help="longest answer generated")

    ckpt = parser.add_argument_group("checkpoints and logging")
    ckpt.add_argument("--save_steps", type=int, default=500, help="write checkpoint-STEP/ every this many steps")
    ckpt.add_argument("--save_total_limit", type=int, default=2, help="checkpoints kept (oldest deleted first)")
    ckpt.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output_dir")
    ckpt.add_argument("--logging_steps", type=int, default=10, help="append to log.jsonl every this many steps")
    ckpt.add_argument("--wandb_project", default=None, help="log to this Weights & Biases project (off if unset)")
    ckpt.add_argument("--wandb_run_name", default=None, help="Weights & Biases run name")

    parser.set_defaults(**defaults)
    return parser


def run_stage_from_args(settings, **stage):
    """Run the stage (its settings.StageSettings) and return its trained model; a problem with the user's data ends
    in one line naming file, sample and problem, exit 1."""
    from processor import DataError
    from training import run_stage

    try:
        return run_stage(settings, **stage)
    except DataError as error:  # the start-up scan's report is several lines (every bad sample, then what to do)
        raise SystemExit(f"error: {str(error).strip()}") from None
