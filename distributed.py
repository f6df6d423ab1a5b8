"""Processes and devices: one process or a torchrun group (DDP, FSDP2), and the collectives the loop needs.

Plain `python` runs on one device; under torchrun each process joins the group. Everything here is a no-op for a
single process, so the loop reads the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model import VLM
from model_setup import MODULE_PREFIXES, module_of, trainable_parameters, transformer_blocks


@dataclass
class Runtime:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(device: str | None = None) -> Runtime:
    """Plain `python` runs on one device; under torchrun each process joins the group (NCCL on GPU, gloo on CPU)."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():  # e.g. --nproc_per_node 2 on a machine with one GPU
            raise SystemExit(f"process {local_rank} of {world_size} on this machine has no GPU of its own: "
                             f"{torch.cuda.device_count()} CUDA device(s) visible. Start one process per GPU "
                             f"(NPROC / --nproc_per_node) or pass --device cpu")
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device(device or "cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if rank != 0:  # one voice: the libraries' loading reports and progress bars on rank 0 only
        import datasets
        import transformers

        for library in (transformers, datasets):
            library.logging.set_verbosity_error()
            library.logging.disable_progress_bar()
    return Runtime(rank, local_rank, world_size, target)


class ReachEveryTrainable:
    """Every rank must produce a gradient for every trainable parameter at every step, or the gradient all-reduce
    (reduce-scatter under FSDP) waits forever; a batch without images never reaches the projector or a trainable
    tower. For such a batch (the loop sets `text_only`), a hook runs them on one blank image just before the LLM,
    adding the result to its input with weight zero: their gradients are zeros, every rank takes part in every
    collective, and the tower runs where a batch with images runs it, so FSDP's all-gathers keep the same order."""

    def __init__(self, model: VLM):
        self.model, self.text_only = model, False
        self.hook = model.language_model.base_model.register_forward_pre_hook(self.zero_weight_pass,
                                                                                with_kwargs=True)

    def zero_weight_pass(self, module, args, kwargs):
        if not (self.text_only and torch.is_grad_enabled()):
            return None
        embeds, size = kwargs["inputs_embeds"], self.model.config.input_size
        blank = torch.zeros(1, 3, size, size, device=embeds.device)
        kwargs["inputs_embeds"] = embeds + 0.0 * self.model.encode_images(blank).sum().to(embeds.dtype)
        return args, kwargs


def all_reduce_sum(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def from_main(value, runtime: Runtime):
    """Rank 0's value on every rank (a broadcast of any picklable object)."""
    if not runtime.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gathered(items: list, runtime: Runtime) -> list:
    """Every rank's list, joined in rank order, on every rank."""
    if not runtime.distributed:
        return items
    everyone = [None] * runtime.world_size
    dist.all_gather_object(everyone, items)
    return [item for part in everyone for item in part]


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def shard_model(model: VLM) -> None:
    """FSDP2: each transformer block of a module that trains becomes its own shard unit, the rest joins the root.
    Frozen towers stay whole inside the root, so a rank that skips them (a text-only batch) skips no collective."""
    from torch.distributed.fsdp import fully_shard

    for key in MODULE_PREFIXES:
        module = module_of(model, key)
        if any(p.requires_grad for p in module.parameters()):
            for block in transformer_blocks(model, module):
                fully_shard(block)
    fully_shard(model)


def full_tensors(model: VLM) -> dict[str, torch.Tensor]:
    """Every trainable tensor in full on every rank (a collective under FSDP: all ranks must call it)."""
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().contiguous()
            for n, p in trainable_parameters(model).items()}


def sharded(model: VLM) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
