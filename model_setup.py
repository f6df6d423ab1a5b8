"""The model a stage trains: built from a checkpoint, a preset or two pretrained parts (k-bit and LoRA when asked),
which of its modules train, the optimizer with a learning rate per module, the schedule, and the precision.
"""

from __future__ import annotations

import random

import torch
from transformers import AutoTokenizer, get_scheduler

from inference import resolve_dtype, with_max_tiles
from lora import adapter_parameters, add_adapters, merge_adapters
from model import VLM, vlm_from_components, vlm_from_preset, vlm_without_weights
from processor import make_tokenizer
from settings import LoraSettings, ModelSettings, OptimSettings

MODULE_PREFIXES = {"vision": "vision_model.", "projector": "projector.", "llm": "language_model."}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def autocast_for(dtype: str, device: torch.device) -> torch.autocast:
    """--dtype as an autocast context on the device (a disabled one for fp32)."""
    amp_dtype = resolve_dtype(dtype, device)
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)


def build_model(settings: ModelSettings, lora: LoraSettings, prompt_format: str, quantization: dict,
                gradient_checkpointing: bool, tokenizer_texts=None, weights: bool = True) -> VLM:
    """From a VLM checkpoint (--model_path), a named preset (--preset), or two pretrained components; then LoRA
    adapters when asked for and not already there. Without weights (--check_data), a checkpoint or components give
    their configs and processors only, their parameters on the meta device. `prompt_format` is the run's (saved in
    the checkpoints it writes); `quantization` loads the LLM in k-bit (quantization_config), prepared for
    `gradient_checkpointing` when it is on."""
    architecture = new_model_settings(settings)
    if not weights and not settings.preset:
        where = "--model_path" if settings.model_path else "--vision_model / --llm_model"
        model = loaded(where, settings.model_path or f"{settings.vision_model}, {settings.llm_model}",
                       lambda: vlm_without_weights(settings.model_path, settings.vision_model, settings.llm_model,
                                                   settings.image_size, **architecture))
        return with_run_settings(model, prompt_format, settings.max_tiles)
    if settings.model_path:
        model = loaded("--model_path", settings.model_path,
                       lambda: VLM.from_pretrained(settings.model_path, **quantization))
    elif settings.preset:
        if settings.tokenizer:
            tokenizer = loaded("--tokenizer", settings.tokenizer,
                               lambda: AutoTokenizer.from_pretrained(settings.tokenizer))
        else:  # nothing pretrained: a small BPE learnt from the training text itself
            tokenizer = make_tokenizer(tokenizer_texts(), vocab_size=settings.tokenizer_vocab_size)
        model = vlm_from_preset(settings.preset, tokenizer, **architecture)
    else:
        model = loaded("--vision_model / --llm_model", f"{settings.vision_model}, {settings.llm_model}",
                       lambda: vlm_from_components(settings.vision_model, settings.llm_model,
                                                   llm_kwargs=quantization, image_size=settings.image_size,
                                                   **architecture))
    if settings.merge_loaded_adapters and model.config.lora:
        # DPO: the starting model is the reference, and a LoRA SFT checkpoint's adapters are part of it. Switching
        # them off would score the policy against the model before SFT; folded in, "adapters off" is the SFT model.
        if quantization:
            raise SystemExit(f"--model_path {settings.model_path} carries LoRA adapters, which cannot be folded into "
                             f"k-bit weights: merge them first (scripts/merge_lora.py) and start from that folder")
        merge_adapters(model)
    if quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if lora.lora and not model.config.lora:
        add_adapters(model, lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.lora_target)
    return with_run_settings(model, prompt_format, settings.max_tiles)


def new_model_settings(settings: ModelSettings) -> dict:
    """The architecture flags a new model is built with. A checkpoint keeps the ones it was trained with: changing
    them would feed its trained projector inputs it never saw, so giving them with --model_path is an error."""
    architecture = {"vision_feature_layer": settings.vision_feature_layer,
                    "projector_input_norm": settings.projector_input_norm,
                    "projector_output_norm": settings.projector_output_norm}
    architecture = {key: value for key, value in architecture.items() if value is not None}
    if settings.model_path and architecture:
        flags = ", ".join(f"--{key}" for key in architecture)
        raise SystemExit(f"{flags}: set when a model is built (stage 1); {settings.model_path} keeps what it was "
                         f"trained with (see its config.json)")
    for key in ("projector_input_norm", "projector_output_norm"):
        if architecture.get(key) == "none":
            architecture[key] = None
    return architecture


def with_run_settings(model: VLM, prompt_format: str, max_tiles: int | None) -> VLM:
    """What this run changes in the model's config, and so in the checkpoints it saves: the tiles and the prompt
    format (stage 1 trains plain, later stages chat)."""
    model.config.prompt_format = prompt_format
    return with_max_tiles(model, max_tiles)


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


def quantization_config(lora: LoraSettings, preset: str | None, fsdp: bool) -> dict:
    """k-bit loading of the frozen LLM (QLoRA), with bitsandbytes. What cannot work stops here, before any work."""
    if not (lora.load_in_4bit or lora.load_in_8bit):
        return {}
    if preset:
        raise SystemExit("--load_in_4bit / --load_in_8bit quantize a pretrained LLM as it loads; a --preset model "
                         "is built with random weights and would train unquantized: give --llm_model or --model_path")
    if not lora.lora:
        raise SystemExit("k-bit weights cannot be trained directly: add --lora (QLoRA)")
    if fsdp:
        raise SystemExit("--fsdp does not shard k-bit weights here: use DDP (drop --fsdp) with QLoRA")
    try:
        import bitsandbytes  # noqa: F401  (0.48 and later run on the CPU too)
    except ImportError:
        raise SystemExit("--load_in_4bit / --load_in_8bit need bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=lora.load_in_4bit, load_in_8bit=lora.load_in_8bit, bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=["vision_model", "projector", "lm_head"])}


def set_trainable(model: VLM, vision: bool, projector: bool, llm: bool, llm_frozen_layers: int = 0) -> None:
    """Freeze or train each module. A module that carries LoRA adapters trains its adapters only. A trained LLM
    keeps its input embeddings (and an output head tied to them) and its first `llm_frozen_layers` blocks frozen:
    their weight gradients and optimizer updates are skipped, while gradients still flow through them to the
    projector."""
    adapters = {id(p) for p in adapter_parameters(model).values()}
    for key, flag in (("vision", vision), ("projector", projector), ("llm", llm)):
        params = list(module_of(model, key).parameters())
        own_adapters = [p for p in params if id(p) in adapters]
        for p in params:
            p.requires_grad_(flag and (not own_adapters or id(p) in adapters))
    if llm and llm_frozen_layers:
        blocks = transformer_blocks(model, model.language_model)
        if not 0 <= llm_frozen_layers <= len(blocks):
            raise SystemExit(f"--llm_frozen_layers {llm_frozen_layers}: the LLM has {len(blocks)} blocks")
        for module in [model.language_model.get_input_embeddings(), *blocks[:llm_frozen_layers]]:
            module.requires_grad_(False)


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


def build_optimizer(model: VLM, settings: OptimSettings) -> torch.optim.Optimizer:
    """AdamW with one learning rate per module; no weight decay on biases and norms."""
    groups = []
    for key, prefix in MODULE_PREFIXES.items():
        lr = settings.module_lr(key)
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad]
        for suffix, decay in (("", True), ("_no_decay", False)):
            chosen = [p for _, p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": settings.weight_decay if decay else 0.0,
                               "name": key + suffix})
    if not groups:
        raise ValueError("nothing to train: every module is frozen")
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, betas=(settings.adam_beta1, settings.adam_beta2), fused=fused)


def build_scheduler(optimizer, settings: OptimSettings, total_steps: int):
    """Linear warmup, then --lr_scheduler_type: cosine or linear to zero, constant, or warmup-stable-decay (the
    peak held until the last --decay_ratio of the steps, then a cosine to zero)."""
    warmup = settings.warmup_steps if settings.warmup_steps >= 0 else round(settings.warmup_ratio * total_steps)
    specific = {}
    if settings.lr_scheduler_type == "warmup_stable_decay":
        specific = {"num_decay_steps": round(settings.decay_ratio * total_steps)}
    return get_scheduler(settings.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=specific)


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
