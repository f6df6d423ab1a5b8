"""Loading a trained model to use it: the precision a device runs it in, tiles, one loader for every user of a
checkpoint (evaluation, the demo, the lmms-eval adapter). Training builds on it; it imports nothing of training."""

from __future__ import annotations

import functools
import time

import torch

from model import VLM


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that have it, else fp16 (with loss scaling); on a CPU, bf16 where its matrix units make
    bf16 clearly faster than fp32 (AVX512-BF16, AMX), else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_bf16_speedup() >= 1.5 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster a bf16 matmul runs than an fp32 one on this CPU (measured once, ~0.1 s). CPUs without
    bf16 instructions emulate it, and there bf16 is slower."""
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return 0.0
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(512, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        a @ b  # warm-up: kernel selection
        started = time.perf_counter()
        for _ in range(5):
            a @ b
        seconds[dtype] = time.perf_counter() - started
    return seconds[torch.float32] / seconds[torch.bfloat16]


def describe_precision(name: str, device: torch.device, how: str = "autocast") -> str:
    """The precision --dtype NAME resolves to, and why; `how` is "autocast" in training, "weights" at inference."""
    dtype = resolve_dtype(name, device)
    label = {torch.float32: "fp32", torch.bfloat16: f"bf16 {how}", torch.float16: f"fp16 {how}"}[dtype]
    if name == "auto" and device.type == "cpu":
        speedup = cpu_bf16_speedup()
        if not speedup:
            return f"{label} (--dtype auto: this CPU has no bf16 instructions)"
        return f"{label} (--dtype auto: bf16 matmuls run {speedup:.1f}x fp32 on this CPU)"
    return f"{label} (--dtype {name})"


def with_max_tiles(model: VLM, max_tiles: int | None) -> VLM:
    """--max_tiles goes into the config (None keeps the model's), so the checkpoints a run saves tile as it trained;
    evaluation, the demo and the lmms-eval adapter set it the same way."""
    if max_tiles is not None:
        if max_tiles < 1:
            raise SystemExit(f"--max_tiles {max_tiles}: give 1 (one view per image) or more tiles")
        model.config.max_tiles = max_tiles
    return model


def load_for_inference(model_path: str, device: str | None = None, dtype: str = "auto",
                       max_tiles: int | None = None) -> VLM:
    """A checkpoint folder (or hub id) in eval mode on `device` (None: cuda if available), its weights in the
    precision `dtype` resolves to there, tiled as `max_tiles` says (None: as it was trained)."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = VLM.from_pretrained(model_path, dtype=resolve_dtype(dtype, target)).to(target).eval()
    return with_max_tiles(model, max_tiles)
