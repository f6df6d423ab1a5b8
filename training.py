"""The one training loop behind pretrain, SFT and DPO, and the stage runner around it.

A stage script supplies its defaults, a dataset builder and an objective (the loss of a batch); `run_stage` builds
what the loop needs (model_setup.py, distributed.py, the data and its feature cache) and `train` runs the steps:
autocast, gradient accumulation normalised over the whole optimizer step, clipping, logging, held-out evaluation,
checkpoints and resume (checkpoints.py).
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from checkpoints import resume_latest, save_checkpoint, save_final_model
from data import ConversationDataset, ScanPlan, check_data, collate, load_records, parse_record
from distributed import (ReachEveryTrainable, Runtime, all_reduce_sum, barrier, from_main, gathered, setup_runtime,
                         shard_model, sharded)
from eval_vlm import HeldOutQuestions, compute_metrics, write_predictions
from feature_cache import attach_feature_cache, fit_projector_whitening
from inference import describe_precision, resolve_dtype
from model import VLM
from model_setup import (MODULE_PREFIXES, autocast_for, build_model, build_optimizer, build_scheduler,
                         compile_blocks, module_of, quantization_config, seed_everything, set_train_mode,
                         set_trainable, trainable_parameters)
from processor import IGNORE_INDEX, VLMProcessor
from sampler import BatchStream, ResumableSampler, build_loader
from settings import DataSettings, EvalSettings, LogSettings, OptimSettings, RunSettings, StageSettings


class Objective(Protocol):
    """What a stage trains for: the loop sums `__call__`'s loss over an optimizer step's micro-batches and divides
    by the step's global `count`, so every supervised token (or pair) weighs the same wherever it sits."""

    def prepare(self, model: VLM, dataset, runtime: Runtime, collate_fn, autocast) -> None:
        """Called once before training (before sharding and resuming), on the starting model."""

    def count(self, batch: dict) -> int:
        """How many items (tokens, pairs) of the batch the loss sums over."""

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's summed loss and any metrics to log (summed too)."""


class LanguageModelingObjective:
    """Next-token loss on the supervised tokens; the loop divides its sum by the step's global token count."""

    def prepare(self, model: VLM, dataset, runtime: Runtime, collate_fn, autocast) -> None:
        pass  # nothing to set up: the labels are in every batch

    def count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return model(**batch).loss_sum, {}


class HeldOutEvaluation:
    """--eval_data_path: the model answers fixed held-out questions greedily every --eval_steps steps and after the
    last one, with eval_vlm.py's own answering and scoring, so the curve's figures are the ones eval_vlm.py gives for
    the saved checkpoint (in the same precision). The file and its images are read when the run starts: a problem
    stops it before step 1. The main process evaluates; the others wait."""

    def __init__(self, settings: EvalSettings, image_dir: str | None, output_dir: str, fsdp: bool,
                 runtime: Runtime):
        self.every, self.output_dir, self.runtime = settings.eval_steps, output_dir, runtime
        self.batch_size, self.max_new_tokens = settings.eval_batch_size, settings.eval_max_new_tokens
        self.questions = HeldOutQuestions(settings.eval_data_path, settings.eval_image_dir or image_dir)
        if fsdp and runtime.distributed:
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


def peak_memory_gb(device: torch.device) -> float:
    """The most memory this process has held so far: the GPU's tensors on CUDA, the resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux counts it in KiB


class MetricLogger:
    """tqdm on the main process, one JSON line per logged step in output_dir/log.jsonl, wandb when asked. Every line
    carries its wall-clock `time` and the seconds since its process started (`run_seconds`), so that a learning
    curve can put the stages of a job, start-ups included, on one time axis (scripts/plot_curve.py)."""

    def __init__(self, settings: LogSettings, output_dir: str, config: dict, runtime: Runtime, total_steps: int,
                 start_step: int, process_started: float):
        self.enabled = runtime.is_main
        self.path = os.path.join(output_dir, "log.jsonl")
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not self.enabled, desc="train",
                        dynamic_ncols=True)
        self.wandb = None
        if self.enabled and settings.wandb_project:
            import wandb

            self.wandb = wandb.init(project=settings.wandb_project, name=settings.wandb_run_name, config=config,
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


@dataclass
class Run:
    """What a training run holds from one optimizer step to the next (built by start_run)."""

    model: VLM
    wrapped: torch.nn.Module  # what the forward goes through: DDP around the model, or the (sharded) model itself
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    stream: BatchStream
    step: int
    total_steps: int
    batches_per_epoch: int
    run_shape: dict  # what fixes the data order and the schedule: a resume that changes any of it is refused
    autocast: torch.autocast
    amp_dtype: torch.dtype
    reach: ReachEveryTrainable | None
    params: list[torch.nn.Parameter]  # what trains: clipped together

    def checkpoint_state(self) -> dict:
        return {"step": self.step, "epoch": self.stream.epoch, "batch_in_epoch": self.stream.batch_in_epoch,
                "run_shape": self.run_shape}


def start_run(settings: StageSettings, runtime: Runtime, model: VLM, dataset, objective: Objective,
              collate_fn) -> Run:
    """Everything before the first step: the model on its device, the batch order, the objective's set-up (DPO's
    reference is the starting model), sharding or DDP, the optimizer and schedule, and the newest checkpoint when
    --resume is given."""
    run_cfg, data = settings.run, settings.data
    model.to(runtime.device)
    if run_cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    amp_dtype = resolve_dtype(run_cfg.dtype, runtime.device)
    autocast = autocast_for(run_cfg.dtype, runtime.device)
    grouping = {}
    if data.group_by_length:
        # 64 batches per group: batches of near-equal length, and a group still spans many kinds of sample.
        grouping = {"lengths": [dataset.length_estimate(i) for i in range(len(dataset))],
                    "group_size": 64 * run_cfg.batch_size, "batch_size": run_cfg.batch_size}
    sampler = ResumableSampler(dataset, runtime, run_cfg.seed, **grouping)
    loader = build_loader(dataset, sampler, collate_fn, run_cfg.batch_size, data.num_workers, run_cfg.seed, runtime)
    batches_per_epoch = math.ceil(sampler.num_samples / run_cfg.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // run_cfg.grad_accum)
    total_steps = run_cfg.max_steps if run_cfg.max_steps > 0 else math.ceil(run_cfg.num_epochs * steps_per_epoch)
    objective.prepare(model, dataset, runtime, collate_fn, autocast)  # before sharding and resuming
    if run_cfg.fsdp and runtime.distributed:
        shard_model(model)
    if run_cfg.compile:
        compile_blocks(model)
    optimizer = build_optimizer(model, settings.optimizer)
    scheduler = build_scheduler(optimizer, settings.optimizer, total_steps)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=amp_dtype == torch.float16)
    run_shape = {"world_size": runtime.world_size, "batch_size": run_cfg.batch_size, "grad_accum": run_cfg.grad_accum,
                 "seed": run_cfg.seed, "group_by_length": data.group_by_length, "total_steps": total_steps,
                 "lr_scheduler_type": settings.optimizer.lr_scheduler_type}

    step, stream = 0, BatchStream(loader, sampler, run_cfg.batch_size)
    state = resume_latest(run_cfg.output_dir, run_shape, model, optimizer, scheduler, scaler, runtime) \
        if settings.log.resume else None
    if state is not None:
        step = state["step"]
        stream = BatchStream(loader, sampler, run_cfg.batch_size, state["epoch"], state["batch_in_epoch"])

    wrapped, reach = model, None
    if runtime.distributed:
        if any(p.requires_grad for p in [*model.projector.parameters(), *model.vision_model.parameters()]):
            reach = ReachEveryTrainable(model)
        if not sharded(model):
            # A trainable tower may hold parameters our features never reach (CLIP's post_layernorm acts only on
            # its pooled output); DDP must then look for them each step instead of waiting for their gradients.
            wrapped = DistributedDataParallel(
                model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None,
                find_unused_parameters=any(p.requires_grad for p in model.vision_model.parameters()))
    set_train_mode(model, run_cfg.gradient_checkpointing)
    return Run(model, wrapped, optimizer, scheduler, scaler, stream, step, total_steps, batches_per_epoch, run_shape,
               autocast, amp_dtype, reach, list(trainable_parameters(model).values()))


def optimizer_step(run: Run, objective: Objective, run_cfg: RunSettings, optim: OptimSettings,
                   runtime: Runtime) -> dict:
    """One optimizer step over --grad_accum micro-batches; returns what is logged for it."""
    started = time.perf_counter()
    model, is_sharded = run.model, sharded(run.model)
    micro_batches = [run.stream.next() for _ in range(run_cfg.grad_accum)]
    # Every token of the optimizer step weighs the same, whichever micro-batch or rank it sits in: divide each
    # micro-batch's summed loss by the step's global count. (DDP averages gradients over ranks, hence the factor
    # world_size.)
    counts = torch.tensor([sum(objective.count(b) for b in micro_batches),
                           sum(int(b["attention_mask"].sum()) for b in micro_batches)],
                          dtype=torch.float64, device=runtime.device)
    num_items, num_tokens = all_reduce_sum(counts, runtime).tolist()
    step_loss = torch.zeros((), dtype=torch.float64, device=runtime.device)
    metric_sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        batch = {k: (v.to(runtime.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        sync = not runtime.distributed or i == len(micro_batches) - 1
        if is_sharded:  # FSDP2 reduce-scatters the gradients only after the last micro-batch
            model.set_requires_gradient_sync(sync)
            sync = True
        if run.reach is not None:
            run.reach.text_only = batch["pixel_values"] is None and batch.get("vision_features") is None
        with (nullcontext() if sync else run.wrapped.no_sync()), run.autocast:
            loss_sum, metrics = objective(run.wrapped, batch)
            loss = loss_sum * runtime.world_size / max(num_items, 1)
        run.scaler.scale(loss).backward()
        step_loss += loss_sum.detach().double()
        for name, value in metrics.items():
            metric_sums[name] = metric_sums.get(name, 0) + value.detach().double()
    run.scaler.unscale_(run.optimizer)
    max_norm = optim.max_grad_norm
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm if max_norm > 0 else float("inf"))
    reduced = all_reduce_sum(torch.stack([step_loss, *metric_sums.values()]), runtime) / max(num_items, 1)
    if not torch.isfinite(reduced[0]) or (run.amp_dtype != torch.float16 and not torch.isfinite(grad_norm)):
        raise FloatingPointError(
            f"step {run.step + 1}: loss {reduced[0].item()} / grad norm {grad_norm.item()} is not finite; "
            f"stopping without saving. The last good checkpoint stays in {run_cfg.output_dir}. Try "
            f"--dtype bf16 (or fp32), a lower --lr, or check the data of this step")
    lrs = learning_rates(run.optimizer, run.scheduler, optim.lr)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1

    elapsed = time.perf_counter() - started
    return {"loss": reduced[0].item(), **lrs, "grad_norm": grad_norm.item(),
            "epoch": run.stream.epoch + run.stream.batch_in_epoch / run.batches_per_epoch,
            "supervised_tokens": int(num_items), "tokens_per_s": num_tokens / elapsed,
            "samples_per_s": run_cfg.batch_size * run_cfg.grad_accum * runtime.world_size / elapsed,
            "peak_memory_gb": peak_memory_gb(runtime.device),
            **{name: value.item() for name, value in zip(metric_sums, reduced[1:])}}


def learning_rates(optimizer, scheduler, base_lr: float) -> dict:
    """This step's learning rates: "lr" for --lr's schedule, and "lr_<module>" for a module given a rate of its own
    (--projector_lr ...), which the same schedule scales."""
    factor = scheduler.get_last_lr()[0] / optimizer.param_groups[0]["initial_lr"]
    own = {f"lr_{group['name']}": group["initial_lr"] * factor for group in optimizer.param_groups
           if group["initial_lr"] != base_lr and not group["name"].endswith("_no_decay")}
    return {"lr": base_lr * factor, **own}


def train(settings: StageSettings, runtime: Runtime, model: VLM, dataset, objective: Objective, collate_fn,
          evaluation: HeldOutEvaluation | None = None, process_started: float | None = None) -> None:
    """Run the optimizer steps asked for: each step, then its log line, its checkpoint and its held-out evaluation
    when they are due."""
    run = start_run(settings, runtime, model, dataset, objective, collate_fn)
    log, output_dir = settings.log, settings.run.output_dir
    logger = MetricLogger(log, output_dir, settings.flat(), runtime, run.total_steps, run.step,
                          process_started or time.time())
    try:
        while run.step < run.total_steps:
            record = optimizer_step(run, objective, settings.run, settings.optimizer, runtime)
            step, last = run.step, run.step == run.total_steps
            logger.log(step, record, write=step % log.logging_steps == 0 or last)
            if log.save_steps > 0 and (step % log.save_steps == 0 or last):
                save_checkpoint(output_dir, step, model, run.optimizer, run.scheduler, run.scaler,
                                run.checkpoint_state(), runtime, log.save_total_limit)
            if evaluation is not None and evaluation.due(step, run.total_steps):
                logger.log_eval(step, evaluation(model, step, run.total_steps, run.autocast))
                set_train_mode(model, settings.run.gradient_checkpointing)
    finally:
        logger.close()
        if run.reach is not None:  # the trained model goes back as it came
            run.reach.hook.remove()


def build_conversation_dataset(data: DataSettings, processor: VLMProcessor, validate: bool = True,
                               scan: ScanPlan | None = None) -> ConversationDataset:
    return ConversationDataset(data.data_path, processor, data.image_dir, data.skip_bad_samples, validate, scan=scan)


def scan_plan(num_workers: int, output_dir: str, runtime: Runtime) -> ScanPlan:
    """The start-up scan shared over the ranks and their loader workers, its result kept in the output folder for
    a resume (it is keyed by the data files, so changed data is scanned again)."""
    return ScanPlan(runtime.rank, runtime.world_size, num_workers, partial(gathered, runtime=runtime),
                    os.path.join(output_dir, "data_scan.json"), partial(from_main, runtime=runtime))


def run_stage(settings: StageSettings, build_dataset=build_conversation_dataset, objective: Objective | None = None,
              collate_fn=collate) -> VLM | None:
    """Everything a stage script does after parsing its flags: build, check or train, save."""
    model_settings, data, run_cfg = settings.model, settings.data, settings.run
    # A k-bit request on a machine that cannot serve it stops here, before any work.
    quantization = quantization_config(settings.lora, model_settings.preset, run_cfg.fsdp)
    if settings.log.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise SystemExit("--wandb_project logs to Weights & Biases, which is not installed: pip install wandb") \
                from None
    process_started = time.time()
    runtime = setup_runtime(run_cfg.device)
    seed_everything(run_cfg.seed)
    torch.set_float32_matmul_precision("high")
    if runtime.is_main:
        os.makedirs(run_cfg.output_dir, exist_ok=True)
    model_build = partial(build_model, model_settings, settings.lora, data.prompt_format, quantization,
                          run_cfg.gradient_checkpointing,
                          tokenizer_texts=partial(training_texts, data.data_path))  # a preset learns its tokenizer
    if data.check_data:  # the tokenizer, image processor and geometry: no weights are loaded
        model = model_build(weights=False)
        dataset = build_dataset(data, VLMProcessor.from_model(model, data.max_length), validate=False)
        return report_data_check(dataset, data.num_workers)
    # The held-out questions and their images are read first: a broken file stops the run before any work.
    evaluation = (HeldOutEvaluation(settings.eval, data.image_dir, run_cfg.output_dir, run_cfg.fsdp, runtime)
                  if settings.eval.eval_data_path else None)
    model = model_build()
    set_trainable(model, run_cfg.train_vision, run_cfg.train_projector, run_cfg.train_llm, run_cfg.llm_frozen_layers)
    processor = VLMProcessor.from_model(model, data.max_length)
    dataset = build_dataset(data, processor, scan=scan_plan(data.num_workers, run_cfg.output_dir, runtime))
    autocast = autocast_for(run_cfg.dtype, runtime.device)
    if data.cache_vision_features:
        attach_feature_cache(model, dataset, data.cache_vision_features, runtime, run_cfg.batch_size, data.num_workers,
                             autocast)
    if model.config.projector_input_norm == "whiten" and not model_settings.model_path:  # a new projector: fit it
        fit_projector_whitening(model, dataset, runtime, run_cfg.batch_size, data.num_workers, autocast)
    if runtime.is_main:
        describe_run(model, dataset, runtime, run_cfg)
    packing = {"pack_length": data.max_length} if data.packing else {}
    train(settings, runtime, model, dataset, objective or LanguageModelingObjective(),
          partial(collate_fn, pad_token_id=processor.pad_token_id, **packing), evaluation, process_started)
    save_final_model(model, run_cfg.output_dir, runtime)
    if runtime.is_main:
        print(f"saved the final model to {run_cfg.output_dir}")
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


def describe_run(model: VLM, dataset, runtime: Runtime, run: RunSettings) -> None:
    counts = {key: (sum(p.numel() for p in module_of(model, key).parameters()),
                    sum(p.numel() for p in module_of(model, key).parameters() if p.requires_grad))
              for key in MODULE_PREFIXES}
    parts = ", ".join(f"{key} {total / 1e6:.2f}M (" + (f"{trained:,} trained" if trained else "frozen") + ")"
                      for key, (total, trained) in counts.items())
    tiles = model.config.max_tiles
    per = "image" if tiles == 1 else f"view (up to {tiles} tiles + a global view per image)"
    print(f"model: {parts}; {model.config.num_image_tokens} image tokens per {per}")
    print(f"data: {len(dataset)} samples; {runtime.world_size} process(es) x batch {run.batch_size} x "
          f"accumulation {run.grad_accum} on {runtime.device}")
    print(f"precision: {describe_precision(run.dtype, runtime.device)}")


def report_data_check(dataset: ConversationDataset, workers: int) -> None:
    summary = check_data(dataset, workers)
    for message in summary["problems"][:20]:
        print(message)
    if len(summary["problems"]) > 20:
        print(f"... and {len(summary['problems']) - 20} more problems")
    print(json.dumps({k: v for k, v in summary.items() if k != "problems"}))
    if summary["bad"]:
        raise SystemExit(1)
