"""The shared training loop: loss normalisation, DDP equivalence, exact resume after SIGKILL, frozen modules,
checkpoints, the NaN guard and the stage scripts' command lines."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from conftest import CHAT_STAGE_1, CORPUS, ROOT, TORCHRUN_2, saved_start, tiny_vlm, write_llava_json
from safetensors.torch import load_file

import pretrain_train
import sft_train
from data import collate, parse_record
from model import VLM
from processor import DataError, VLMProcessor, make_tokenizer
from settings import StageSettings
from checkpoints import list_checkpoints
from training import LanguageModelingObjective, run_stage

TIMEOUT = 300
# Tests whose tolerances are fp32 CPU arithmetic's (a GPU's fp32 matmuls run in TF32), and the multi-process tests
# (gloo on CPU ranks; on a GPU machine two ranks would ask for a GPU each): pinned to the CPU, so that they hold on a
# machine with a GPU too. tests/test_gpu.py checks the GPU with its own tolerances.
CPU_EXACT = ["--device", "cpu"]


def common_args(data, out, *extra):
    path, image_dir = data
    return ["--data_path", path, "--image_dir", image_dir, "--output_dir", str(out), "--num_workers", "0",
            "--logging_steps", "1", "--lr", "1e-3", "--dtype", "fp32", *extra]


def sft_settings(*flags) -> StageSettings:
    """Settings from the shared stage flags (a data path and an output folder filled in when not given)."""
    required = [] if "--data_path" in flags else ["--data_path", "x", "--output_dir", "y"]
    args = sft_train.stage_parser("t").parse_args([*required, *flags])
    return StageSettings.from_args(args, merge_loaded_adapters=False)


def read_log(out) -> dict[int, dict]:
    """Last record per step (a killed-and-resumed run logs some steps twice)."""
    records = {}
    with open(os.path.join(out, "log.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:  # held-out evaluations log lines of their own
                records[record["step"]] = record
    return records


def final_weights(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "model.safetensors"))


def assert_same_run(log_a, log_b, steps, rtol=1e-5):
    for step in steps:
        for key in ("loss", "grad_norm"):
            assert log_a[step][key] == pytest.approx(log_b[step][key], rel=rtol), (step, key)


@pytest.fixture
def data(tmp_path):
    return write_llava_json(str(tmp_path / "data"), 16, text_only={5})


# ---------------------------------------------------------------- loss normalisation
def test_loss_normaliser_makes_accumulated_gradients_equal_full_batch(toy_tokenizer, data):
    """The loop's rule (sum of token losses / tokens of the whole step) against a single full batch, and the
    per-micro-batch mean that nanoVLM-style loops use, which must differ here (samples of unequal length)."""
    model = tiny_vlm(toy_tokenizer).train()
    processor = VLMProcessor.from_model(model)
    from data import ConversationDataset

    dataset = ConversationDataset([data[0]], processor, data[1])
    samples = [dataset[i] for i in range(4)]
    objective = LanguageModelingObjective()

    def grads(micro_batches, normalise):
        model.zero_grad()
        total = sum(objective.count(b) for b in micro_batches)
        for batch in micro_batches:
            loss_sum, _ = objective(model, batch)
            (loss_sum / total if normalise == "step" else loss_sum / objective.count(batch) / len(micro_batches)
             ).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    pad = toy_tokenizer.pad_token_id
    full = grads([collate(samples, pad)], "step")
    accumulated = grads([collate(samples[:1], pad), collate(samples[1:3], pad), collate(samples[3:], pad)], "step")
    naive = grads([collate(samples[:1], pad), collate(samples[1:3], pad), collate(samples[3:], pad)], "mean")
    assert torch.allclose(accumulated, full, atol=1e-6)
    assert not torch.allclose(naive, full, atol=1e-4)


def test_accumulation_steps_equal_one_big_batch(tmp_path, data):
    logs = {}
    for batch_size, accumulation in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"b{batch_size}"
        sft_train.main(common_args(data, out, "--preset", "tiny", "--max_steps", "3", "--batch_size",
                                   str(batch_size), "--grad_accum", str(accumulation), "--save_steps", "0",
                                   *CPU_EXACT))
        logs[batch_size] = read_log(out)
    assert_same_run(logs[4], logs[2], [1, 2, 3])
    assert_same_run(logs[4], logs[1], [1, 2, 3])
    assert logs[4][1]["supervised_tokens"] == logs[1][1]["supervised_tokens"]


def text_only_for_rank_one_first(n=16, seed=42, batch_size=2):
    """Indices that DistributedSampler (2 ranks, epoch 0) hands rank 1 as its first batch."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    order = torch.randperm(n, generator=generator).tolist()
    return set(order[1::2][:batch_size])


def test_two_process_gloo_equals_one_process(tmp_path, toy_tokenizer):
    # Rank 1's first batch is text-only: the vision pass with weight zero must keep DDP from hanging.
    data = write_llava_json(str(tmp_path / "data"), 16, text_only=text_only_for_rank_one_first())
    tiny_vlm(toy_tokenizer).save_pretrained(tmp_path / "start")  # loaded, so that loading reports print
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = ["--model_path", str(tmp_path / "start"), "--max_steps", "4", "--save_steps", "0", *CPU_EXACT]
    steps.append("--train_vision")  # the tower's gradients must reduce too, text-only batch or not
    logs = tmp_path / "rank_logs"
    two = subprocess.run([*TORCHRUN_2, "--log_dir",
                          str(logs), "--redirects", "3", "--tee", "3",
                          os.path.join(ROOT, "sft_train.py"), *common_args(data, tmp_path / "two", *steps),
                          "--batch_size", "2"], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es) x batch 2" in two.stdout
    # Only rank 0 reports: the model summary, progress bars, and transformers' and datasets' loading output.
    printed = {rank: "".join(path.read_text() for path in sorted(logs.glob(f"*/attempt_0/{rank}/std*.log")))
               for rank in (0, 1)}
    for text in ("Loading weights", "checking samples", "model: vision", "precision:", "train:"):
        assert text in printed[0] and text not in printed[1], text
    assert len(json.load(open(tmp_path / "two" / "data_scan.json"))["samples"]) == 16  # gathered from both ranks
    one = subprocess.run([sys.executable, os.path.join(ROOT, "sft_train.py"),
                          *common_args(data, tmp_path / "one", *steps), "--batch_size", "4"],
                         env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_run(read_log(tmp_path / "two"), read_log(tmp_path / "one"), [1, 2, 3, 4])
    a, b = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("engine", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_a_text_only_batch_on_one_rank_keeps_stage_one_in_step(tmp_path, engine):
    """Stage 1 trains the projector alone; rank 1's first batch has no image, so without the zero-weight pass on a
    blank image its step would have nothing to differentiate and the ranks' collectives would part ways."""
    data = write_llava_json(str(tmp_path / "data"), 16, text_only=text_only_for_rank_one_first())
    run = subprocess.run([*TORCHRUN_2,
                          os.path.join(ROOT, "pretrain_train.py"),
                          *common_args(data, tmp_path / "out", "--preset", "tiny", "--max_steps", "2", "--save_steps",
                                       "0", "--batch_size", "2", *CPU_EXACT, *engine, *CHAT_STAGE_1)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(read_log(tmp_path / "out")) == 2


def test_gradient_checkpointing_and_loader_workers_change_nothing(tmp_path, data):
    logs = []
    for name, extra in (("plain", []), ("checkpointed", ["--gradient_checkpointing", "--num_workers", "2"])):
        sft_train.main(common_args(data, tmp_path / name, "--preset", "tiny", "--max_steps", "2", "--batch_size",
                                   "4", "--save_steps", "0", "--train_vision") + extra)
        logs.append(read_log(tmp_path / name))
    assert_same_run(logs[0], logs[1], [1, 2])


def test_checkpointing_recomputes_a_frozen_llm_that_gradients_pass_through(tmp_path, data, monkeypatch):
    """Stage 1: the LLM is frozen but the projector's gradient flows through it. With --gradient_checkpointing each
    of its 4 blocks must run twice per step (forward, then recompute in backward), and with dropout still off the
    losses and gradients equal the plain run's."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    calls = []
    forward = Qwen2MLP.forward
    monkeypatch.setattr(Qwen2MLP, "forward", lambda self, x: calls.append(self.training) or forward(self, x))
    logs = {}
    for name, extra in (("plain", []), ("checkpointed", ["--gradient_checkpointing"])):
        calls.clear()
        pretrain_train.main(common_args(data, tmp_path / name, "--preset", "tiny", "--max_steps", "1",
                                        "--batch_size", "4", "--save_steps", "0", *CHAT_STAGE_1) + extra)
        logs[name] = read_log(tmp_path / name)
        assert len(calls) == (8 if extra else 4), name
        assert not any(calls)  # the blocks' insides stay in eval mode
    assert_same_run(logs["plain"], logs["checkpointed"], [1])


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on CPU needs a C++ compiler (apt-get install g++)")
def test_compiled_blocks_train_like_eager_and_save_the_same_weights(tmp_path, data):
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        sft_train.main(common_args(data, tmp_path / name, "--preset", "tiny", "--max_steps", "3", "--batch_size",
                                   "4", "--save_steps", "0", "--train_vision", *CPU_EXACT) + extra)
    assert_same_run(read_log(tmp_path / "eager"), read_log(tmp_path / "compiled"), [1, 2, 3], rtol=1e-4)
    eager, compiled = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert eager.keys() == compiled.keys()
    for key in eager:
        # Adam turns float-rounding differences of near-zero gradients into differences of up to lr per step.
        torch.testing.assert_close(compiled[key], eager[key], rtol=0, atol=3e-4, msg=key)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu_with_fp32_master_weights(tmp_path, data, dtype):
    args = common_args(data, tmp_path, "--preset", "tiny", "--max_steps", "2", "--batch_size", "4",
                       "--save_steps", "0")
    args[args.index("--dtype") + 1] = dtype
    sft_train.main(args)
    log = read_log(tmp_path)
    assert all(torch.isfinite(torch.tensor(log[s]["loss"])) for s in (1, 2))
    assert all(t.dtype == torch.float32 for t in final_weights(tmp_path).values())


@pytest.mark.parametrize("speedup, expected", [(4.2, torch.bfloat16), (1.1, torch.float32), (0.0, torch.float32)])
def test_dtype_auto_on_a_cpu_takes_bf16_only_where_it_measures_faster(speedup, expected, monkeypatch, tmp_path, data,
                                                                     capsys):
    import inference

    monkeypatch.setattr(inference, "cpu_bf16_speedup", lambda: speedup)
    assert inference.resolve_dtype("auto", torch.device("cpu")) == expected
    assert inference.resolve_dtype("fp32", torch.device("cpu")) == torch.float32  # an explicit choice stays
    sft_train.main(common_args(data, tmp_path, "--preset", "tiny", "--max_steps", "1", "--batch_size", "4",
                               "--save_steps", "0", "--dtype", "auto", "--device", "cpu"))
    label = "bf16 autocast" if expected == torch.bfloat16 else "fp32"
    printed = capsys.readouterr().out
    why = f"bf16 matmuls run {speedup:.1f}x fp32 on this CPU" if speedup else "this CPU has no bf16 instructions"
    assert f"precision: {label} (--dtype auto: {why})" in printed


def test_dtype_auto_measures_this_cpu():
    import inference

    speedup = inference.cpu_bf16_speedup()
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert speedup == 0.0  # no bf16 instructions: emulated bf16 is never chosen
    else:
        assert speedup > 0 and inference.cpu_bf16_speedup() == speedup  # measured once per process


def test_wandb_logging_only_when_asked(tmp_path, data, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, record, step):
            calls.append(("log", step, record["loss"]))

        def finish(self):
            calls.append(("finish",))

    fake = type(sys)("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs["project"])) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    base = common_args(data, tmp_path / "a", "--preset", "tiny", "--max_steps", "2", "--batch_size", "4",
                       "--save_steps", "0")
    sft_train.main(base)
    assert calls == []
    sft_train.main(common_args(data, tmp_path / "b", "--preset", "tiny", "--max_steps", "2", "--batch_size", "4",
                               "--save_steps", "0", "--wandb_project", "mary"))
    assert [c[0] for c in calls] == ["init", "log", "log", "finish"] and calls[0][1] == "mary"


def one_line_exit(argv, capsys=None) -> str:
    """Run a stage expecting a user error: a SystemExit with a one-line message, never a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        sft_train.main(argv)
    message = str(exit_info.value.code)
    assert exit_info.value.code not in (0, None) and "\n" not in message and "Traceback" not in message, message
    return message


def test_user_errors_end_in_one_line(tmp_path, data, monkeypatch):
    base = common_args(data, tmp_path / "out", "--preset", "tiny", "--max_steps", "1", "--batch_size", "4",
                       "--save_steps", "0")
    nowhere = str(tmp_path / "no_such_checkpoint")
    assert nowhere in one_line_exit(base + ["--preset", "tiny", "--model_path", nowhere])
    assert "missing.json: data file not found" in one_line_exit(
        common_args((str(tmp_path / "missing.json"), data[1]), tmp_path / "o2", "--preset", "tiny"))
    broken = tmp_path / "broken.json"
    broken.write_text(open(data[0]).read()[:-40])
    assert "broken.json:1: malformed JSON" in one_line_exit(common_args((str(broken), data[1]), tmp_path / "o3",
                                                                        "--preset", "tiny"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails, as where it is not installed
    assert "pip install wandb" in one_line_exit(base + ["--wandb_project", "mary"])
    monkeypatch.delitem(sys.modules, "wandb")
    # A corrupt image is found by a loader worker mid-run: its error reaches the user as one line, not the
    # worker's traceback.
    records = json.load(open(data[0]))
    open(os.path.join(data[1], records[0]["image"]), "wb").write(b"not a png")
    worker = common_args(data, tmp_path / "o4", "--preset", "tiny", "--max_steps", "4", "--batch_size", "4",
                         "--save_steps", "0")
    worker[worker.index("--num_workers") + 1] = "1"
    assert "cannot decode image" in one_line_exit(worker)


def test_more_ranks_than_gpus_is_one_line_not_a_cuda_error(monkeypatch):
    """torchrun --nproc_per_node 2 on a machine with one GPU: rank 1 would ask for cuda:1 ("invalid device ordinal",
    seen on a one-GPU machine); it stops first, naming the fix."""
    from distributed import setup_runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail(f"asked for cuda:{index}"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit, match=r"process 1 of 2 on this machine has no GPU of its own: 1 CUDA device\(s\) "
                                         r"visible.*--device cpu"):
        setup_runtime()


def test_the_log_gives_the_lr_schedule_of_lr_and_of_each_module_with_its_own(toy_tokenizer):
    """"lr" is --lr's schedule even when another module's group comes first in the optimizer (it logged the
    projector's rate as the LLM's before)."""
    from model_setup import build_optimizer, build_scheduler, set_trainable
    from training import learning_rates

    model = tiny_vlm(toy_tokenizer)
    set_trainable(model, vision=False, projector=True, llm=True)
    settings = sft_settings("--lr", "1e-4", "--projector_lr", "1e-3", "--warmup_steps", "4",
                            "--lr_scheduler_type", "constant_with_warmup").optimizer
    optimizer = build_optimizer(model, settings)
    assert optimizer.param_groups[0]["name"] == "projector"
    scheduler = build_scheduler(optimizer, settings, total_steps=10)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert learning_rates(optimizer, scheduler, settings.lr) == pytest.approx({"lr": 5e-5, "lr_projector": 5e-4})
    settings = replace(settings, projector_lr=None)
    same = build_optimizer(model, settings)
    assert learning_rates(same, build_scheduler(same, settings, total_steps=10), settings.lr) == {"lr": 0.0}


def test_each_module_gets_its_own_learning_rate(toy_tokenizer):
    from model_setup import build_optimizer, set_trainable

    model = tiny_vlm(toy_tokenizer)
    set_trainable(model, vision=True, projector=True, llm=True)
    settings = sft_settings("--lr", "1e-5", "--projector_lr", "1e-3", "--weight_decay", "0.1").optimizer
    groups = {g["name"]: g for g in build_optimizer(model, settings).param_groups}
    assert groups["projector"]["lr"] == 1e-3 and groups["llm"]["lr"] == groups["vision"]["lr"] == 1e-5
    assert groups["llm"]["weight_decay"] == 0.1 and groups["llm_no_decay"]["weight_decay"] == 0.0
    grouped = sum(len(g["params"]) for g in groups.values())
    assert grouped == sum(1 for p in model.parameters() if p.requires_grad)
    set_trainable(model, vision=False, projector=True, llm=False)
    assert {g["name"] for g in build_optimizer(model, settings).param_groups} == {"projector", "projector_no_decay"}


def test_frozen_lower_llm_layers_get_no_gradient_and_the_projector_still_does(toy_tokenizer):
    from model_setup import build_optimizer, set_trainable, transformer_blocks

    model = tiny_vlm(toy_tokenizer).train()
    settings = sft_settings("--llm_frozen_layers", "1")
    run = settings.run
    set_trainable(model, run.train_vision, run.train_projector, run.train_llm, run.llm_frozen_layers)
    blocks = transformer_blocks(model, model.language_model)
    frozen = [model.language_model.get_input_embeddings(), blocks[0]]
    assert not any(p.requires_grad for module in frozen for p in module.parameters())
    assert all(p.requires_grad for block in blocks[1:] for p in block.parameters())
    input_ids = torch.tensor([[model.config.image_token_id] * model.config.num_image_tokens + [5, 6, 7]])
    labels = input_ids.clone()
    labels[:, :-2] = -100
    pixels = torch.randn(1, 3, model.config.input_size, model.config.input_size)
    model(input_ids=input_ids, pixel_values=pixels, labels=labels).loss.backward()
    assert all(p.grad is None for module in frozen for p in module.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    trained = {id(p) for group in build_optimizer(model, settings.optimizer).param_groups for p in group["params"]}
    assert not trained & {id(p) for module in frozen for p in module.parameters()}
    with pytest.raises(SystemExit, match=f"--llm_frozen_layers {len(blocks) + 1}: the LLM has {len(blocks)} blocks"):
        set_trainable(model, False, True, True, len(blocks) + 1)
    for flag, value in (("--llm_frozen_layers", "-1"), ("--projector_output_norm", "inf"),
                        ("--projector_output_norm", "0")):
        with pytest.raises(SystemExit):  # argparse's one line, exit 2
            sft_settings(flag, value)


class WorkerPids(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return os.getpid()


def test_loader_workers_live_across_epochs():
    """A worker forked again at each epoch shares the trained process copy-on-write: on CPU the run's memory doubled
    from epoch 2 on (9 -> 16.5 GB for SmolLM2-135M), and the step waiting for the fork stalled."""
    from distributed import Runtime
    from sampler import BatchStream, ResumableSampler, build_loader

    dataset = WorkerPids()
    sampler = ResumableSampler(dataset, Runtime(), seed=0)
    loader = build_loader(dataset, sampler, torch.tensor, batch_size=4, num_workers=1, seed=0, runtime=Runtime())
    stream = BatchStream(loader, sampler, batch_size=4)
    pids = {int(pid) for _ in range(6) for pid in stream.next()}  # three epochs of two batches
    assert stream.epoch == 2 and len(pids) == 1 and pids != {os.getpid()}


def test_peak_memory_is_logged_in_gigabytes():
    """log.jsonl's peak_memory_gb on a CPU: once a fresh process holds more than ever before (3 GiB of tensor, past the
    1.6 GB that importing everything can peak at), its peak is what it holds now (the kernel's resident-page count,
    read from /proc)."""
    script = ("import os, torch; from training import peak_memory_gb; block = torch.ones(3 * 2**28); resident = "
              "int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**30; "
              "print(resident, peak_memory_gb(torch.device('cpu')))")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    resident, peak = map(float, run.stdout.split())
    assert resident > 3 and abs(peak - resident) < 0.05, (resident, peak)


# ---------------------------------------------------------------- checkpoints and resume
@pytest.mark.parametrize("extra", [[], ["--lora", "--lora_dropout", "0.1"]], ids=["full", "lora-dropout"])
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, data, extra):
    """With dropout on, the resumed run must also draw the same dropout masks: nothing may consume the global RNG
    between restoring it and the next step (a DataLoader without its own generator does, when it starts)."""
    args = ["--preset", "tiny", "--max_steps", "40", "--save_steps", "4", "--batch_size", "4",
            "--save_total_limit", "3", *extra]
    script = [sys.executable, os.path.join(ROOT, "sft_train.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*script, *common_args(data, tmp_path / "whole", *args)], env=env, check=True,
                   capture_output=True, timeout=TIMEOUT)

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen([*script, *common_args(data, killed_dir, *args)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + TIMEOUT
    while not (killed_dir / "checkpoint-8").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "model.safetensors").exists(), "the run finished before it could be killed"
    resumed_from = int(os.path.basename(list_checkpoints(str(killed_dir))[-1]).split("-")[1])
    assert 8 <= resumed_from < 40

    resumed = subprocess.run([*script, *common_args(data, killed_dir, *args), "--resume"], env=env,
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed_dir}/checkpoint-{resumed_from}" in resumed.stdout
    whole, again = read_log(tmp_path / "whole"), read_log(killed_dir)
    for step in range(resumed_from + 1, 41):
        assert again[step]["loss"] == whole[step]["loss"], step
    a, b = final_weights(tmp_path / "whole"), final_weights(killed_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list_checkpoints(str(killed_dir))) == 3


def test_resume_reuses_the_start_up_scan_of_the_same_data(tmp_path, data, monkeypatch):
    from data import ConversationDataset

    checked = []
    check = ConversationDataset.check
    monkeypatch.setattr(ConversationDataset, "check", lambda self, *a: checked.append(a) or check(self, *a))
    args = common_args(data, tmp_path / "run", "--preset", "tiny", "--max_steps", "2", "--save_steps", "1",
                       "--batch_size", "4")
    sft_train.main(args)
    assert len(checked) == 16
    checked.clear()
    sft_train.main(args + ["--resume"])  # nothing left to train, but it starts up: from the kept scan
    assert checked == []
    records = json.load(open(data[0]))
    with open(data[0], "w") as f:  # changed data is scanned again
        json.dump(records[:12], f)
    sft_train.main(args)
    assert len(checked) == 12


@pytest.mark.parametrize("skip", [True, False])
def test_an_over_long_sample_found_mid_run(tmp_path, data, skip, capsys):
    """The start-up scan only estimates lengths; a sample that turns out too long when its batch encodes it is
    skipped with --skip_bad_samples (the run goes on, its batch one sample short), else it stops the run in one
    line naming it."""
    records = json.load(open(data[0]))
    records[9]["conversations"][1]["value"] = " and".join(["a red circle"] * 200)
    with open(data[0], "w") as f:
        json.dump(records, f)
    args = common_args(data, tmp_path / "run", "--preset", "tiny", "--max_steps", "4", "--save_steps", "0",
                       "--batch_size", "4", "--max_length", "400", *(["--skip_bad_samples"] if skip else []))
    if skip:
        sft_train.main(args)
        assert "skipping a bad sample" in capsys.readouterr().err
        assert len(read_log(tmp_path / "run")) == 4 and (tmp_path / "run" / "model.safetensors").exists()
    else:
        with pytest.raises(SystemExit, match=r"sample 9 \(id=s9\): \d+ tokens .* exceed max_length 400"):
            sft_train.main(args)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_found_in_a_loader_worker_is_raised_as_it_was(tmp_path, workers):
    """An image that exists but does not decode fails only when its batch is built, in a loader worker: the main
    process raises the sample's own DataError (file, sample, image), never the worker's traceback as text."""
    path, image_dir = write_llava_json(str(tmp_path / "data"), 4)
    with open(os.path.join(image_dir, "2.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    settings = sft_settings(*common_args((path, image_dir), tmp_path / "out", "--preset", "tiny", "--max_steps", "2",
                                         "--batch_size", "4", "--num_workers", str(workers)))
    with pytest.raises(DataError) as error:
        run_stage(settings)
    assert str(error.value).startswith(f"{path}: sample 2 (id=s2): cannot decode image 2.png"), str(error.value)
    assert "Traceback" not in str(error.value)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_missing_image_is_named_on_the_command_line(tmp_path, workers):
    """The start-up scan's report names the file, the sample and the image, through the stage script's own exit
    (it once printed only the report's last line: 'Fix the data, or pass --skip_bad_samples ...')."""
    path, image_dir = write_llava_json(str(tmp_path / "data"), 4)
    records = json.load(open(path))
    records[2]["image"] = "does_not_exist_1234.png"
    with open(path, "w") as f:
        json.dump(records, f)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sft_train.py"),
                             *common_args((path, image_dir), tmp_path / "out", "--preset", "tiny", "--max_steps", "1",
                                          "--num_workers", workers)],
                            capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{path}: sample 2 (id=s2): image not found: " in result.stderr
    assert "does_not_exist_1234.png" in result.stderr


def test_a_run_whose_every_sample_fails_stops_in_one_line(tmp_path, data):
    """With --skip_bad_samples, batches of skipped samples are passed over; when a whole epoch has none left the
    run must stop and say why, not pass over empty batches forever."""
    args = common_args(data, tmp_path / "run", "--preset", "tiny", "--max_steps", "2", "--save_steps", "0",
                       "--batch_size", "4", "--max_length", "20", "--skip_bad_samples")
    with pytest.raises(SystemExit, match="not one usable sample in a whole epoch"):
        sft_train.main(args)


def test_partial_checkpoint_is_ignored_and_mismatched_resume_refused(tmp_path, data):
    out = tmp_path / "run"
    args = common_args(data, out, "--preset", "tiny", "--max_steps", "2", "--save_steps", "1", "--batch_size", "4")
    sft_train.main(args)
    (out / "checkpoint-99.tmp").mkdir()  # what a crash during a save leaves behind
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-1", "checkpoint-2"]
    with pytest.raises(ValueError, match="does not match the trainable parameters"):
        sft_train.main(args + ["--resume", "--max_steps", "3", "--no-train_llm"])
    with pytest.raises(ValueError, match="cannot resume exactly"):
        sft_train.main(args + ["--resume", "--max_steps", "3", "--batch_size", "2"])
    # The data order (seed, length grouping) or the schedule (its length) would differ: refused, naming the change.
    for changed, named in ((["--seed", "7"], "seed 42 -> 7"), (["--group_by_length"], "group_by_length False -> True"),
                           (["--max_steps", "3"], "total_steps 2 -> 3"), (["--max_steps", "-1", "--num_epochs", "2"],
                                                                          "total_steps 2 -> 8")):
        with pytest.raises(ValueError, match=named):
            sft_train.main(args + ["--resume", *changed])
    sft_train.main(args + ["--resume"])  # the same settings resume (here: nothing left to do)


class NaNAtStep2(LanguageModelingObjective):
    calls = 0

    def __call__(self, model, batch):
        NaNAtStep2.calls += 1
        loss_sum, metrics = super().__call__(model, batch)
        return (loss_sum * float("nan") if NaNAtStep2.calls == 2 else loss_sum), metrics


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data):
    out = tmp_path / "run"
    settings = sft_settings(*common_args(data, out, "--preset", "tiny", "--max_steps", "4", "--save_steps", "1",
                                         "--batch_size", "4"))
    with pytest.raises(FloatingPointError, match="step 2: loss nan"):
        run_stage(settings, objective=NaNAtStep2())
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-1"]
    assert not (out / "model.safetensors").exists()


# ---------------------------------------------------------------- what trains
def changed(before: dict, after: dict, prefix: str) -> list[bool]:
    return [not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)]


def test_frozen_modules_stay_bit_identical_and_trained_ones_change(tmp_path, data, toy_tokenizer):
    start = tmp_path / "start"
    tiny_vlm(toy_tokenizer).save_pretrained(start)
    before = final_weights(start)
    steps = ["--max_steps", "3", "--save_steps", "0", "--batch_size", "4"]

    pretrain_train.main(common_args(data, tmp_path / "pre", "--model_path", str(start), *steps, *CHAT_STAGE_1))
    after = final_weights(tmp_path / "pre")
    assert not any(changed(before, after, "vision_model.")) and not any(changed(before, after, "language_model."))
    assert all(changed(before, after, "projector."))

    sft_train.main(common_args(data, tmp_path / "sft", "--model_path", str(tmp_path / "pre"), *steps))
    final = final_weights(tmp_path / "sft")
    assert not any(changed(after, final, "vision_model."))
    assert all(changed(after, final, "projector."))
    assert sum(changed(after, final, "language_model.")) >= 0.9 * len(changed(after, final, "language_model."))

    model = VLM.from_pretrained(str(tmp_path / "sft"))
    assert isinstance(model.chat(os.path.join(data[1], "0.png"), "What colour is the square?", max_new_tokens=3),
                      str)


def test_architecture_flags_build_stage_one_and_a_checkpoint_keeps_them(tmp_path, data, toy_tokenizer):
    """--projector_input_norm and --vision_feature_layer shape a new model, train with it, and are saved; a later
    stage given them for a checkpoint is told, in one line, that the checkpoint keeps its own."""
    flags = saved_start(tiny_vlm(toy_tokenizer), tmp_path, "components")
    pretrain_train.main(common_args(data, tmp_path / "pre", *flags, "--max_steps", "2", "--save_steps", "0",
                                    "--projector_input_norm", "layernorm", "--vision_feature_layer", "-2",
                                    "--projector_output_norm", "embedding", *CHAT_STAGE_1))
    config = json.load(open(tmp_path / "pre" / "config.json"))
    assert (config["projector_input_norm"], config["vision_feature_layer"]) == ("layernorm", -2)
    embedding_norm = tiny_vlm(toy_tokenizer).language_model.get_input_embeddings().weight.norm(dim=-1).mean()
    assert config["projector_output_norm"] == pytest.approx(embedding_norm.item(), rel=1e-3)
    assert not torch.equal(final_weights(tmp_path / "pre")["projector.norm.weight"],
                           torch.ones(tiny_vlm(toy_tokenizer).config.vision_config.hidden_size))
    with pytest.raises(SystemExit, match=r"--vision_feature_layer: set when a model is built \(stage 1\); "):
        sft_train.main(common_args(data, tmp_path / "sft", "--model_path", str(tmp_path / "pre"),
                                   "--vision_feature_layer", "-1"))
    with pytest.raises(SystemExit, match=r"--projector_output_norm: set when a model is built"):
        sft_train.main(common_args(data, tmp_path / "sft", "--model_path", str(tmp_path / "pre"),
                                   "--projector_output_norm", "20"))


def test_stage_one_fits_the_whitening_once_with_or_without_the_cache_and_later_stages_keep_it(tmp_path, data,
                                                                                                  toy_tokenizer):
    flags = [*saved_start(tiny_vlm(toy_tokenizer), tmp_path, "components"), "--max_steps", "1", "--save_steps", "0",
             "--projector_input_norm", "whiten", *CHAT_STAGE_1]
    pretrain_train.main(common_args(data, tmp_path / "online", *flags))
    pretrain_train.main(common_args(data, tmp_path / "cached", *flags, "--cache_vision_features",
                                    str(tmp_path / "cache")))
    online, cached = final_weights(tmp_path / "online"), final_weights(tmp_path / "cached")
    size = tiny_vlm(toy_tokenizer).config.vision_config.hidden_size
    assert online["projector.norm.mean"].abs().max() > 1e-3  # fitted, not the zero start
    assert not torch.allclose(online["projector.norm.matrix"], torch.eye(size))
    for key in ("projector.norm.mean", "projector.norm.matrix"):  # the cache keeps features in fp16
        torch.testing.assert_close(cached[key], online[key], rtol=2e-2, atol=2e-2)
    sft_train.main(common_args(data, tmp_path / "sft", "--model_path", str(tmp_path / "online"), "--max_steps", "1",
                               "--save_steps", "0"))
    after = final_weights(tmp_path / "sft")
    for key in ("projector.norm.mean", "projector.norm.matrix"):  # a buffer: no optimizer step or refit moves it
        assert torch.equal(after[key], online[key]), key


# ---------------------------------------------------------------- command lines
def test_check_data_reports_and_fails_on_bad_samples(tmp_path, data, capsys):
    records = json.load(open(data[0]))
    records[2]["image"] = "nowhere.png"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    with pytest.raises(SystemExit) as exit_info:
        sft_train.main(common_args((str(bad), data[1]), tmp_path / "check", "--preset", "tiny", "--check_data"))
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "bad.json: sample 2 (id=s2): image not found" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["samples"], summary["ok"], summary["bad"]) == (16, 15, 1)
    assert not (tmp_path / "check" / "model.safetensors").exists()


@pytest.mark.parametrize("source", ["checkpoint", "components"])
def test_check_data_loads_no_weights(tmp_path, toy_tokenizer, data, capsys, source):
    """--check_data needs the tokenizer, the image processor and the geometry, never the weights: here there are
    none to load (the weight files are deleted), and it still checks every sample with the true token counts."""
    model = tiny_vlm(toy_tokenizer)
    # Components: the LLM's own tokenizer lacks the image token, so the skeleton's embeddings grow without values.
    flags = saved_start(model, tmp_path, source, make_tokenizer(CORPUS * 4, vocab_size=300,
                                                                 image_token="<|vision_pad|>"))
    for weights in tmp_path.glob("*/model.safetensors"):
        weights.unlink()
    sft_train.main(common_args(data, tmp_path / "check", "--check_data", *flags))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["samples"], summary["ok"], summary["bad"]) == (16, 16, 0)
    processor = VLMProcessor.from_model(model)
    records = json.load(open(data[0]))
    longest = max(len(processor.encode_chat(parse_record(r, "").messages)["input_ids"]) for r in records)
    assert summary["tokens_max"] == longest


@pytest.mark.parametrize("script", ["pretrain_train.py", "sft_train.py"])
def test_help_works_without_loading_torch(script):
    result = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, script), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--grad_accum" in result.stdout and "--check_data" in result.stdout
    assert " torch" not in result.stderr and "transformers" not in result.stderr


def test_dpo_help_lists_only_flags_dpo_accepts(capsys):
    """Packing and cached vision features do not fit preference pairs: DPO neither lists nor takes them."""
    import dpo_train

    for main, takes in ((sft_train.main, True), (dpo_train.main, False)):
        with pytest.raises(SystemExit):
            main(["--help"])
        listed = capsys.readouterr().out
        for flag in ("--packing", "--cache_vision_features"):
            assert (flag in listed) == takes, (main, flag)
    with pytest.raises(SystemExit):
        dpo_train.parse_args(["--model_path", "m", "--data_path", "d", "--output_dir", "o", "--packing"])
    assert "unrecognized arguments: --packing" in capsys.readouterr().err


def test_every_flag_of_every_stage_lands_in_one_typed_settings_group(monkeypatch):
    """Each argument group of a stage's parser is one settings dataclass, and together they take every parsed value
    and nothing else: no flag travels outside the typed settings, and no field is filled by a hidden default."""
    import dataclasses

    import dpo_train
    import settings as settings_module

    captured = []
    for module in (pretrain_train, sft_train):
        monkeypatch.setattr(module, "run_stage_from_args", captured.append)
        module.main(["--data_path", "d", "--output_dir", "o"])
    captured.append(dpo_train.parse_args(["--model_path", "m", "--data_path", "d", "--output_dir", "o"]))
    classes = [*settings_module.GROUPS.values(), dpo_train.DPOSettings]
    for module, stage in zip((pretrain_train, sft_train, dpo_train), captured):
        for group in module.build_parser()._action_groups:
            dests = {action.dest for action in group._group_actions} - {"help"}
            if dests:
                assert any(dests <= {f.name for f in dataclasses.fields(c)} for c in classes), group.title
        for field in dataclasses.fields(stage):
            value = getattr(stage, field.name)
            assert value is None or dataclasses.is_dataclass(value), field.name
    assert captured[0].data.prompt_format == "plain" and captured[1].data.prompt_format == "chat"
    assert captured[2].model.merge_loaded_adapters and not captured[1].model.merge_loaded_adapters
    assert captured[2].stage.beta == 0.1 and captured[1].stage is None
    args = sft_train.stage_parser("t").parse_args(["--data_path", "d", "--output_dir", "o"])
    args.unknown_setting = 1
    with pytest.raises(TypeError, match="settings that fit no group: \\['unknown_setting'\\]"):
        StageSettings.from_args(args, merge_loaded_adapters=False)
    with pytest.raises(KeyError, match="merge_loaded_adapters"):  # a field nobody fills is an error too
        StageSettings.from_args(sft_train.stage_parser("t").parse_args(["--data_path", "d", "--output_dir", "o"]))


@pytest.mark.parametrize("launcher", ["pretrain.sh", "sft.sh", "sft_lora.sh", "sft_fsdp.sh", "dpo.sh"])
def test_launchers_pass_flags_their_stage_accepts(tmp_path, launcher, monkeypatch):
    """Each torchrun launcher, run with a stand-in torchrun that records its command line: the stage script's own
    parser accepts every flag (a typo in a launcher would otherwise surface on the GPU machine)."""
    import dpo_train

    record = tmp_path / "argv.json"
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", os.path.join(ROOT, "scripts", launcher), "--seed", "7"], env=env, check=True, timeout=60)
    argv = json.load(open(record))
    script = next(i for i, word in enumerate(argv) if word.endswith("_train.py"))
    stage, flags = argv[script], argv[script + 1:]
    assert argv[:script] == ["--standalone", "--nproc_per_node", "4"] and flags[-2:] == ["--seed", "7"]
    if stage == "dpo_train.py":
        settings = dpo_train.parse_args(flags)
    else:
        captured = []
        module = {"pretrain_train.py": pretrain_train, "sft_train.py": sft_train}[stage]
        monkeypatch.setattr(module, "run_stage_from_args", captured.append)
        module.main(flags)
        settings = captured[0]
    assert settings.run.seed == 7 and settings.run.output_dir.startswith("checkpoints/")
    assert settings.lora.lora == (launcher == "sft_lora.sh") and settings.run.fsdp == (launcher == "sft_fsdp.sh")


def test_fsdp2_with_gloo_equals_ddp_and_its_checkpoints_resume_and_load(tmp_path):
    """FSDP2 on 2 CPU processes: the same losses, gradient norms and final weights as DDP on the same global batch,
    exact resume from its gathered checkpoint, and a final folder that VLM.from_pretrained opens."""
    data = write_llava_json(str(tmp_path / "data"), 16, text_only=text_only_for_rank_one_first())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = ["--preset", "tiny", "--max_steps", "4", "--save_steps", "2", "--batch_size", "2", "--grad_accum", "2",
             "--train_vision", *CPU_EXACT]

    def torchrun(out, *extra):
        result = subprocess.run([*TORCHRUN_2,
                                 os.path.join(ROOT, "sft_train.py"), *common_args(data, out, *steps), *extra],
                                env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    torchrun(tmp_path / "ddp")
    torchrun(tmp_path / "fsdp", "--fsdp")
    assert_same_run(read_log(tmp_path / "ddp"), read_log(tmp_path / "fsdp"), [1, 2, 3, 4])
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    (tmp_path / "resumed").mkdir()
    os.rename(tmp_path / "fsdp" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    assert "resumed from" in torchrun(tmp_path / "resumed", "--fsdp", "--resume").stdout
    c = final_weights(tmp_path / "resumed")
    assert all(torch.equal(b[k], c[k]) for k in b)
    model = VLM.from_pretrained(str(tmp_path / "fsdp"))
    image = os.path.join(data[1], sorted(os.listdir(data[1]))[0])
    assert model.tokenizer is not None and isinstance(model.chat(image, "Hi?", max_new_tokens=2), str)


def test_two_ranks_share_the_feature_encoding(tmp_path, data, toy_tokenizer):
    """Under torchrun each rank encodes its share of the images into the one cache; the result equals a single
    process's cache."""
    import numpy as np

    start = tmp_path / "start"
    tiny_vlm(toy_tokenizer).save_pretrained(start)
    steps = ["--model_path", str(start), "--max_steps", "1", "--save_steps", "0", "--batch_size", "2", *CPU_EXACT,
             *CHAT_STAGE_1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([*TORCHRUN_2,
                          os.path.join(ROOT, "pretrain_train.py"),
                          *common_args(data, tmp_path / "two", *steps, "--cache_vision_features",
                                       str(tmp_path / "cache2"))],
                         env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert two.returncode == 0, two.stderr[-3000:]
    pretrain_train.main(common_args(data, tmp_path / "one", *steps, "--cache_vision_features",
                                    str(tmp_path / "cache1")))
    meta = json.load(open(tmp_path / "cache2" / "meta.json"))
    assert meta["images_per_rank"] == [7, 8]  # samples 0-7 (one text-only) and 8-15
    shared, alone = (np.load(tmp_path / name / "features.npy") for name in ("cache2", "cache1"))
    assert shared.shape == alone.shape and np.allclose(shared, alone, atol=1e-3)


def test_cached_vision_features_give_the_same_losses_and_are_reused(tmp_path, data, toy_tokenizer, capsys):
    start = tmp_path / "start"
    tiny_vlm(toy_tokenizer).save_pretrained(start)
    cache = tmp_path / "cache"
    steps = ["--model_path", str(start), "--max_steps", "4", "--save_steps", "0", "--batch_size", "4", *CHAT_STAGE_1]
    pretrain_train.main(common_args(data, tmp_path / "online", *steps))
    pretrain_train.main(common_args(data, tmp_path / "cached", *steps, "--cache_vision_features", str(cache)))
    online, cached = read_log(tmp_path / "online"), read_log(tmp_path / "cached")
    for step in range(1, 5):  # fp16 storage: equal within its precision
        assert cached[step]["loss"] == pytest.approx(online[step]["loss"], rel=2e-3), step
    assert (cache / "features.npy").exists() and json.load(open(cache / "meta.json"))["images"] == 15
    capsys.readouterr()
    pretrain_train.main(common_args(data, tmp_path / "again", *steps, "--cache_vision_features", str(cache)))
    assert "using the cached vision features" in capsys.readouterr().out
    assert read_log(tmp_path / "again")[4]["loss"] == cached[4]["loss"]
    with pytest.raises(ValueError, match="needs a frozen vision tower"):
        pretrain_train.main(common_args(data, tmp_path / "bad", *steps, "--train_vision",
                                        "--cache_vision_features", str(cache)))


# ---------------------------------------------------------------- held-out evaluation flags and the schedule
@pytest.mark.parametrize("name, text, message", [
    ("missing.jsonl", None, "missing.jsonl: data file not found"),
    ("broken.jsonl", '{"question": "q", "answer": "a"}\n{"question": ', "broken.jsonl:2: malformed JSON line"),
])
def test_a_bad_eval_file_stops_before_step_1_in_one_line_naming_it(tmp_path, data, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sft_train.py"),
                             *common_args(data, out, "--preset", "tiny", "--max_steps", "2", "--batch_size", "4",
                                          "--eval_data_path", str(path))],
                            capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in result.stderr, result.stderr
    assert not (out / "log.jsonl").exists()  # no step was taken


def test_warmup_stable_decay_holds_the_peak_then_decays(toy_tokenizer):
    from model_setup import build_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    settings = sft_settings("--warmup_steps", "2", "--warmup_ratio", "0.0", "--lr_scheduler_type",
                            "warmup_stable_decay", "--decay_ratio", "0.3").optimizer
    scheduler, lrs = build_scheduler(optimizer, settings, 10), []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == [0.0, 0.5, 1.0] and lrs[2:7] == [1.0] * 5  # warmup, then the peak held
    assert lrs[7] > lrs[8] > lrs[9] > 0  # the last 30% decay
