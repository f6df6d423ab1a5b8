"""A stage's settings, typed: one dataclass per group of flags, built once from the command line.

`utils.stage_parser` defines the flags (with their help and defaults) in the same groups; `StageSettings.from_args`
sorts the parsed values into these groups, and each function of the training code takes the group it reads: the
optimizer its `OptimSettings`, the loader and dataset their `DataSettings`, and so on. No setting has a default
here, so every value comes from a flag or is fixed, visibly, by the stage script that builds the settings.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ModelSettings:
    """Which model a stage starts from, and the architecture choices of a new one."""

    model_path: str | None
    vision_model: str
    llm_model: str
    image_size: int | None
    max_tiles: int | None
    vision_feature_layer: int | None
    projector_input_norm: str | None
    projector_output_norm: str | float | None
    preset: str | None
    tokenizer: str | None
    tokenizer_vocab_size: int
    # Not a flag: DPO needs its starting model whole (it is also the reference), so it folds a checkpoint's LoRA
    # adapters in; the other stages keep them as adapters.
    merge_loaded_adapters: bool


@dataclass(frozen=True)
class DataSettings:
    data_path: list[str]
    image_dir: str | None
    max_length: int
    check_data: bool
    skip_bad_samples: bool
    num_workers: int
    packing: bool
    prompt_format: str
    group_by_length: bool
    cache_vision_features: str | None


@dataclass(frozen=True)
class RunSettings:
    """The run: its length and batch, what trains, where and in what precision."""

    output_dir: str
    num_epochs: float
    max_steps: int
    batch_size: int
    grad_accum: int
    train_vision: bool
    train_projector: bool
    train_llm: bool
    llm_frozen_layers: int
    gradient_checkpointing: bool
    compile: bool
    fsdp: bool
    dtype: str
    device: str | None
    seed: int


@dataclass(frozen=True)
class OptimSettings:
    """AdamW, its learning rate per module and its schedule."""

    lr: float
    projector_lr: float | None
    llm_lr: float | None
    vision_lr: float | None
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    lr_scheduler_type: str
    decay_ratio: float
    warmup_ratio: float
    warmup_steps: int
    max_grad_norm: float

    def module_lr(self, module: str) -> float:
        """A module's own learning rate (--projector_lr ...), else --lr."""
        return getattr(self, f"{module}_lr") or self.lr


@dataclass(frozen=True)
class LoraSettings:
    lora: bool
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target: list[str]
    load_in_4bit: bool
    load_in_8bit: bool


@dataclass(frozen=True)
class EvalSettings:
    eval_data_path: str | None
    eval_image_dir: str | None
    eval_steps: int
    eval_batch_size: int
    eval_max_new_tokens: int


@dataclass(frozen=True)
class LogSettings:
    """Checkpoints and logging."""

    save_steps: int
    save_total_limit: int
    resume: bool
    logging_steps: int
    wandb_project: str | None
    wandb_run_name: str | None


# The settings groups, in the order of the parser's argument groups in utils.stage_parser (a test checks that each
# parser group's flags are one dataclass's fields).
GROUPS = {"model": ModelSettings, "data": DataSettings, "run": RunSettings, "optimizer": OptimSettings,
          "lora": LoraSettings, "eval": EvalSettings, "log": LogSettings}


@dataclass(frozen=True)
class StageSettings:
    model: ModelSettings
    data: DataSettings
    run: RunSettings
    optimizer: OptimSettings
    lora: LoraSettings
    eval: EvalSettings
    log: LogSettings
    stage: object | None = None  # a stage's own group (DPO's DPOSettings), None for pretrain and SFT

    @classmethod
    def from_args(cls, args: argparse.Namespace, stage: type | None = None, **fixed) -> StageSettings:
        """Every parsed flag (and every value the stage fixes, `fixed`) into exactly one field; a value that fits
        no field, or a field that gets no value, is a programming error caught here rather than a silent default."""
        values = {**vars(args), **fixed}
        classes = {**GROUPS, **({"stage": stage} if stage else {})}
        groups = {name: group(**{f.name: values.pop(f.name) for f in fields(group)})
                  for name, group in classes.items()}
        if values:
            raise TypeError(f"settings that fit no group: {sorted(values)}")
        return cls(**groups)

    def flat(self) -> dict:
        """Every setting by its flag name, for wandb's run config."""
        return {f.name: getattr(group, f.name) for group in (getattr(self, name) for name in [*GROUPS, "stage"])
                if group is not None for f in fields(group)}
