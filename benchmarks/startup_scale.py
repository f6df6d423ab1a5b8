"""Start-up at LLaVA-CC3M-Pretrain-595K scale: seconds from launch to the first optimizer step and peak memory per
rank, under `torchrun --nproc_per_node 2` on this machine, for a fresh run and for a --resume, at 1K and 595K records.

The dataset is CC3M-shaped (one image and a short caption per record, LLaVA JSON) with small images: 1,000 distinct
32x32 files that the records share, so the start-up scan still checks one file path per record. The model is a tiny
VLM saved to a folder, so that what is timed is the data path, not a model load. The launcher's own flags are used
(--skip_bad_samples included). Each run gets a fresh datasets cache, so the JSON -> Arrow conversion is counted; the
resume reuses it, as a real resume does.

    python benchmarks/startup_scale.py [--records 1000 595000] [--workers 1]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_dataset(folder: str, count: int) -> str:
    from PIL import Image

    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    for i in range(1000):
        Image.new("RGB", (32, 32), (i % 251, 80, 160)).save(os.path.join(folder, "images", f"{i:06d}.jpg"))
    records = [{"id": f"GCC_train_{i:09d}", "image": f"{i % 1000:06d}.jpg",
                "conversations": [{"from": "human", "value": "Give a brief description of the image.\n<image>"},
                                  {"from": "gpt", "value": f"a photo of item number {i} on a wooden table"}]}
               for i in range(count)]
    path = os.path.join(folder, "chat.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def save_tiny_model(folder: str) -> None:
    from processor import make_tokenizer
    from model import vlm_from_preset

    texts = ["Give a brief description of the image.", "a photo of item number 12 on a wooden table"] * 50
    vlm_from_preset("tiny", make_tokenizer(texts, vocab_size=300)).save_pretrained(folder)


def descendants(pid: int) -> list[int]:
    """Every process below pid (the torchrun ranks), from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, frontier = [], [pid]
    while frontier:
        found += children.get(frontier[0], [])
        frontier = frontier[1:] + children.get(frontier[0], [])
    return found


def peak_rss_gib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def logged_steps(log: str) -> list[int]:
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def launch(command: list[str], env: dict, log: str, stop_after: int, timeout: float = 1800) -> dict:
    """Run the launcher until it has logged `stop_after` new steps, then stop it: the seconds to its first new
    step and each rank's peak RSS up to then."""
    before = len(logged_steps(log))
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    peaks, first = {}, None
    while time.perf_counter() - started < timeout:
        if first is None:  # peak memory up to the first step
            for pid in descendants(process.pid):
                rss = peak_rss_gib(pid)
                try:
                    is_rank = "train.py" in open(f"/proc/{pid}/cmdline").read()
                except OSError:
                    continue
                if rss is not None and is_rank:
                    peaks[pid] = max(peaks.get(pid, 0.0), rss)
        new = len(logged_steps(log)) - before
        if new >= 1 and first is None:
            first = time.perf_counter() - started
        if new >= stop_after:
            break
        if process.poll() is not None:
            raise SystemExit(f"the run ended early:\n{process.stderr.read()[-3000:]}")
        time.sleep(0.05)
    else:
        raise SystemExit(f"fewer than {stop_after} steps within {timeout} s")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    ranks = sorted(peaks.values(), reverse=True)[:2]
    return {"seconds_to_step": round(first, 1), "peak_rss_gib_per_rank": [round(r, 2) for r in ranks]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[1000, 595_000])
    parser.add_argument("--workers", type=int, default=1, help="--num_workers per rank (2 cores here)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        model = os.path.join(workdir, "model")
        save_tiny_model(model)
        for count in args.records:
            folder = os.path.join(workdir, f"cc3m_{count}")
            data = write_dataset(folder, count)
            out = os.path.join(folder, "run")
            env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": os.path.join(folder, "hf_cache")}
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       os.path.join(ROOT, "pretrain_train.py"), "--model_path", model, "--data_path", data,
                       "--image_dir", os.path.join(folder, "images"), "--output_dir", out, "--max_steps", "1000",
                       "--batch_size", "8", "--num_workers", str(args.workers), "--save_steps", "2",
                       "--logging_steps", "1", "--dtype", "fp32", "--device", "cpu", "--skip_bad_samples"]
            log = os.path.join(out, "log.jsonl")
            fresh = launch(command, env, log, stop_after=3)  # past step 2, whose checkpoint the resume reads
            resumed = launch(command + ["--resume"], env, log, stop_after=1)
            row = {"records": count, "fresh": fresh, "resume": resumed}
            results.append(row)
            print(json.dumps(row), flush=True)
    print("| records | fresh: s to step 1 | fresh: peak RSS/rank GiB | resume: s to next step | "
          "resume: peak RSS/rank GiB |")
    print("| --- | --- | --- | --- | --- |")
    for row in results:
        print(f"| {row['records']:,} | {row['fresh']['seconds_to_step']} | "
              f"{' / '.join(map(str, row['fresh']['peak_rss_gib_per_rank']))} | "
              f"{row['resume']['seconds_to_step']} | "
              f"{' / '.join(map(str, row['resume']['peak_rss_gib_per_rank']))} |")


if __name__ == "__main__":
    main()
