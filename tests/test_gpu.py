"""On a CUDA GPU (skipped elsewhere, so CI skips them): the three stages in bf16 autocast with the flags the real
recipe uses, the same run in fp32 on the GPU and the CPU agreeing, --compile with Triton, and every chat entry point,
the demo's session and eval_vlm.py with the model on the GPU.

    python -m pytest -q tests/test_gpu.py
"""

import os

import pytest
import torch
from conftest import CHAT_STAGE_1, tiny_vlm, write_llava_json
from test_dpo import pair_records
from test_training import common_args, read_log

import dpo_train
import eval_vlm
import pretrain_train
import sft_train
from conversation import ChatSession
from model import VLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def setup(tmp_path, toy_tokenizer):
    data = write_llava_json(str(tmp_path / "data"), 32, text_only={5})
    tiny_vlm(toy_tokenizer).save_pretrained(tmp_path / "start")
    return data, tmp_path


def stage_args(data, out, start, *extra):
    args = common_args(data, out, "--model_path", str(start), "--device", "cuda", "--batch_size", "4",
                       "--save_steps", "0", *extra)
    args[args.index("--dtype") + 1] = "auto"  # bf16 autocast on the GPU
    return args


def test_three_stages_and_every_chat_entry_point_on_the_gpu(setup, capsys):
    data, tmp_path = setup
    pretrain_train.main(stage_args(data, tmp_path / "pretrain", tmp_path / "start", "--max_steps", "4",
                                   "--cache_vision_features", str(tmp_path / "cache"), *CHAT_STAGE_1))
    sft_train.main(stage_args(data, tmp_path / "sft", tmp_path / "pretrain", "--max_steps", "4", "--packing",
                              "--gradient_checkpointing", "--group_by_length", "--lora", "--lora_dropout", "0.05"))
    assert "bf16 autocast" in capsys.readouterr().out
    pairs = pair_records(str(tmp_path / "pairs"))
    dpo_train.main(stage_args(pairs, tmp_path / "dpo", tmp_path / "sft", "--max_steps", "3", "--lora",
                              "--precompute_ref"))
    for stage in ("pretrain", "sft", "dpo"):
        log = read_log(tmp_path / stage)
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log.values()), stage
    assert read_log(tmp_path / "dpo")[1]["loss"] == pytest.approx(0.6931, abs=1e-3)

    model = VLM.from_pretrained(str(tmp_path / "dpo")).to("cuda", torch.bfloat16).eval()
    image = os.path.join(data[1], "0.png")
    assert isinstance(model.chat(image, "What colour is the square?", max_new_tokens=4), str)
    assert len(model.batch_chat([image, image], ["What colour?", "Where?"], max_new_tokens=4)) == 2
    assert isinstance("".join(model.stream_chat(image, "What colour?", max_new_tokens=4)), str)
    session = ChatSession(model, image)
    assert isinstance(session.ask("What colour?", max_new_tokens=4), str)
    assert isinstance(session.ask("And where?", max_new_tokens=4), str)

    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"image": "0.png", "question": "What colour?", "answer": "red"}\n')
    eval_vlm.main(["--model_path", str(tmp_path / "dpo"), "--data_path", str(questions), "--image_dir", data[1],
                   "--device", "cuda"])
    assert '"exact_match"' in capsys.readouterr().out.strip().splitlines()[-1]


def test_fp32_on_the_gpu_matches_the_cpu(setup):
    data, tmp_path = setup
    for device in ("cpu", "cuda"):
        args = stage_args(data, tmp_path / device, tmp_path / "start", "--max_steps", "3", "--train_vision")
        args[args.index("--dtype") + 1] = "fp32"
        args[args.index("--device") + 1] = device
        sft_train.main(args)
    cpu, gpu = read_log(tmp_path / "cpu"), read_log(tmp_path / "cuda")
    for step in (1, 2, 3):  # TF32 matmuls on the GPU
        assert gpu[step]["loss"] == pytest.approx(cpu[step]["loss"], rel=5e-3), step


def test_compiled_blocks_train_like_eager_on_the_gpu(setup):
    data, tmp_path = setup
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        sft_train.main(stage_args(data, tmp_path / name, tmp_path / "start", "--max_steps", "3", *extra))
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    for step in (1, 2, 3):
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], rel=2e-2), step


def test_tiled_stages_and_chat_on_the_gpu(setup):
    """--max_tiles 4 on the GPU in bf16 autocast: stage 1 on cached views, SFT with length groups, DPO whose pairs
    mix tiled and single-view images, then the chat entry points with a tiled image."""
    from test_tiles import picture

    data, tmp_path = setup
    for i, size in enumerate([(256, 64), (128, 128), (64, 200)]):  # 5 views each; the rest stay one view
        picture(*size, i).save(os.path.join(data[1], f"{i}.png"))
    tiled = ("--max_length", "1024")
    pretrain_train.main(stage_args(data, tmp_path / "pretrain", tmp_path / "start", "--max_steps", "3",
                                   "--max_tiles", "4", "--cache_vision_features", str(tmp_path / "cache"), *tiled,
                                   *CHAT_STAGE_1))
    sft_train.main(stage_args(data, tmp_path / "sft", tmp_path / "pretrain", "--max_steps", "3",
                              "--group_by_length", *tiled))
    pairs = pair_records(str(tmp_path / "pairs"))
    picture(256, 64).save(os.path.join(pairs[1], "0.png"))
    dpo_train.main(stage_args(pairs, tmp_path / "dpo", tmp_path / "sft", "--max_steps", "2", *tiled))
    for stage in ("pretrain", "sft", "dpo"):
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_log(tmp_path / stage).values()), stage

    model = VLM.from_pretrained(str(tmp_path / "dpo")).to("cuda", torch.bfloat16).eval()
    assert model.config.max_tiles == 4  # stage 1's setting travelled through both later checkpoints
    image = os.path.join(data[1], "0.png")
    assert isinstance(model.chat(image, "What colour is the square?", max_new_tokens=4), str)
    assert len(model.batch_chat([image, os.path.join(data[1], "6.png")], ["What colour?", "Where?"],
                                max_new_tokens=4)) == 2
    assert isinstance(ChatSession(model, image).ask("What colour?", max_new_tokens=4), str)
