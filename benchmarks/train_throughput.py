"""SFT training throughput: Mary-MLLM's loop against a plain loop over transformers' LlavaForConditionalGeneration
with the same SigLIP-style and Qwen2-style backbone sizes, on the same generated conversations.

    python benchmarks/train_throughput.py --preset small --steps 12 --batch_size 8

Each side runs in its own process (so peak memory is its own); the table gives samples/s, supervised tokens/s, step
time and peak resident memory, averaged over the steps after --warmup. Ours runs through sft_train.py itself (its
dataloader included); the baseline is the loop a user would write around Llava (full-vocabulary logits at every
position, no 2x downsample of the patch grid, the model's mean loss), fed pre-encoded batches.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def make_data(workdir: str, samples: int) -> str:
    import make_shapes

    make_shapes.write_split("sft", workdir, samples, seed=0, image_size=64)
    make_shapes.write_tokenizer(workdir, 1024)
    return workdir


def run_ours(args, data: str) -> dict:
    import sft_train

    out = os.path.join(data, "ours")
    sft_train.main(["--preset", args.preset, "--tokenizer", os.path.join(data, "tokenizer"), "--data_path",
                    os.path.join(data, "sft.json"), "--image_dir", os.path.join(data, "images"), "--output_dir", out,
                    "--max_steps", str(args.steps), "--batch_size", str(args.batch_size), "--num_workers", "1",
                    "--logging_steps", "1", "--save_steps", "0", "--dtype", args.dtype, "--device", args.device,
                    "--train_vision", "--max_length", "1024"] + (["--packing"] if args.packing else []))
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f][args.warmup:]
    seconds = [args.batch_size / r["samples_per_s"] for r in records]
    return {"step_s": sum(seconds) / len(seconds),
            "supervised_tokens": sum(r["supervised_tokens"] for r in records) / len(records)}


def run_llava(args, data: str) -> dict:
    import torch
    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    from data import ConversationDataset, VLMProcessor, collate
    from model import preset_configs, preset_image_processor

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(data, "tokenizer"))
    vision, text = preset_configs(args.preset, vocab_size=len(tokenizer))
    grid = vision.image_size // vision.patch_size
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         image_token_index=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                         image_seq_length=grid * grid, vision_feature_select_strategy="full",
                         vision_feature_layer=-1, projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(args.device).train()
    processor = VLMProcessor(tokenizer, preset_image_processor(vision), num_image_tokens=grid * grid,
                             max_length=2048)
    dataset = ConversationDataset([os.path.join(data, "sft.json")], processor, os.path.join(data, "images"))
    batches = [collate([dataset[(s * args.batch_size + i) % len(dataset)] for i in range(args.batch_size)],
                       tokenizer.pad_token_id) for s in range(args.steps)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    seconds, supervised = [], []
    for step, batch in enumerate(batches):
        started = time.perf_counter()
        batch = {k: v.to(args.device) for k, v in batch.items() if v is not None}
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= args.warmup:
            seconds.append(time.perf_counter() - started)
            supervised.append(int((batch["labels"][:, 1:] != -100).sum()))
    return {"step_s": sum(seconds) / len(seconds), "supervised_tokens": sum(supervised) / len(supervised)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "real"])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the averages")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--samples", type=int, default=256, help="generated conversations")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--packing", action="store_true", help="our side packs each batch into shared rows")
    parser.add_argument("--engine", choices=["ours", "llava"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.engine:  # one side, in its own process
        result = (run_ours if args.engine == "ours" else run_llava)(args, args.data)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print("RESULT " + json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as workdir:
        data = make_data(workdir, args.samples)
        rows = {}
        for engine in ("ours", "llava"):
            command = [sys.executable, __file__, "--engine", engine, "--data", data] + [
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("engine", "data", "packing")]
            command += ["--packing"] if args.packing else []
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rows[engine] = json.loads(output.strip().splitlines()[-1].removeprefix("RESULT "))
    print(f"\nSFT, preset {args.preset}, batch {args.batch_size}{', ours packed' if args.packing else ''}, "
          f"{args.dtype} on {args.device} "
          f"({os.cpu_count()} CPU cores); averages over steps {args.warmup + 1}-{args.steps}")
    print("| engine | samples/s | supervised tokens/s | step s | peak RSS GiB |")
    print("| --- | --- | --- | --- | --- |")
    for engine, row in rows.items():
        print(f"| {engine} | {args.batch_size / row['step_s']:.1f} | {row['supervised_tokens'] / row['step_s']:.0f} | "
              f"{row['step_s']:.3f} | {row['peak_rss_gib']:.2f} |")
    rate = {engine: row["supervised_tokens"] / row["step_s"] for engine, row in rows.items()}
    print(f"ours / baseline, supervised tokens/s: {rate['ours'] / rate['llava']:.2f}x")


if __name__ == "__main__":
    main()
