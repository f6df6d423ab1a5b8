"""LoRA in every stage: only adapters (and the projector) change, resume restores all of them, the checkpoint
loads with VLM.from_pretrained, merging keeps the logits, DPO's adapter-free reference equals a frozen copy, and
k-bit loading without a GPU stops with a clear message."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import CHAT_STAGE_1, ROOT, saved_start, tiny_vlm, write_llava_json
from safetensors.torch import load_file
from test_dpo import pair_records

import dpo_train
import pretrain_train
import sft_train
from dpo_train import DPOObjective, collate_pairs, sequence_logps
from lora import adapter_parameters, adapter_targets, add_adapters, merge_adapters
from model import VLM

LORA = ["--lora", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0"]


def args_for(data, start, out, *extra):
    path, image_dir = data
    return ["--model_path", str(start), "--data_path", path, "--image_dir", image_dir, "--output_dir", str(out),
            "--num_workers", "0", "--logging_steps", "1", "--dtype", "fp32", "--batch_size", "4", "--lr", "1e-2",
            "--warmup_steps", "0", *LORA, *extra]


@pytest.fixture
def start(tmp_path, toy_tokenizer):
    folder = tmp_path / "start"
    tiny_vlm(toy_tokenizer).save_pretrained(folder)
    return folder


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def base_name(name):
    """The plain checkpoint's name of a LoRA-wrapped base weight."""
    return name.replace(".base_layer.", ".")


def assert_only_adapters_and_projector_changed(before, after, projector_trained=True):
    adapters = [k for k in after if ".lora_" in k]
    assert adapters and all(not torch.equal(after[k], torch.zeros_like(after[k])) for k in adapters if "lora_B" in k)
    for name, tensor in after.items():
        if ".lora_" in name:
            continue
        original = before[base_name(name)]
        if name.startswith("projector.") and projector_trained:
            assert not torch.equal(tensor, original), name
        else:
            assert torch.equal(tensor, original), name


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_lora_train_resume_load_and_merge(tmp_path, start, stage, capsys):
    if stage == "dpo":
        data, main = pair_records(str(tmp_path / "data")), dpo_train.main
        extra = ["--precompute_ref", "--train_projector"]
    else:
        data = write_llava_json(str(tmp_path / "data"), 12)
        main = pretrain_train.main if stage == "pretrain" else sft_train.main
        extra = ["--train_llm", *(CHAT_STAGE_1 if stage == "pretrain" else [])]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    main(args_for(data, start, whole, "--max_steps", "6", "--save_steps", "3", "--save_total_limit", "2", *extra))
    printed = capsys.readouterr().out
    model = VLM.from_pretrained(str(whole))
    adapters = sum(p.numel() for p in adapter_parameters(model).values())
    assert adapters == sum(4 * (m.in_features + m.out_features) for name, m in model.named_modules()
                           if name.endswith(".base_layer"))  # rank 4: r x (in + out) per adapted layer
    projector = sum(p.numel() for p in model.projector.parameters())
    assert f"projector 0.03M ({projector:,} trained), llm 0.87M ({adapters:,} trained)" in printed
    assert "vision 0.43M (frozen)" in printed
    assert_only_adapters_and_projector_changed(weights(start), weights(whole))

    # Resume from the middle checkpoint: adapters, projector, optimizer and data position all come back.
    os.makedirs(resumed)
    shutil.copytree(whole / "checkpoint-3", resumed / "checkpoint-3")
    main(args_for(data, start, resumed, "--max_steps", "6", "--save_steps", "3", "--resume", *extra))
    a, b = weights(whole), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The LoRA checkpoint loads as it is, and merges into a plain one with the same logits.
    merged = tmp_path / "merged"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "merge_lora.py"), "--model_path", str(whole),
                    "--output_dir", str(merged)], check=True, capture_output=True)
    plain = VLM.from_pretrained(str(merged)).eval()
    assert plain.config.lora is None and not any(".lora_" in k for k in weights(merged))
    ids = torch.tensor([[1, 5, 9, 12, 30, 2]])
    with torch.no_grad():
        assert torch.allclose(model.eval()(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)


def test_dpo_reference_without_adapters_equals_a_frozen_copy(tmp_path, start):
    path, image_dir = pair_records(str(tmp_path / "data"), 4)
    settings = dpo_train.parse_args(args_for((path, image_dir), start, tmp_path / "out"))
    model = VLM.from_pretrained(str(start))
    add_adapters(model, 4, 8, 0.0)
    from model_setup import set_trainable

    set_trainable(model, vision=False, projector=settings.run.train_projector, llm=True)
    # LoRA DPO keeps the projector: the adapter-free model is the reference.
    assert settings.run.train_projector is False
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    objective = DPOObjective.from_settings(settings)
    from data import ConversationDataset, parse_preference_record
    from processor import VLMProcessor

    dataset = ConversationDataset([path], VLMProcessor.from_model(model), image_dir, parse=parse_preference_record)
    objective.prepare(model, dataset, None, None, None)
    assert objective.reference is model  # no second copy
    batch = collate_pairs([dataset[i] for i in range(4)], model.tokenizer.pad_token_id)
    model.train()
    with torch.no_grad(), objective.reference_mode():
        without_adapters = sequence_logps(model, batch)[0]
    assert model.training
    frozen_copy = VLM.from_pretrained(str(start)).eval()
    with torch.no_grad():
        reference = sequence_logps(frozen_copy, batch)[0]
        with_adapters = sequence_logps(model.eval(), batch)[0]
    assert torch.allclose(without_adapters, reference, atol=1e-5)
    assert not torch.allclose(with_adapters, reference, atol=1e-3)

    model.projector.requires_grad_(True)
    with pytest.raises(ValueError, match="only adapters may train"):
        objective.prepare(model, dataset, None, None, None)


def test_kbit_with_a_preset_stops_before_any_work(tmp_path, start):
    data = write_llava_json(str(tmp_path / "data"), 4)
    out = tmp_path / "out"
    args = args_for(data, start, out, "--load_in_4bit", "--max_steps", "1")
    args[args.index("--model_path"):args.index("--model_path") + 2] = ["--preset", "tiny"]
    with pytest.raises(SystemExit, match="would train unquantized"):
        sft_train.main(args)
    assert not out.exists()


@pytest.mark.parametrize("bits, source", [("--load_in_4bit", "components"), ("--load_in_8bit", "components"),
                                          ("--load_in_4bit", "checkpoint")])
def test_qlora_checkpoint_reloads_and_merges_without_bitsandbytes_state(tmp_path, toy_tokenizer, bits, source):
    """QLoRA trains adapters over k-bit LLM weights (bitsandbytes, on the CPU here), from two components or from a
    VLM checkpoint (scripts/sft_lora.sh's way). The saved folder is a plain checkpoint: the k-bit weights
    dequantized to exactly what the layers computed with, so it reloads, gives the trained model's logits, and
    merges."""
    pytest.importorskip("bitsandbytes")
    start = saved_start(tiny_vlm(toy_tokenizer), tmp_path, source)
    path, image_dir = write_llava_json(str(tmp_path / "data"), 8)
    out = tmp_path / "qlora"
    trained = sft_train.main([*start, "--data_path", path, "--image_dir", image_dir, "--output_dir", str(out),
                              "--num_workers", "0", "--dtype", "fp32", "--batch_size", "4", "--max_steps", "2",
                              "--save_steps", "0", "--lr", "1e-2", *LORA, bits])
    assert type(trained.language_model.model.layers[0].mlp.up_proj.base_layer).__name__ in ("Linear4bit",
                                                                                            "Linear8bitLt")
    reloaded = VLM.from_pretrained(str(out)).eval()
    # No packed k-bit storage (absmax, quant_state, SCB, ...) left over; a tied LM head is saved once.
    assert set(weights(out)) == set(reloaded.state_dict()) - set(reloaded.all_tied_weights_keys)
    assert "quantization_config" not in json.dumps(reloaded.config.to_dict())
    ids = torch.tensor([[1, 5, 9, 12, 30, 2]])
    with torch.no_grad():
        logits = reloaded(input_ids=ids).logits
        # The k-bit layers compute in bf16 (4-bit) or on int8 activations (8-bit), the reloaded ones in fp32: the
        # logits agree to ~1% of their range (0.6% and 1.0% measured), where wrong weights would miss entirely.
        difference = (trained.eval()(input_ids=ids.to(trained.device)).logits.float().cpu() - logits).abs().max()
        assert difference < 0.03 * logits.abs().max()
        assert torch.allclose(merge_adapters(reloaded)(input_ids=ids).logits, logits, atol=1e-5)


def test_lora_targets_are_found_by_module_type_in_each_tower(toy_tokenizer):
    from transformers.pytorch_utils import Conv1D

    model = tiny_vlm(toy_tokenizer)
    targets = adapter_targets(model, ["llm", "vision"])
    linear = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    assert set(targets) == {n for n in linear if n.startswith(("language_model.model.", "vision_model."))}
    assert not any(t.startswith("projector") or t.endswith("lm_head") for t in targets)
    add_adapters(model, 4, 8, 0.0, towers=["llm", "vision"])
    adapters = adapter_parameters(model)
    assert any(n.startswith("vision_model.") for n in adapters) and any(n.startswith("language_model.") for n in adapters)
    from model_setup import set_trainable

    set_trainable(model, vision=True, projector=True, llm=True)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(adapters) | {n for n, _ in model.projector.named_parameters(prefix="projector")}


@pytest.mark.parametrize("mode", [["--lora"], ["--lora", "--precompute_ref"], [], ["--precompute_ref"]],
                         ids=["adapters-off", "lora-precomputed", "frozen-copy", "precomputed"])
def test_dpo_from_a_lora_sft_checkpoint_starts_at_its_reference(tmp_path, toy_tokenizer, mode):
    """The reference is the SFT model, adapters included: at step 1 every pair ties (loss ln 2, rewards 0)."""
    sft = tmp_path / "sft_lora"
    model = add_adapters(tiny_vlm(toy_tokenizer), 4, 8, 0.05)
    with torch.no_grad():  # adapters that SFT trained: they change the log-probs
        for p in adapter_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(sft)
    path, image_dir = pair_records(str(tmp_path / "data"))
    out = tmp_path / "dpo"
    dpo_train.main(["--model_path", str(sft), "--data_path", path, "--image_dir", image_dir, "--output_dir", str(out),
                    "--num_workers", "0", "--logging_steps", "1", "--dtype", "fp32", "--batch_size", "8",
                    "--max_steps", "1", "--save_steps", "0", "--lora_r", "4", "--lora_alpha", "8", *mode])
    from test_dpo import read_log

    first = read_log(out)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    final = VLM.from_pretrained(str(out))
    assert (final.config.lora is not None) == ("--lora" in mode)  # fresh adapters only when DPO trains LoRA
