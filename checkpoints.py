"""Checkpoints and resume: checkpoint-STEP/ folders written atomically (trainable tensors, optimizer, schedule,
loss scaler, every rank's random state and data position), the newest restored exactly, and the final model saved as
a folder VLM.from_pretrained opens.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from functools import partial

import torch
from safetensors.torch import load_file, save_file

from distributed import Runtime, barrier, full_tensors, sharded
from model import VLM
from model_setup import trainable_parameters

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


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


def resume_latest(output_dir: str, run_shape: dict, model: VLM, optimizer, scheduler, scaler,
                  runtime: Runtime) -> dict | None:
    """--resume: restore the newest checkpoint and return its state (step, data position), or None when there is
    none. A checkpoint written with another data order or schedule (`run_shape`) is refused: it cannot continue the
    same run."""
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        if runtime.is_main:
            print(f"--resume: no checkpoint in {output_dir}, starting from scratch")
        return None
    state = load_checkpoint(checkpoints[-1], model, optimizer, scheduler, scaler, runtime)
    changed = {key: (value, run_shape.get(key)) for key, value in state["run_shape"].items()
               if run_shape.get(key) != value}
    if changed:
        described = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
        raise ValueError(f"{checkpoints[-1]} was written with other settings ({described}; total_steps comes "
                         f"from --max_steps or --num_epochs): "
                         f"the data order or the schedule would differ, so it cannot resume exactly")
    if runtime.is_main:
        print(f"resumed from {checkpoints[-1]} at step {state['step']}")
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
