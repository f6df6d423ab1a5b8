"""Training throughput: Mary-MLLM's stages against what a user would otherwise run, in one run on one machine.

    python benchmarks/train_throughput.py --preset small                 # CPU: ~10 minutes
    python benchmarks/train_throughput.py --preset real --device cuda --dtype bf16 --batch_size 8 --steps 20

Rows, each in its own process (so peak memory is its own), on the same generated data and backbone sizes:
- SFT, ours: sft_train.py itself (dataloader included), the recipe's trainable set (projector + LLM; --train_vision
  adds the tower on both sides); as it is, with --group_by_length (batches of similar length), and with that and
  --compile (compilation falls in the --warmup steps, which the averages leave out);
- SFT, baseline: a plain loop over transformers' LlavaForConditionalGeneration with the same SigLIP-style and
  Qwen2-style configs and the same trainable set (logits at every position, no 2x downsample of the patch grid, the
  model's mean loss), fed pre-encoded batches;
- SFT, TRL: the same Llava model trained by TRL's SFTTrainer (`pip install trl`; the row is left out without it), its
  collator rendering each batch outside the timed step, replies supervised alone and activation checkpointing off
  (TRL's default is on; ours is off), so that it does the same work as the plain loop through TRL's trainer;
- stage 1, ours, online: pretrain_train.py (projector only) encoding every image with the frozen tower each step;
- stage 1, ours, cached: the same with --cache_vision_features (the one-off encoding pass is not in the step time).
Columns: samples/s, supervised tokens/s, step time and peak memory averaged over the steps after --warmup, and on a
GPU the model FLOPs utilisation: useful FLOPs only (vision forward, x3 when the tower trains; 6 x LLM parameters per
non-pad token when the LLM trains, 4 x when only the projector below it does; the LM head on supervised positions)
over the GPU's dense peak (--peak_tflops, else looked up from the device name). Attention's quadratic term is left
out, so MFU is a slight underestimate at long sequences.
"""

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


# Dense bf16 peak TFLOP/s by device-name fragment (no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0, "A10G": 125.0,
               "3090": 71.0}
ROWS = {"sft-ours": "SFT, ours", "sft-grouped": "SFT, ours, --group_by_length",
        "sft-compiled": "SFT, ours, --group_by_length --compile", "sft-llava": "SFT, Llava plain loop",
        "sft-trl": "SFT, Llava + TRL SFTTrainer",
        "pretrain-online": "stage 1, online encoding", "pretrain-cached": "stage 1, cached features"}


def make_data(workdir: str, samples: int) -> str:
    from scripts import make_shapes

    make_shapes.write_split("sft", workdir, samples, seed=0, image_size=64)
    make_shapes.write_split("pretrain", workdir, samples, seed=0, image_size=64)
    make_shapes.write_tokenizer(workdir, 1024)
    return workdir


def step_records(out: str, warmup: int) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f][warmup:]


def run_ours(args, data: str, row: str) -> dict:
    import pretrain_train
    import sft_train

    stage, variant = row.split("-")
    out = os.path.join(data, row)
    argv = ["--preset", args.preset, "--tokenizer", os.path.join(data, "tokenizer"), "--data_path",
            os.path.join(data, f"{stage}.json"), "--image_dir", os.path.join(data, "images"), "--output_dir", out,
            "--max_steps", str(args.steps), "--batch_size", str(args.batch_size), "--num_workers", "1",
            "--logging_steps", "1", "--save_steps", "0", "--dtype", args.dtype, "--device", args.device,
            "--max_length", "1024"]
    if stage == "sft":
        argv += (["--train_vision"] if args.train_vision else []) + (["--packing"] if args.packing else [])
        argv += ["--group_by_length"] if variant in ("grouped", "compiled") else []
        argv += ["--compile"] if variant == "compiled" else []
        sft_train.main(argv)
    else:
        pretrain_train.main(argv + (["--cache_vision_features", os.path.join(out, "cache")]
                                    if variant == "cached" else []))
    records = step_records(out, args.warmup)
    return {"steps": [{"seconds": args.batch_size / r["samples_per_s"], "supervised": r["supervised_tokens"],
                       "tokens": r["tokens_per_s"] * args.batch_size / r["samples_per_s"]} for r in records]}


def llava_baseline(preset: str, tokenizer, train_vision: bool):
    """transformers' Llava with our preset's SigLIP-style and Qwen2-style configs, every patch an image token."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from model import preset_configs
    from processor import IMAGE_TOKEN

    vision, text = preset_configs(preset, vocab_size=len(tokenizer))
    grid = vision.image_size // vision.patch_size
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=grid * grid, vision_feature_select_strategy="full",
                         vision_feature_layer=-1, projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.requires_grad_(train_vision)  # the recipe freezes it, as ours does
    return model


def run_llava(args, data: str, row: str) -> dict:
    import torch
    from transformers import AutoTokenizer

    from data import ConversationDataset, collate
    from processor import VLMProcessor
    from model import preset_image_processor

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(data, "tokenizer"))
    torch.manual_seed(0)
    model = llava_baseline(args.preset, tokenizer, args.train_vision).to(args.device).train()
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    processor = VLMProcessor(tokenizer, preset_image_processor(vision), num_image_tokens=grid * grid,
                             max_length=2048)
    dataset = ConversationDataset([os.path.join(data, "sft.json")], processor, os.path.join(data, "images"))
    batches = [collate([dataset[(s * args.batch_size + i) % len(dataset)] for i in range(args.batch_size)],
                       tokenizer.pad_token_id) for s in range(args.steps)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    steps = []
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
            steps.append({"seconds": time.perf_counter() - started, "tokens": int(batch["attention_mask"].sum()),
                          "supervised": int((batch["labels"][:, 1:] != -100).sum())})
    return {"steps": steps}


def llava_chat_template(system_prompt: str) -> str:
    """Our ChatML layout for a processor whose messages carry image parts; {% generation %} marks the replies so
    that TRL can supervise them alone, as ours does."""
    return (
        "{%- macro text(message) %}{%- if message.content is string %}{{- message.content }}{%- else %}"
        "{%- for part in message.content %}{{- '<|image_pad|>' if part.type == 'image' else part.text }}{%- endfor %}"
        "{%- endif %}{%- endmacro %}"
        "{{- '<|im_start|>system\\n' + " + json.dumps(system_prompt) + " + '<|im_end|>\\n' }}"
        "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
        "{%- if message.role == 'assistant' %}{% generation %}{{- text(message) + '<|im_end|>' }}{% endgeneration %}"
        "{{- '\\n' }}{%- else %}{{- text(message) + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def run_trl(args, data: str, row: str) -> dict:
    """The same Llava model trained by TRL's SFTTrainer the way its docs show for VLMs (its collator renders and
    processes each batch), with the replies supervised alone as ours are, and TRL's activation checkpointing off
    as ours is; the collation is outside the timed step, as for the plain loop."""
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoTokenizer, LlavaProcessor, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from model import preset_image_processor
    from processor import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(data, "tokenizer"))
    torch.manual_seed(0)
    model = llava_baseline(args.preset, tokenizer, args.train_vision)
    vision = model.config.vision_config
    processor = LlavaProcessor(image_processor=preset_image_processor(vision), tokenizer=tokenizer,
                               patch_size=vision.patch_size, vision_feature_select_strategy="full",
                               image_token=IMAGE_TOKEN, chat_template=llava_chat_template(DEFAULT_SYSTEM_PROMPT))
    with open(os.path.join(data, "sft.json")) as f:
        records = json.load(f)[:args.steps * args.batch_size]
    roles = {"human": "user", "gpt": "assistant"}
    dataset = Dataset.from_list([{
        "messages": [{"role": roles[t["from"]], "content": t["value"].replace("<image>", "").strip()}
                     for t in r["conversations"]],
        "images": [Image.open(os.path.join(data, "images", r["image"])).convert("RGB")]} for r in records])

    counts, steps = [], []

    def counting(collator):
        """TRL's collator, noting each batch's real and supervised tokens (batch i is step i: no workers)."""
        def collate(examples):
            batch = collator(examples)
            counts.append((int(batch["attention_mask"].sum()), int((batch["labels"][:, 1:] != -100).sum())))
            return batch
        return collate

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - self.started)

    config = SFTConfig(output_dir=os.path.join(data, row), max_steps=args.steps,
                       per_device_train_batch_size=args.batch_size, learning_rate=1e-4, lr_scheduler_type="constant",
                       assistant_only_loss=True, activation_checkpointing=False, max_length=None,
                       bf16=args.dtype == "bf16", use_cpu=args.device == "cpu", save_strategy="no", report_to=[],
                       logging_steps=args.steps, dataloader_num_workers=0, seed=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor,
                         callbacks=[StepTimer()])
    trainer.data_collator = counting(trainer.data_collator)
    trainer.train()
    return {"steps": [{"seconds": seconds, "tokens": tokens, "supervised": supervised}
                      for seconds, (tokens, supervised) in list(zip(steps, counts))[args.warmup:]]}


def parameter_counts(preset: str, vocab_size: int) -> dict:
    """Parameters per part, from a model built on the meta device (no memory, no time)."""
    import torch

    from model import VLM, VLMConfig, preset_configs

    vision, text = preset_configs(preset, vocab_size)
    with torch.device("meta"):
        model = VLM(VLMConfig(vision_config=vision, text_config=text))
    head = model.language_model.get_output_embeddings().weight.numel()
    embeddings = model.language_model.get_input_embeddings().weight.numel()
    llm = sum(p.numel() for p in model.language_model.parameters()) - embeddings
    llm -= 0 if text.tie_word_embeddings else head
    patches = (vision.image_size // vision.patch_size) ** 2
    return {"vision": sum(p.numel() for p in model.vision_model.parameters()), "llm_blocks": llm, "head": head,
            "patches": patches}


def useful_flops(counts: dict, row: str, step: dict, batch_size: int, train_vision: bool) -> float:
    """The FLOPs a step must do whatever the implementation (see the module docstring)."""
    online_vision = row != "pretrain-cached"
    vision_trains = train_vision and row.startswith("sft")
    flops = 2 * counts["vision"] * counts["patches"] * batch_size * (3 if vision_trains else 1) * online_vision
    llm_factor = 6 if row.startswith("sft") else 4  # stage 1: forward + the input-gradient pass, no weight grads
    flops += llm_factor * (counts["llm_blocks"] * step["tokens"] + counts["head"] * step["supervised"])
    return flops


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not args.device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def summarise(args, row: str, result: dict, counts: dict) -> dict:
    steps = result["steps"]
    seconds = sum(s["seconds"] for s in steps)
    summary = {"samples_s": args.batch_size * len(steps) / seconds,
               "supervised_tok_s": sum(s["supervised"] for s in steps) / seconds,
               "step_s": seconds / len(steps), "peak_gib": result["peak_gib"]}
    peak = peak_tflops(args)
    if peak:
        flops = sum(useful_flops(counts, row, s, args.batch_size, args.train_vision) for s in steps)
        summary["mfu"] = 100 * flops / seconds / (peak * 1e12)
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "real"])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the averages")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--samples", type=int, default=256, help="generated samples per split")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train_vision", action="store_true", help="SFT trains the vision tower too (both sides)")
    parser.add_argument("--packing", action="store_true", help="our SFT packs each batch into shared rows")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense peak, for MFU")
    parser.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.row:  # one row, in its own process
        import torch

        runner = {"sft-llava": run_llava, "sft-trl": run_trl}.get(args.row, run_ours)
        result = runner(args, args.data, args.row)
        result["peak_gib"] = (torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda")
                              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        print("RESULT " + json.dumps(result))
        return
    if "sft-trl" in args.rows and importlib.util.find_spec("trl") is None:
        print("leaving out the TRL row: TRL is not installed (pip install trl)")
        args.rows.remove("sft-trl")
    with tempfile.TemporaryDirectory() as workdir:
        data = make_data(workdir, args.samples)
        from transformers import AutoTokenizer

        counts = parameter_counts(args.preset, len(AutoTokenizer.from_pretrained(os.path.join(data, "tokenizer"))))
        rows = {}
        for row in args.rows:
            command = [sys.executable, __file__, "--row", row, "--data", data] + [
                f"--{k}={v}" for k, v in vars(args).items()
                if k not in ("row", "data", "rows", "packing", "train_vision") and v is not None]
            command += [f"--{flag}" for flag in ("packing", "train_vision") if getattr(args, flag)]
            output = subprocess.run(command, capture_output=True, text=True)
            if output.returncode:
                raise SystemExit(f"row {row} failed:\n{output.stderr[-3000:]}")
            result = json.loads(output.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
            rows[row] = summarise(args, row, result, counts)
    import torch

    where = (torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} CPU cores")
    trained = "projector + LLM + vision" if args.train_vision else "projector + LLM"
    print(f"\npreset {args.preset}, batch {args.batch_size}, {args.dtype} on {args.device} ({where}); SFT trains "
          f"{trained}{', ours packed' if args.packing else ''}; stage 1 trains the projector; averages over steps "
          f"{args.warmup + 1}-{args.steps}")
    print("| row | samples/s | supervised tokens/s | step s | peak GiB | MFU % |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row, r in rows.items():
        mfu = f"{r['mfu']:.1f}" if "mfu" in r else "-"
        print(f"| {ROWS[row]} | {r['samples_s']:.3g} | {r['supervised_tok_s']:.3g} | {r['step_s']:.3f} | "
              f"{r['peak_gib']:.2f} | {mfu} |")
    if {"sft-ours", "sft-llava"} <= rows.keys():
        print(f"SFT, ours / baseline, supervised tokens/s: "
              f"{rows['sft-ours']['supervised_tok_s'] / rows['sft-llava']['supervised_tok_s']:.2f}x")
    if {"sft-ours", "sft-trl"} <= rows.keys():
        print(f"SFT, ours / TRL, supervised tokens/s: "
              f"{rows['sft-ours']['supervised_tok_s'] / rows['sft-trl']['supervised_tok_s']:.2f}x")
    if {"pretrain-online", "pretrain-cached"} <= rows.keys():
        print(f"stage 1, cached / online, samples/s: "
              f"{rows['pretrain-cached']['samples_s'] / rows['pretrain-online']['samples_s']:.2f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
