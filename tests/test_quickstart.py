"""The offline main job end to end on a few dozen samples: the same commands as `bash scripts/quickstart.sh`."""

import json
import math
import os
import subprocess
import sys

import torch
from conftest import ROOT

from model import VLM
from scripts import quickstart, sample_grid


def read_losses(path):
    with open(path) as f:
        return [record["loss"] for record in map(json.loads, f) if "loss" in record]


def test_quickstart_pipeline_learns_and_writes_loadable_artefacts(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    small = ["--preset", "tiny", "--data_dir", data, "--num_samples", "48", "--num_eval", "6", "--pretrain_steps", "24",
             "--sft_steps", "24", "--dpo_steps", "12", "--num_dpo", "12", "--pretrain_batch_size", "8",
             "--sft_batch_size", "8",
             "--dpo_batch_size", "8", "--num_workers", "0",
             "--warmup_steps", "2", "--dpo_lr", "1e-3"]
    results = quickstart.main(small + ["--output_dir", out])

    assert set(results["stages"]) == {"pretrain", "sft", "dpo"}
    assert 0 <= results["stages"]["pretrain"]["object_recall"] <= 100  # stage 1 is scored on its captions
    for stage in ("pretrain", "sft"):
        losses = read_losses(os.path.join(out, stage, "log.jsonl"))
        assert len(losses) >= 10 and sum(losses[-3:]) < sum(losses[:3]), (stage, losses)
    row = results["stages"]["sft"]
    assert 0 <= row["exact_match"] <= 100 and {"em_colour", "em_count", "pope_f1", "yes_ratio"} <= set(row)
    assert set(results["seconds"]) >= {"generate", "pretrain", "sft", "dpo", "stages", "curve", "samples"}
    # The held-out evaluations ran inside the stages: curve points in each log, and the curve drawn from them.
    sft_log = [json.loads(line) for line in open(os.path.join(out, "sft", "log.jsonl"))]
    assert [r["step"] for r in sft_log if "eval/exact_match" in r] == [8, 16, 24]  # 24 steps, 3 curve points
    assert os.path.getsize(os.path.join(out, "curve.png")) > 0
    # The model shown: a grid of held-out scenes with each stage's answers, read from the stages' predictions.
    shown = sample_grid.pick_samples(sample_grid.read_predictions(out), 12)
    english = {r["image"] for r in map(json.loads, open(os.path.join(data, "eval.jsonl"))) if r["lang"] == "en"}
    assert {s["image"] for s in shown} == english and len(shown) == len(english)  # one question per English scene
    assert all(set(s["answers"]) == {"sft", "dpo"} and s["caption"] is not None for s in shown)
    assert os.path.getsize(os.path.join(out, "samples.png")) > 0
    # Stage 1 trained and saved in the plain format; SFT switched to the chat template.
    assert VLM.config_class.from_pretrained(os.path.join(out, "pretrain")).prompt_format == "plain"
    assert VLM.config_class.from_pretrained(os.path.join(out, "sft")).prompt_format == "chat"
    # DPO starts at its reference (loss ln 2) and moves the policy. (Whether it learns is test_dpo.py's: these pairs
    # are balanced, so in 12 steps a 1M-parameter model has nothing to learn but the images, which it cannot yet.)
    dpo_log = [json.loads(line) for line in open(os.path.join(out, "dpo", "log.jsonl"))]
    dpo_steps = [r for r in dpo_log if "loss" in r]
    assert abs(dpo_steps[0]["loss"] - math.log(2)) < 1e-4 and abs(dpo_steps[-1]["rewards/margin"]) > 0, dpo_log
    assert json.load(open(os.path.join(out, "results.json")))["stages"] == results["stages"]
    assert sum(1 for _ in open(os.path.join(out, "sft", "predictions.jsonl"))) == 6 * 5

    model = VLM.from_pretrained(os.path.join(out, "sft"))
    image = os.path.join(data, "images", json.loads(open(os.path.join(data, "eval.jsonl")).readline())["image"])
    assert isinstance(model.chat(image, "How many shapes are there?", max_new_tokens=4), str)

    # The same seed gives the same run: SFT again from the same pretrain checkpoint, same losses to the bit.
    again = os.path.join(str(tmp_path), "again")
    args = quickstart.parse_args(small + ["--output_dir", again])
    flags = quickstart.stage_flags(args, "sft")
    flags[flags.index("--model_path") + 1] = os.path.join(out, "pretrain")
    subprocess.run([sys.executable, os.path.join(ROOT, "sft_train.py"), *flags], check=True, capture_output=True,
                   cwd=ROOT)
    assert read_losses(os.path.join(again, "sft", "log.jsonl")) == read_losses(os.path.join(out, "sft", "log.jsonl"))


def test_pretrained_recipe_on_a_few_dozen_samples(tmp_path, real_parts):
    """The main job's default path on the real parts: stage 1 trains the projector alone (cached features), SFT the
    projector and the LLM; losses fall, every stage's checkpoint loads and answers."""
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    results = quickstart.main(["--parts_dir", os.path.dirname(real_parts["llm"]), "--data_dir", data,
                               "--output_dir", out, "--num_samples", "32", "--num_eval", "4", "--num_dpo", "4",
                               "--image_size", "112", "--pretrain_steps", "8", "--sft_steps", "8", "--dpo_steps",
                               "2", "--pretrain_lr", "1e-3", "--pretrain_batch_size", "8", "--sft_batch_size", "8",
                               "--dpo_batch_size", "8", "--warmup_steps", "1", "--num_workers", "0"])

    assert 0 <= results["stages"]["pretrain"]["object_recall"] <= 100
    assert set(results["stages"]["sft"]) >= {"exact_match", "em_colour", "pope_f1", "yes_ratio", "true_yes_ratio"}
    # SFT's loss falls within 8 steps. (Stage 1's, over 8 length-grouped batches of plain captions, swings with each
    # batch's English/Chinese share; that stage 1 learns is the tiny pipeline's test.)
    losses = read_losses(os.path.join(out, "sft", "log.jsonl"))
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    # DPO trained on pairs made from the SFT model's own wrong answers, the truth chosen.
    pairs = json.load(open(os.path.join(data, "dpo_onpolicy.json")))
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    pretrain = VLM.from_pretrained(os.path.join(out, "pretrain"))
    assert pretrain.config.num_image_tokens == 16  # 112 px / 14 = 8x8 patches, downsampled to 4x4
    # The recipe whitens the projector's input: fitted in stage 1 and carried, unchanged, through SFT and DPO.
    whitening = pretrain.projector.norm
    assert pretrain.config.projector_input_norm == "whiten"
    assert not torch.equal(whitening.matrix, torch.eye(whitening.matrix.shape[0]))
    for stage in ("sft", "dpo"):
        later = VLM.from_pretrained(os.path.join(out, stage)).projector.norm
        assert torch.equal(later.matrix, whitening.matrix) and torch.equal(later.mean, whitening.mean)
    image = os.path.join(data, "images", json.loads(open(os.path.join(data, "eval.jsonl")).readline())["image"])
    assert isinstance(pretrain.chat(image, "Describe the image.", max_new_tokens=8), str)  # plain: it captions
    from transformers import AutoModelForCausalLM

    part = AutoModelForCausalLM.from_pretrained(real_parts["llm"])
    layer = "model.layers.29.mlp.down_proj.weight"  # stage 1 froze the LLM: its weights are the part's
    assert torch.equal(pretrain.language_model.state_dict()[layer], part.state_dict()[layer])
    model = VLM.from_pretrained(os.path.join(out, "dpo"))
    assert model.chat(image, "How many shapes are there?", max_new_tokens=8).strip()
