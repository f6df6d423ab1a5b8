"""The offline main job: shape scenes -> tiny VLM -> pretrain -> SFT -> DPO, evaluated after each stage.

Runs the project's own commands one after another, each printed before it runs, and times them:

    python scripts/make_shapes.py ...     the dataset (LLaVA JSON + images + a learnt tokenizer)
    python pretrain_train.py --preset tiny ...
    python eval_vlm.py ...                 what stage 1 alone answers
    python sft_train.py --model_path checkpoints/tiny/pretrain ...
    python eval_vlm.py ...                 what SFT adds
    python dpo_train.py --model_path checkpoints/tiny/sft ...
    python eval_vlm.py ...                 what DPO on hallucination pairs changes

Nothing here is pretrained, so the tiny preset trains the vision tower and the LLM from stage 1 on (the flags
--train_vision --train_llm); the real recipe freezes them. The table goes to stdout and to <output_dir>/results.json.
`bash scripts/quickstart.sh` installs what is missing first; this file assumes it is installed.
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


def last_json_line(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def stage_flags(args, stage: str) -> list[str]:
    steps, lr = getattr(args, f"{stage}_steps"), getattr(args, f"{stage}_lr")
    # Nothing is pretrained, so stages 1-2 train every module; DPO keeps its default (vision frozen).
    modules = [] if stage == "dpo" else ["--train_vision", "--train_llm", "--train_projector"]
    return ["--data_path", os.path.join(args.data_dir, f"{stage}.json"),
            "--image_dir", os.path.join(args.data_dir, "images"),
            "--output_dir", os.path.join(args.output_dir, stage), *modules,
            "--max_steps", str(steps), "--batch_size", str(args.batch_size), "--lr", str(lr),
            "--warmup_steps", str(args.warmup_steps), "--weight_decay", "0.0", "--max_length", "256",
            "--dtype", "fp32", "--device", "cpu", "--num_workers", str(args.num_workers), "--seed", str(args.seed),
            "--save_steps", str(max(steps, 1)), "--save_total_limit", "1",
            "--logging_steps", str(max(1, steps // 20))]


def evaluate(args, stage: str, seconds: dict) -> dict:
    output = run(["eval_vlm.py", "--model_path", os.path.join(args.output_dir, stage),
                  "--data_path", os.path.join(args.data_dir, "eval.jsonl"),
                  "--image_dir", os.path.join(args.data_dir, "images"),
                  "--output", os.path.join(args.output_dir, stage, "predictions.jsonl"),
                  "--batch_size", "128", "--device", "cpu"], seconds, f"eval_{stage}")
    return last_json_line(output)


def summarise(metrics: dict) -> dict:
    row = {"exact_match": metrics["exact_match"]}
    row.update({f"em_{kind}": values["exact_match"] for kind, values in metrics["per_type"].items()})
    if "pope" in metrics:
        row.update({"pope_f1": metrics["pope"]["f1"], "yes_ratio": metrics["pope"]["yes_ratio"]})
    return row


def print_table(stages: dict, seconds: dict) -> None:
    columns = list(next(iter(stages.values())))
    print("\n" + " | ".join(["stage"] + columns))
    for stage, row in stages.items():
        print(" | ".join([stage] + [f"{row.get(c, float('nan')):.1f}" for c in columns]))
    print("seconds: " + ", ".join(f"{step} {value}" for step, value in seconds.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_dir", default="datasets/shapes", help="where the generated dataset goes")
    parser.add_argument("--output_dir", default="checkpoints/tiny", help="one folder per stage, results.json")
    parser.add_argument("--seed", type=int, default=0, help="data (seed, +1, +2 per split) and training seed")
    parser.add_argument("--num_samples", type=int, default=4000, help="images per training split")
    parser.add_argument("--num_eval", type=int, default=300, help="held-out images (five questions each)")
    parser.add_argument("--pretrain_steps", type=int, default=500, help="stage-1 optimizer steps")
    parser.add_argument("--sft_steps", type=int, default=700, help="stage-2 optimizer steps")
    parser.add_argument("--pretrain_lr", type=float, default=5e-4, help="stage-1 learning rate (all modules)")
    parser.add_argument("--sft_lr", type=float, default=5e-4, help="stage-2 learning rate (all modules)")
    parser.add_argument("--dpo_steps", type=int, default=150, help="stage-3 optimizer steps")
    parser.add_argument("--dpo_lr", type=float, default=2e-4, help="stage-3 learning rate (LLM + projector)")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    parser.add_argument("--num_dpo", type=int, default=1000, help="images of the preference split")
    parser.add_argument("--sft_yes_share", type=float, default=0.8,
                        help="share of yes answers among SFT existence questions: the yes-bias DPO has to undo")
    parser.add_argument("--batch_size", type=int, default=32, help="samples per step")
    parser.add_argument("--warmup_steps", type=int, default=50, help="linear warmup of each stage")
    parser.add_argument("--num_workers", type=int, default=1, help="dataloader workers")
    parser.add_argument("--install_seconds", type=float, default=None, help="reported by quickstart.sh")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    seconds = {} if args.install_seconds is None else {"install": args.install_seconds}
    started = time.perf_counter()
    run(["scripts/make_shapes.py", "--output_dir", args.data_dir, "--num_samples", str(args.num_samples),
         "--num_eval", str(args.num_eval), "--num_dpo", str(args.num_dpo), "--sft_yes_share",
         str(args.sft_yes_share), "--seed", str(args.seed)], seconds, "generate")
    tokenizer = os.path.join(args.data_dir, "tokenizer")
    run(["pretrain_train.py", "--preset", "tiny", "--tokenizer", tokenizer, *stage_flags(args, "pretrain")],
        seconds, "pretrain")
    stages = {"pretrain": summarise(evaluate(args, "pretrain", seconds))}
    run(["sft_train.py", "--model_path", os.path.join(args.output_dir, "pretrain"), *stage_flags(args, "sft")],
        seconds, "sft")
    stages["sft"] = summarise(evaluate(args, "sft", seconds))
    run(["dpo_train.py", "--model_path", os.path.join(args.output_dir, "sft"), "--beta", str(args.beta),
         "--precompute_ref", *stage_flags(args, "dpo")], seconds, "dpo")
    stages["dpo"] = summarise(evaluate(args, "dpo", seconds))
    seconds["total"] = round(time.perf_counter() - started + seconds.get("install", 0.0), 1)

    results = {"stages": stages, "seconds": seconds, "machine": f"{os.cpu_count()} CPU cores",
               "config": {k: v for k, v in vars(args).items() if k != "install_seconds"}}
    os.makedirs(os.path.join(ROOT, args.output_dir), exist_ok=True)
    with open(os.path.join(ROOT, args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_table(stages, seconds)
    print(f"results: {os.path.join(args.output_dir, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
