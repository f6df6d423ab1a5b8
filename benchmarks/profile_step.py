"""Where an SFT step's time goes: phases (forward with the vision tower, backward, optimizer) and the top operators,
for our model and for the Llava baseline of train_throughput.py, on the same batch.

    python benchmarks/profile_step.py --preset small                  # CPU
    python benchmarks/profile_step.py --preset real --device cuda --dtype bf16 --batch_size 8

Uses torch.profiler over --steps steps after one warm-up step; the vision tower is frozen (the SFT recipe).
"""

import argparse
import os
import tempfile


def our_model(args, tokenizer):
    from model import vlm_from_preset

    model = vlm_from_preset(args.preset, tokenizer)
    model.vision_model.requires_grad_(False)
    return model


def batch_for(tokenizer, data: str, args, num_image_tokens: int):
    from data import ConversationDataset, collate
    from processor import VLMProcessor
    from model import preset_image_processor, preset_configs

    vision, _ = preset_configs(args.preset, vocab_size=len(tokenizer))
    processor = VLMProcessor(tokenizer, preset_image_processor(vision), num_image_tokens=num_image_tokens,
                             max_length=4096)
    dataset = ConversationDataset([os.path.join(data, "sft.json")], processor, os.path.join(data, "images"))
    return collate([dataset[i] for i in range(args.batch_size)], tokenizer.pad_token_id)


def profile(name: str, model, batch: dict, args) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    model.to(args.device).train()
    batch = {k: v.to(args.device) for k, v in batch.items() if v is not None}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device_type = args.device.split(":")[0]

    def step():
        with record_function("phase: forward"), torch.autocast(device_type, dtype=dtype,
                                                                enabled=dtype != torch.float32):
            loss = model(**batch).loss
        with record_function("phase: backward"):
            loss.backward()
        with record_function("phase: optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device_type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    tokens = int(batch["attention_mask"].sum())
    print(f"\n=== {name}: batch {args.batch_size}, {batch['input_ids'].shape[1]} positions per row, "
          f"{tokens} non-pad tokens")
    for event in events:
        if event.key.startswith("phase: "):
            total = event.device_time_total if device_type == "cuda" else event.cpu_time_total
            print(f"{event.key:<20} {total / 1000 / args.steps:9.1f} ms per step")
    print(events.table(sort_by=sort, row_limit=args.top))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "real"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from benchmarks.train_throughput import llava_baseline, make_data

    with tempfile.TemporaryDirectory() as workdir:
        data = make_data(workdir, args.batch_size)
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(data, "tokenizer"))
        torch.manual_seed(0)
        ours = our_model(args, tokenizer)
        ours_batch = batch_for(tokenizer, data, args, ours.config.num_image_tokens)
        llava = llava_baseline(args.preset, tokenizer, train_vision=False)
        grid = llava.config.vision_config.image_size // llava.config.vision_config.patch_size
        llava_batch = batch_for(tokenizer, data, args, grid * grid)
    profile("ours", ours, ours_batch, args)
    del ours
    profile("Llava plain loop", llava, llava_batch, args)


if __name__ == "__main__":
    main()
