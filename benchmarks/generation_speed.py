"""Generation speed of a VLM: time to first token and decode tokens/s, batch 1 and batched, per KV-cache kind.

    python benchmarks/generation_speed.py --preset small                      # CPU, random weights
    python benchmarks/generation_speed.py --preset real --device cuda --dtype bf16 --modes dynamic static compiled
    python benchmarks/generation_speed.py --model_path checkpoints/tiny/sft  # a trained checkpoint

Requests go through `VLM.batch_chat` as the demo's do (image preprocessing, chat template, left padding, generate).
- time to first token: the whole request with max_new_tokens=1 (preprocess, vision tower, prefill, one token);
- decode tokens/s per sequence: (N - 1) / (t(N) - t(1)) with exactly N new tokens forced, i.e. the per-token cost
  once the prompt is in the cache; the batched row also gives the aggregate (x batch size).
Modes: `dynamic` (transformers' default growing DynamicCache), `static` (a preallocated StaticCache), `compiled`
(StaticCache + torch.compile of the decoding forward, which transformers does itself on GPUs; forced here on CPU).
Each figure is the median of --repeats runs after one warm-up run.
"""

import argparse
import json
import os
import statistics
import tempfile
import time


def build_model(args, workdir: str):
    import torch

    from model import VLM, vlm_from_preset

    if args.model_path:
        model = VLM.from_pretrained(args.model_path)
    else:
        from transformers import AutoTokenizer

        if args.preset == "real":
            from real_size_step import qwen_tokenizer_folder

            tokenizer_path = qwen_tokenizer_folder(workdir)
        else:
            from scripts import make_shapes

            tokenizer_path = make_shapes.write_tokenizer(workdir, 1024)
        torch.manual_seed(0)
        model = vlm_from_preset(args.preset, AutoTokenizer.from_pretrained(tokenizer_path))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    return model.to(device=args.device, dtype=dtype).eval()


def mode_kwargs(mode: str) -> dict:
    from transformers import CompileConfig

    if mode == "dynamic":
        return {}
    if mode == "static":
        return {"cache_implementation": "static", "disable_compile": True}
    compile_config = CompileConfig(dynamic=False, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return {"cache_implementation": "static", "compile_config": compile_config}


def timed(fn, repeats: int) -> float:
    import torch

    fn()  # warm-up: allocations, compilation
    seconds = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def measure(model, image, batch_size: int, new_tokens: int, mode: str, repeats: int) -> dict:
    images, questions = [image] * batch_size, ["Describe the image in detail."] * batch_size
    kwargs = mode_kwargs(mode)

    def request(tokens: int):
        # eos_token_id=None + min_new_tokens: exactly `tokens` new tokens, whatever random weights predict.
        return lambda: model.batch_chat(images, questions, max_new_tokens=tokens, min_new_tokens=tokens,
                                        eos_token_id=None, **kwargs)

    first = timed(request(1), repeats)
    whole = timed(request(new_tokens), repeats)
    per_sequence = (new_tokens - 1) / max(whole - first, 1e-9)
    return {"mode": mode, "batch_size": batch_size, "ttft_ms": 1000 * first,
            "decode_tok_s_per_seq": per_sequence, "decode_tok_s_total": per_sequence * batch_size}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "real"])
    parser.add_argument("--model_path", default=None, help="a trained VLM folder instead of a random preset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new_tokens", type=int, default=64, help="N: tokens generated per sequence")
    parser.add_argument("--modes", nargs="+", default=["dynamic", "static"], choices=["dynamic", "static", "compiled"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from PIL import Image

    with tempfile.TemporaryDirectory() as workdir:
        model = build_model(args, workdir)
    size = model.image_processor.size["height"]
    image = Image.new("RGB", (size, size), (200, 120, 40))
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} threads")
    print(f"generation, {args.model_path or 'preset ' + args.preset}, {args.dtype} on {args.device} ({where}); "
          f"{model.config.num_image_tokens} image tokens, {args.new_tokens} new tokens, median of {args.repeats}")
    print("| mode | batch | time to first token ms | decode tok/s per sequence | decode tok/s total |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for mode in args.modes:
        for batch_size in args.batch_sizes:
            row = measure(model, image, batch_size, args.new_tokens, mode, args.repeats)
            rows.append(row)
            print(f"| {mode} | {batch_size} | {row['ttft_ms']:.0f} | {row['decode_tok_s_per_seq']:.0f} | "
                  f"{row['decode_tok_s_total']:.0f} |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
