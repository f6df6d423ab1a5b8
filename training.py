"""The one training loop behind pretrain, SFT and DPO, with its distributed and checkpoint helpers.

A stage script supplies its defaults, a dataset builder and an objective (the loss of a batch); everything else lives
here once: device and DDP setup, which modules train, the optimizer with per-module learning rates, warmup + cosine,
autocast, gradient accumulation normalised over the whole optimizer step, clipping, logging, checkpoints and resume.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import re
import resource
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_scheduler

from data import (ConversationDataset, Positioned, ScanPlan, check_data, collate, collate_positioned, load_records,
                  parse_record)
from eval_vlm import HeldOutQuestions, compute_metrics, write_predictions
from inference import describe_precision, resolve_dtype, with_max_tiles
from model import VLM, vlm_from_components, vlm_from_preset, vlm_without_weights
from processor import IGNORE_INDEX, DataError, VLMProcessor, make_tokenizer

MODULE_PREFIXES = {"vision": "vision_model.", "projector": "projector.", "llm": "language_model."}
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


# ==================================================================== distributed
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


def autocast_for(args, runtime: Runtime) -> torch.autocast:
    amp_dtype = resolve_dtype(args.dtype, runtime.device)
    return torch.autocast(runtime.device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ==================================================================== model, trainable modules, optimizer
def build_model(args, tokenizer_texts=None, weights: bool = True) -> VLM:
    """From a VLM checkpoint (--model_path), a named preset (--preset), or two pretrained components; then LoRA
    adapters when asked for and not already there. Without weights (--check_data), a checkpoint or components give
    their configs and processors only, their parameters on the meta device."""
    settings = new_model_settings(args)
    if not weights and not args.preset:
        where = "--model_path" if args.model_path else "--vision_model / --llm_model"
        return with_run_settings(loaded(where, args.model_path or f"{args.vision_model}, {args.llm_model}",
                                        lambda: vlm_without_weights(args.model_path, args.vision_model,
                                                                    args.llm_model, args.image_size, **settings)),
                                 args)
    quantization = quantization_config(args)
    if args.model_path:
        model = loaded("--model_path", args.model_path, lambda: VLM.from_pretrained(args.model_path, **quantization))
    elif args.preset:
        if args.tokenizer:
            tokenizer = loaded("--tokenizer", args.tokenizer, lambda: AutoTokenizer.from_pretrained(args.tokenizer))
        else:  # nothing pretrained: a small BPE learnt from the training text itself
            tokenizer = make_tokenizer(tokenizer_texts(), vocab_size=args.tokenizer_vocab_size)
        model = vlm_from_preset(args.preset, tokenizer, **settings)
    else:
        model = loaded("--vision_model / --llm_model", f"{args.vision_model}, {args.llm_model}",
                       lambda: vlm_from_components(args.vision_model, args.llm_model, llm_kwargs=quantization,
                                                   image_size=args.image_size, **settings))
    if args.merge_loaded_adapters and model.config.lora:
        # DPO: the starting model is the reference, and a LoRA SFT checkpoint's adapters are part of it. Switching
        # them off would score the policy against the model before SFT; folded in, "adapters off" is the SFT model.
        if quantization:
            raise SystemExit(f"--model_path {args.model_path} carries LoRA adapters, which cannot be folded into "
                             f"k-bit weights: merge them first (scripts/merge_lora.py) and start from that folder")
        model.merge_lora()
    if quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    if args.lora and not model.config.lora:
        model.add_lora(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target)
    return with_run_settings(model, args)


def new_model_settings(args) -> dict:
    """The architecture flags a new model is built with. A checkpoint keeps the ones it was trained with: changing
    them would feed its trained projector inputs it never saw, so giving them with --model_path is an error."""
    settings = {"vision_feature_layer": args.vision_feature_layer,
                "projector_input_norm": args.projector_input_norm}
    settings = {key: value for key, value in settings.items() if value is not None}
    if args.model_path and settings:
        flags = ", ".join(f"--{key}" for key in settings)
        raise SystemExit(f"{flags}: set when a model is built (stage 1); {args.model_path} keeps what it was "
                         f"trained with (see its config.json)")
    if settings.get("projector_input_norm") == "none":
        settings["projector_input_norm"] = None
    return settings


def with_run_settings(model: VLM, args) -> VLM:
    """What this run changes in the model's config, and so in the checkpoints it saves: the tiles and the prompt
    format (stage 1 trains plain, later stages chat)."""
    model.config.prompt_format = args.prompt_format
    return with_max_tiles(model, args.max_tiles)


def loaded(flag: str, source: str, load):
    """load(), or one line naming the flag when its folder or Hub id cannot be loaded: transformers otherwise answers
    a mistyped local path with a traceback about Hub repository names."""
    try:
        return load()
    except OSError as error:  # transformers' "not found locally and not on the Hub (or the Hub unreachable)"
        reason = str(error).strip().splitlines()[0]
        raise SystemExit(f"{flag} {source}: not a model folder here, and not loadable from the Hugging Face Hub "
                         f"({reason})") from None
    except ValueError as error:  # huggingface_hub rejects a path that is not a valid repository name
        if type(error).__name__ != "HFValidationError":
            raise
        raise SystemExit(f"{flag} {source}: no such folder (and not a Hugging Face Hub model id)") from None


def quantization_config(args) -> dict:
    """k-bit loading of the frozen LLM (QLoRA), with bitsandbytes. What cannot work stops here, before any work."""
    if not (args.load_in_4bit or args.load_in_8bit):
        return {}
    if args.preset:
        raise SystemExit("--load_in_4bit / --load_in_8bit quantize a pretrained LLM as it loads; a --preset model "
                         "is built with random weights and would train unquantized: give --llm_model or --model_path")
    if not args.lora:
        raise SystemExit("k-bit weights cannot be trained directly: add --lora (QLoRA)")
    if args.fsdp:
        raise SystemExit("--fsdp does not shard k-bit weights here: use DDP (drop --fsdp) with QLoRA")
    try:
        import bitsandbytes  # noqa: F401  (0.48 and later run on the CPU too)
    except ImportError:
        raise SystemExit("--load_in_4bit / --load_in_8bit need bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit, bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=["vision_model", "projector", "lm_head"])}


def set_trainable(model: VLM, vision: bool, projector: bool, llm: bool) -> None:
    """Freeze or train each module. A module that carries LoRA adapters trains its adapters only."""
    adapters = {id(p) for p in model.adapter_parameters().values()}
    for key, flag in (("vision", vision), ("projector", projector), ("llm", llm)):
        params = list(module_of(model, key).parameters())
        own_adapters = [p for p in params if id(p) in adapters]
        for p in params:
            p.requires_grad_(flag and (not own_adapters or id(p) in adapters))


def module_of(model: VLM, key: str) -> torch.nn.Module:
    return getattr(model, MODULE_PREFIXES[key].rstrip("."))


def trainable_parameters(model: VLM) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def set_train_mode(model: VLM, gradient_checkpointing: bool = False) -> None:
    """Trainable modules in train mode; frozen ones in eval mode, computing what they compute at inference.

    A frozen LLM that gradients still pass through (stage 1: the projector trains beneath it) keeps the most
    activations of all, yet transformers recomputes a block only while the block is in training mode. With
    checkpointing on, its blocks alone are flagged as training, so they are recomputed in backward; everything
    inside them (attention, dropout) stays in eval mode."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.train()
    upstream_trains = False  # towers in data-flow order: vision -> projector -> LLM
    for key in MODULE_PREFIXES:
        module = module_of(model, key)
        trains = any(p.requires_grad for p in module.parameters())
        if not trains:
            module.eval()
            if gradient_checkpointing and upstream_trains:
                for block in module.modules():
                    if isinstance(block, GradientCheckpointingLayer):
                        block.training = True  # this module only, not its children: no dropout
        upstream_trains = upstream_trains or trains


def build_optimizer(model: VLM, args) -> torch.optim.Optimizer:
    """AdamW with one learning rate per module; no weight decay on biases and norms."""
    groups = []
    for key, prefix in MODULE_PREFIXES.items():
        lr = getattr(args, f"{key}_lr") or args.lr
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad]
        for suffix, decay in (("", True), ("_no_decay", False)):
            chosen = [p for _, p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": args.weight_decay if decay else 0.0,
                               "name": key + suffix})
    if not groups:
        raise ValueError("nothing to train: every module is frozen")
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), fused=fused)


def build_scheduler(optimizer, args, total_steps: int):
    """Linear warmup, then --lr_scheduler_type: cosine or linear to zero, constant, or warmup-stable-decay (the
    peak held until the last --decay_ratio of the steps, then a cosine to zero)."""
    warmup = args.warmup_steps if args.warmup_steps >= 0 else round(args.warmup_ratio * total_steps)
    specific = {}
    if args.lr_scheduler_type == "warmup_stable_decay":
        specific = {"num_decay_steps": round(args.decay_ratio * total_steps)}
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=specific)


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


def transformer_blocks(model: VLM, module: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder / encoder layers inside `module`, by the class names the towers declare as unsplittable."""
    block_types = set(model._no_split_modules or ())
    return [m for m in module.modules() if type(m).__name__ in block_types]


def compile_blocks(model: VLM) -> None:
    """--compile: every transformer block is compiled in place, so parameter names, checkpoints, DDP and FSDP see
    the same modules. The glue between blocks (image scatter, LM head on the supervised positions) changes shape
    with every batch and stays eager; the blocks are compiled for dynamic sequence lengths for the same reason."""
    for block in transformer_blocks(model, model):
        block.compile(dynamic=True)


def full_tensors(model: VLM) -> dict[str, torch.Tensor]:
    """Every trainable tensor in full on every rank (a collective under FSDP: all ranks must call it)."""
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().contiguous()
            for n, p in trainable_parameters(model).items()}


def sharded(model: VLM) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


# ==================================================================== objectives
class LanguageModelingObjective:
    """Next-token loss on the supervised tokens; the loop divides its sum by the step's global token count."""

    def count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return model(**batch).loss_sum, {}


# ==================================================================== data order that can resume mid-epoch
class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start an epoch part-way through, so a resumed run sees the same batches.

    With `lengths`, each rank's shuffled order is cut into groups of `group_size` samples and each group sorted by
    length: a batch then holds samples of similar length and pads little (LLaVA's and the HF Trainer's
    group-by-length). The batches of a group are then shuffled, so a run does not sweep from its longest samples to
    its shortest (a short run spans few groups). Which samples meet in a group still changes every epoch."""

    def __init__(self, dataset, runtime: Runtime, seed: int, lengths: list[int] | None = None, group_size: int = 0,
                 batch_size: int = 1):
        super().__init__(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True, seed=seed)
        self.start, self.lengths, self.group_size, self.batch_size = 0, lengths, group_size, batch_size

    def __iter__(self):
        order = list(super().__iter__())
        if self.lengths is not None:
            shuffler = random.Random(f"{self.seed}-{self.epoch}")
            grouped = []
            for i in range(0, len(order), self.group_size):
                group = sorted(order[i:i + self.group_size], key=lambda index: -self.lengths[index])
                batches = [group[j:j + self.batch_size] for j in range(0, len(group), self.batch_size)]
                shuffler.shuffle(batches)
                grouped += [index for batch in batches for index in batch]
            order = grouped
        return iter(order[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def build_loader(dataset, sampler: ResumableSampler, collate_fn, args, runtime: Runtime):
    # The loader's own generator: starting an iterator draws a worker seed, which would otherwise come from the
    # global RNG and shift every dropout mask after a resume (which starts one iterator more than the whole run).
    # Persistent workers: a worker forked anew at each epoch shares the whole trained process copy-on-write, so every
    # page the training step writes is copied while it lives (on CPU, twice the memory from epoch 2 on), and each
    # fork stalls the step that waits for it.
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=collate_fn,
                                       num_workers=args.num_workers, pin_memory=runtime.device.type == "cuda",
                                       persistent_workers=args.num_workers > 0,
                                       generator=torch.Generator().manual_seed(args.seed + runtime.rank))


class BatchStream:
    """Endless micro-batches across epochs; `epoch` and `batch_in_epoch` are the position a checkpoint stores."""

    def __init__(self, loader, sampler: ResumableSampler, batch_size: int, epoch: int = 0, batch_in_epoch: int = 0):
        self.loader, self.sampler, self.batch_size = loader, sampler, batch_size
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self._iterator = None

    def next(self) -> dict:
        skipped = 0  # batches in a row whose every sample was skipped as unusable (collate gave None)
        while True:
            if self._iterator is None:
                self.sampler.set_epoch(self.epoch)
                self.sampler.start = self.batch_in_epoch * self.batch_size
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
                self.batch_in_epoch += 1
                if batch is not None:
                    return batch
                skipped += 1
                if skipped > len(self.loader):
                    raise DataError("not one usable sample in a whole epoch: every sample failed when its batch "
                                    "encoded it (see the 'skipping a bad sample' lines); raise --max_length or fix "
                                    "the data")
            except StopIteration:
                self.epoch, self.batch_in_epoch, self._iterator = self.epoch + 1, 0, None


# ==================================================================== checkpoints
def save_checkpoint(output_dir: str, step: int, model: VLM, optimizer, scheduler, scaler, state: dict,
                    runtime: Runtime, keep: int) -> str:
    """Write checkpoint-STEP/ atomically: into a temporary folder, renamed into place once complete."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    temporary = final + ".tmp"
    if runtime.is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    barrier(runtime)
    # Each rank's own data position: one whose batch was all skipped samples is a batch ahead of the others.
    position = {"epoch": state["epoch"], "batch_in_epoch": state["batch_in_epoch"]}
    torch.save({**rng_state(), "position": position}, os.path.join(temporary, f"rng_state_{runtime.rank}.pt"))
    tensors, optimizer_state = full_tensors(model), optimizer_state_dict(model, optimizer)
    if runtime.is_main:
        save_file(tensors, os.path.join(temporary, "trainable.safetensors"))
        torch.save(optimizer_state, os.path.join(temporary, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(temporary, "scheduler.pt"))
        torch.save(scaler.state_dict(), os.path.join(temporary, "scaler.pt"))
        with open(os.path.join(temporary, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=2)
    barrier(runtime)
    if runtime.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(temporary, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    barrier(runtime)
    return final


def optimizer_state_dict(model: VLM, optimizer) -> dict:
    """The optimizer state, gathered in full when the model is sharded."""
    if not sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (a .tmp folder left by a crash is not one)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def load_checkpoint(path: str, model: VLM, optimizer, scheduler, scaler, runtime: Runtime) -> dict:
    """Restore everything save_checkpoint wrote; a mismatch in the trainable tensors is an error, never ignored."""
    tensors = load_file(os.path.join(path, "trainable.safetensors"))
    params = trainable_parameters(model)
    if set(tensors) != set(params):
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"{path} does not match the trainable parameters of this run: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}); resume with the "
                         f"same model and freeze flags")
    load = partial(torch.load, weights_only=True, map_location="cpu")
    if sharded(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        full = StateDictOptions(full_state_dict=True, strict=False)  # the key check above is the strict one
        set_model_state_dict(model, tensors, options=full)
        set_optimizer_state_dict(model, optimizer, load(os.path.join(path, "optimizer.pt")), options=full)
    else:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(tensors[name])
        optimizer.load_state_dict(load(os.path.join(path, "optimizer.pt")))
    scheduler.load_state_dict(load(os.path.join(path, "scheduler.pt")))
    scaler.load_state_dict(load(os.path.join(path, "scaler.pt")))
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    rng_file = os.path.join(path, f"rng_state_{runtime.rank}.pt")
    if os.path.exists(rng_file):
        saved = load(rng_file)
        set_rng_state(saved)
        state.update(saved.get("position", {}))
    return state


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_final_model(model: VLM, output_dir: str, runtime: Runtime) -> None:
    """A plain VLM.from_pretrained folder in output_dir, its files moved into place only once all are written.
    A sharded model is gathered first (every rank takes part); the main process writes."""
    state_dict = None
    if sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        for tied in model.all_tied_weights_keys:  # e.g. an LM head that shares the embedding: saved once
            state_dict.pop(tied, None)
    if not runtime.is_main:
        return
    temporary = os.path.join(output_dir, ".final.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, state_dict=state_dict)
    for name in os.listdir(temporary):
        os.replace(os.path.join(temporary, name), os.path.join(output_dir, name))
    os.rmdir(temporary)


# ==================================================================== held-out evaluation during training
class HeldOutEvaluation:
    """--eval_data_path: the model answers fixed held-out questions greedily every --eval_steps steps and after the
    last one, with eval_vlm.py's own answering and scoring, so the curve's figures are the ones eval_vlm.py gives for
    the saved checkpoint (in the same precision). The file and its images are read when the run starts: a problem
    stops it before step 1. The main process evaluates; the others wait."""

    def __init__(self, args, runtime: Runtime):
        self.every, self.output_dir, self.runtime = args.eval_steps, args.output_dir, runtime
        self.batch_size, self.max_new_tokens = args.eval_batch_size, args.eval_max_new_tokens
        self.questions = HeldOutQuestions(args.eval_data_path, args.eval_image_dir or args.image_dir)
        if args.fsdp and runtime.distributed:
            raise SystemExit("--eval_data_path with --fsdp: generation on one rank cannot run a sharded model; "
                             "evaluate the saved model with eval_vlm.py instead")

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.every > 0 and step % self.every == 0)

    def __call__(self, model: VLM, step: int, total_steps: int, autocast) -> dict | None:
        """Metrics as one flat record ("eval/exact_match", "eval/<type>", POPE, object recall); after the last step
        the answers go to predictions.jsonl and the metrics to eval_results.json."""
        record = None
        if self.runtime.is_main:
            started = time.perf_counter()
            model.eval()
            with torch.no_grad(), autocast:
                results = self.questions.answer(model, self.batch_size, self.max_new_tokens, progress=False)
            metrics = compute_metrics(results)
            record = flat_metrics(metrics)
            record["eval/seconds"] = time.perf_counter() - started
            if step == total_steps:
                write_predictions(results, os.path.join(self.output_dir, "predictions.jsonl"))
                with open(os.path.join(self.output_dir, "eval_results.json"), "w") as f:
                    json.dump({"step": step, **metrics}, f, indent=2, ensure_ascii=False)
        barrier(self.runtime)
        return record


def flat_metrics(metrics: dict) -> dict:
    """eval_vlm's metrics as one level of "eval/..." numbers, for log.jsonl and wandb."""
    record = {"eval/exact_match": metrics["exact_match"], "eval/questions": metrics["count"]}
    if len(metrics["per_type"]) > 1:
        record.update({f"eval/{kind}": values["exact_match"] for kind, values in metrics["per_type"].items()})
    if "object_recall" in metrics:
        record["eval/object_recall"] = metrics["object_recall"]
    if "pope" in metrics:
        record.update({"eval/pope_f1": metrics["pope"]["f1"], "eval/yes_ratio": metrics["pope"]["yes_ratio"]})
    return record


# ==================================================================== the loop
def peak_memory_gb(device: torch.device) -> float:
    """The most memory this process has held so far: the GPU's tensors on CUDA, the resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux counts it in KiB


class MetricLogger:
    """tqdm on the main process, one JSON line per logged step in output_dir/log.jsonl, wandb when asked. Every line
    carries its wall-clock `time` and the seconds since its process started (`run_seconds`), so that a learning
    curve can put the stages of a job, start-ups included, on one time axis (scripts/plot_curve.py)."""

    def __init__(self, args, runtime: Runtime, total_steps: int, start_step: int, process_started: float):
        self.enabled = runtime.is_main
        self.path = os.path.join(args.output_dir, "log.jsonl")
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not self.enabled, desc="train",
                        dynamic_ncols=True)
        self.wandb = None
        if self.enabled and args.wandb_project:
            import wandb

            self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_run_name, config=vars(args),
                                    resume="allow")
        self.process_started = process_started

    def _write(self, line: dict) -> None:
        now = time.time()
        with open(self.path, "a") as f:
            f.write(json.dumps({**line, "time": now, "run_seconds": now - self.process_started}) + "\n")

    def log(self, step: int, record: dict, write: bool) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}")
        if write:
            self._write({"step": step, **record})
            if self.wandb is not None:
                self.wandb.log(record, step=step)

    def log_eval(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        self._write({"step": step, **record})
        shown = ", ".join(f"{name.removeprefix('eval/')} {value:.1f}" for name, value in record.items()
                          if name not in ("eval/seconds", "eval/questions"))
        self.bar.write(f"step {step}: held-out {shown} ({record['eval/seconds']:.1f} s)")
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def close(self) -> None:
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def train(args, runtime: Runtime, model: VLM, dataset, objective, collate_fn,
          evaluation: HeldOutEvaluation | None = None, process_started: float | None = None) -> None:
    """Run the optimizer steps asked for, resuming from the newest checkpoint when --resume is given."""
    model.to(runtime.device)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    amp_dtype = resolve_dtype(args.dtype, runtime.device)
    autocast = autocast_for(args, runtime)
    grouping = {}
    if args.group_by_length:
        # 64 batches per group: batches of near-equal length, and a group still spans many kinds of sample.
        grouping = {"lengths": [dataset.length_estimate(i) for i in range(len(dataset))],
                    "group_size": 64 * args.batch_size, "batch_size": args.batch_size}
    sampler = ResumableSampler(dataset, runtime, args.seed, **grouping)
    loader = build_loader(dataset, sampler, collate_fn, args, runtime)
    batches_per_epoch = math.ceil(sampler.num_samples / args.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // args.grad_accum)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_epochs * steps_per_epoch)
    if hasattr(objective, "prepare"):  # before sharding and resuming: DPO's reference is the starting model
        objective.prepare(model, dataset, runtime, collate_fn, autocast)
    if args.fsdp and runtime.distributed:
        shard_model(model)
    if args.compile:
        compile_blocks(model)
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, total_steps)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=amp_dtype == torch.float16)
    # What fixes the data order and the schedule: a resume that changes any of these cannot continue the same run.
    run_shape = {"world_size": runtime.world_size, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                 "seed": args.seed, "group_by_length": args.group_by_length, "total_steps": total_steps,
                 "lr_scheduler_type": args.lr_scheduler_type}

    step, stream = 0, BatchStream(loader, sampler, args.batch_size)
    checkpoints = list_checkpoints(args.output_dir)
    if args.resume and checkpoints:
        state = load_checkpoint(checkpoints[-1], model, optimizer, scheduler, scaler, runtime)
        changed = {key: (value, run_shape.get(key)) for key, value in state["run_shape"].items()
                   if run_shape.get(key) != value}
        if changed:
            described = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
            raise ValueError(f"{checkpoints[-1]} was written with other settings ({described}; total_steps comes "
                             f"from --max_steps or --num_epochs): "
                             f"the data order or the schedule would differ, so it cannot resume exactly")
        step = state["step"]
        stream = BatchStream(loader, sampler, args.batch_size, state["epoch"], state["batch_in_epoch"])
        if runtime.is_main:
            print(f"resumed from {checkpoints[-1]} at step {step}")
    elif args.resume and runtime.is_main:
        print(f"--resume: no checkpoint in {args.output_dir}, starting from scratch")

    ddp_model, is_sharded, reach = model, sharded(model), None
    if runtime.distributed:
        if any(p.requires_grad for p in [*model.projector.parameters(), *model.vision_model.parameters()]):
            reach = ReachEveryTrainable(model)
        if not is_sharded:
            # A trainable tower may hold parameters our features never reach (CLIP's post_layernorm acts only on
            # its pooled output); DDP must then look for them each step instead of waiting for their gradients.
            ddp_model = DistributedDataParallel(
                model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None,
                find_unused_parameters=any(p.requires_grad for p in model.vision_model.parameters()))
    set_train_mode(model, args.gradient_checkpointing)
    logger = MetricLogger(args, runtime, total_steps, step, process_started or time.time())
    params = list(trainable_parameters(model).values())
    try:
        while step < total_steps:
            started = time.perf_counter()
            micro_batches = [stream.next() for _ in range(args.grad_accum)]
            # Every token of the optimizer step weighs the same, whichever micro-batch or rank it sits in: divide
            # each micro-batch's summed loss by the step's global count. (DDP averages gradients over ranks, hence
            # the factor world_size.)
            counts = torch.tensor([sum(objective.count(b) for b in micro_batches),
                                   sum(int(b["attention_mask"].sum()) for b in micro_batches)],
                                  dtype=torch.float64, device=runtime.device)
            num_items, num_tokens = all_reduce_sum(counts, runtime).tolist()
            step_loss = torch.zeros((), dtype=torch.float64, device=runtime.device)
            metric_sums: dict[str, torch.Tensor] = {}
            for i, batch in enumerate(micro_batches):
                batch = {k: (v.to(runtime.device, non_blocking=True) if torch.is_tensor(v) else v)
                         for k, v in batch.items()}
                sync = not runtime.distributed or i == len(micro_batches) - 1
                if is_sharded:  # FSDP2 reduce-scatters the gradients only after the last micro-batch
                    model.set_requires_gradient_sync(sync)
                    sync = True
                if reach is not None:
                    reach.text_only = batch["pixel_values"] is None and batch.get("vision_features") is None
                with (nullcontext() if sync else ddp_model.no_sync()), autocast:
                    loss_sum, metrics = objective(ddp_model, batch)
                    loss = loss_sum * runtime.world_size / max(num_items, 1)
                scaler.scale(loss).backward()
                step_loss += loss_sum.detach().double()
                for name, value in metrics.items():
                    metric_sums[name] = metric_sums.get(name, 0) + value.detach().double()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0
                                                       else float("inf"))
            reduced = all_reduce_sum(torch.stack([step_loss, *metric_sums.values()]), runtime) / max(num_items, 1)
            if not torch.isfinite(reduced[0]) or (amp_dtype != torch.float16 and not torch.isfinite(grad_norm)):
                raise FloatingPointError(
                    f"step {step + 1}: loss {reduced[0].item()} / grad norm {grad_norm.item()} is not finite; "
                    f"stopping without saving. The last good checkpoint stays in {args.output_dir}. Try "
                    f"--dtype bf16 (or fp32), a lower --lr, or check the data of this step")
            lr = scheduler.get_last_lr()[0]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            elapsed = time.perf_counter() - started
            record = {"loss": reduced[0].item(), "lr": lr, "grad_norm": grad_norm.item(),
                      "epoch": stream.epoch + stream.batch_in_epoch / batches_per_epoch,
                      "supervised_tokens": int(num_items), "tokens_per_s": num_tokens / elapsed,
                      "samples_per_s": args.batch_size * args.grad_accum * runtime.world_size / elapsed,
                      "peak_memory_gb": peak_memory_gb(runtime.device),
                      **{name: value.item() for name, value in zip(metric_sums, reduced[1:])}}
            logger.log(step, record, write=step % args.logging_steps == 0 or step == total_steps)
            if args.save_steps > 0 and (step % args.save_steps == 0 or step == total_steps):
                state = {"step": step, "epoch": stream.epoch, "batch_in_epoch": stream.batch_in_epoch,
                         "run_shape": run_shape}
                save_checkpoint(args.output_dir, step, model, optimizer, scheduler, scaler, state, runtime,
                                args.save_total_limit)
            if evaluation is not None and evaluation.due(step, total_steps):
                logger.log_eval(step, evaluation(model, step, total_steps, autocast))
                set_train_mode(model, args.gradient_checkpointing)
    finally:
        logger.close()
        if reach is not None:  # the trained model goes back as it came
            reach.hook.remove()


# ==================================================================== stage-1 cached vision features
class FeatureCache:
    """The frozen tower's downsampled features of every image, fp16 in one .npy file read through a memory map;
    rows offsets[i]:offsets[i + 1] belong to dataset position i. Workers open their own map."""

    def __init__(self, path: str, offsets: list[int]):
        self.path, self.offsets, self._array = path, offsets, None

    def __getstate__(self):
        return {**self.__dict__, "_array": None}

    def features(self, position: int) -> torch.Tensor:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        rows = self._array[self.offsets[position]:self.offsets[position + 1]]
        return torch.from_numpy(np.asarray(rows, dtype=np.float32))


def attach_feature_cache(model: VLM, dataset, cache_dir: str, runtime: Runtime, args, autocast) -> None:
    """Encode every image once with the frozen tower, each rank a contiguous share of the samples, unless a cache of
    the same tower and data is already there; then let the dataset serve features instead of decoding images.
    (Under torchrun the cache folder must be one filesystem for all ranks, like the checkpoints.)"""
    if any(p.requires_grad for p in model.vision_model.parameters()):
        raise ValueError("--cache_vision_features needs a frozen vision tower: its features must not change")
    offsets = [0, *itertools.accumulate(dataset.view_counts)]  # the start-up scan counted each sample's views
    path, meta_path = os.path.join(cache_dir, "features.npy"), os.path.join(cache_dir, "meta.json")
    decision = None
    if runtime.is_main:  # hashing the tower is not free: rank 0 decides and tells the others
        fingerprint = cache_fingerprint(model, dataset)
        reuse = os.path.exists(meta_path) and json.load(open(meta_path)).get("fingerprint") == fingerprint
        decision = fingerprint, reuse
    fingerprint, reuse = from_main(decision, runtime)
    if reuse:
        if runtime.is_main:
            print(f"using the cached vision features in {cache_dir}")
    else:
        shape = (offsets[-1], model.config.num_image_tokens, model.config.vision_config.hidden_size)
        temporary = path + ".tmp.npy"
        if runtime.is_main:
            os.makedirs(cache_dir, exist_ok=True)
            np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float16, shape=shape).flush()
        barrier(runtime)
        share = math.ceil(len(dataset) / runtime.world_size)
        first = min(len(dataset), runtime.rank * share)
        positions = range(first, min(len(dataset), first + share))
        unusable = gathered(write_feature_cache(model, dataset, temporary, positions, offsets, runtime, args,
                                                autocast), runtime)
        images_per_rank = gathered([offsets[positions.stop] - offsets[positions.start]], runtime)
        if runtime.is_main:
            os.replace(temporary, path)
            with open(meta_path + ".tmp", "w") as f:
                json.dump({"fingerprint": fingerprint, "images": offsets[-1], "images_per_rank": images_per_rank,
                           "unusable": sorted(unusable)}, f)
            os.replace(meta_path + ".tmp", meta_path)
    barrier(runtime)
    dataset.unusable = set(json.load(open(meta_path))["unusable"])
    dataset.feature_cache = FeatureCache(path, offsets)


def cache_fingerprint(model: VLM, dataset) -> str:
    """What the cached features depend on: the tower's weights, the geometry, the data files and which of their
    samples are kept, in order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.vision_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    digest.update(json.dumps([model.config.num_image_tokens, model.config.vision_feature_layer, dataset.fingerprint(),
                              dataset.index]).encode())
    return digest.hexdigest()


def write_feature_cache(model: VLM, dataset, path: str, positions: range, offsets: list[int], runtime: Runtime,
                        args, autocast) -> list[int]:
    """Encode the images of dataset[positions] into their rows of the (preallocated) cache file; returns the
    positions whose images could not be used (skipped samples: their rows stay empty and they never train)."""
    array = np.load(path, mmap_mode="r+")
    loader = torch.utils.data.DataLoader(Positioned(dataset, positions), batch_size=args.batch_size,
                                         num_workers=args.num_workers, generator=torch.Generator(),
                                         collate_fn=partial(collate_positioned,
                                                            collate_fn=partial(collate, pad_token_id=0)))
    model.to(runtime.device).eval()
    encoded = []
    with torch.no_grad(), autocast:
        for batch_positions, batch in tqdm(loader, desc="caching vision features", disable=not runtime.is_main):
            encoded += batch_positions
            if batch is None or batch["pixel_values"] is None:
                continue
            features = model.vision_features(batch["pixel_values"].to(runtime.device)).to(torch.float16).cpu()
            rows = [row for position in batch_positions for row in range(offsets[position], offsets[position + 1])]
            array[rows] = features.numpy()
    array.flush()
    del array
    return sorted(set(positions) - set(encoded))


# ==================================================================== a whole stage
def build_conversation_dataset(args, processor: VLMProcessor, validate: bool = True,
                               scan: ScanPlan | None = None) -> ConversationDataset:
    return ConversationDataset(args.data_path, processor, args.image_dir, args.skip_bad_samples, validate, scan=scan)


def scan_plan(args, runtime: Runtime) -> ScanPlan:
    """The start-up scan shared over the ranks and their loader workers, its result kept in the output folder for
    a resume (it is keyed by the data files, so changed data is scanned again)."""
    return ScanPlan(runtime.rank, runtime.world_size, args.num_workers, partial(gathered, runtime=runtime),
                    os.path.join(args.output_dir, "data_scan.json"), partial(from_main, runtime=runtime))


def run_stage(args, build_dataset=build_conversation_dataset, objective=None, collate=collate) -> VLM | None:
    """Everything a stage script does after parsing its flags: build, check or train, save."""
    quantization_config(args)  # a k-bit request on a machine that cannot serve it stops here, before any work
    if args.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise SystemExit("--wandb_project logs to Weights & Biases, which is not installed: pip install wandb") \
                from None
    process_started = time.time()
    runtime = setup_runtime(args.device)
    seed_everything(args.seed)
    torch.set_float32_matmul_precision("high")
    if runtime.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
    texts = partial(training_texts, args.data_path)  # a preset learns its tokenizer from them
    if args.check_data:  # the tokenizer, image processor and geometry: no weights are loaded
        model = build_model(args, tokenizer_texts=texts, weights=False)
        dataset = build_dataset(args, VLMProcessor.from_model(model, args.max_length), validate=False)
        return report_data_check(dataset, args.num_workers)
    # The held-out questions and their images are read first: a broken file stops the run before any work.
    evaluation = HeldOutEvaluation(args, runtime) if args.eval_data_path else None
    model = build_model(args, tokenizer_texts=texts)
    set_trainable(model, args.train_vision, args.train_projector, args.train_llm)
    processor = VLMProcessor.from_model(model, args.max_length)
    dataset = build_dataset(args, processor, scan=scan_plan(args, runtime))
    if args.cache_vision_features:
        attach_feature_cache(model, dataset, args.cache_vision_features, runtime, args, autocast_for(args, runtime))
    if runtime.is_main:
        describe_run(model, dataset, runtime, args)
    packing = {"pack_length": args.max_length} if args.packing else {}
    train(args, runtime, model, dataset, objective or LanguageModelingObjective(),
          partial(collate, pad_token_id=processor.pad_token_id, **packing), evaluation, process_started)
    save_final_model(model, args.output_dir, runtime)
    if runtime.is_main:
        print(f"saved the final model to {args.output_dir}")
    barrier(runtime)
    if runtime.distributed:
        dist.destroy_process_group()
    return model


def training_texts(paths: list[str]):
    """Every message of the training files, for learning a preset's tokenizer."""
    for path in paths:
        for i, record in enumerate(load_records(path)):
            for message in parse_record(record, f"{path}: sample {i}").messages:
                yield message["content"]


def describe_run(model: VLM, dataset, runtime: Runtime, args) -> None:
    counts = {key: (sum(p.numel() for p in module_of(model, key).parameters()),
                    sum(p.numel() for p in module_of(model, key).parameters() if p.requires_grad))
              for key in MODULE_PREFIXES}
    parts = ", ".join(f"{key} {total / 1e6:.2f}M (" + (f"{trained:,} trained" if trained else "frozen") + ")"
                      for key, (total, trained) in counts.items())
    tiles = model.config.max_tiles
    per = "image" if tiles == 1 else f"view (up to {tiles} tiles + a global view per image)"
    print(f"model: {parts}; {model.config.num_image_tokens} image tokens per {per}")
    print(f"data: {len(dataset)} samples; {runtime.world_size} process(es) x batch {args.batch_size} x "
          f"accumulation {args.grad_accum} on {runtime.device}")
    print(f"precision: {describe_precision(args.dtype, runtime.device)}")


def report_data_check(dataset: ConversationDataset, workers: int) -> None:
    summary = check_data(dataset, workers)
    for message in summary["problems"][:20]:
        print(message)
    if len(summary["problems"]) > 20:
        print(f"... and {len(summary['problems']) - 20} more problems")
    print(json.dumps({k: v for k, v in summary.items() if k != "problems"}))
    if summary["bad"]:
        raise SystemExit(1)
