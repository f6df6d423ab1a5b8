"""The offline main job end to end on a few dozen samples: the same commands as `bash scripts/quickstart.sh`."""

import json
import os
import subprocess
import sys

from conftest import ROOT

from model import VLM

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import quickstart  # noqa: E402


def read_losses(path):
    with open(path) as f:
        return [json.loads(line)["loss"] for line in f]


def test_quickstart_pipeline_learns_and_writes_loadable_artefacts(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    small = ["--data_dir", data, "--num_samples", "48", "--num_eval", "6", "--pretrain_steps", "24",
             "--sft_steps", "24", "--dpo_steps", "12", "--num_dpo", "12", "--batch_size", "8", "--num_workers", "0",
             "--warmup_steps", "2", "--dpo_lr", "1e-3"]
    results = quickstart.main(small + ["--output_dir", out])

    assert set(results["stages"]) == {"pretrain", "sft", "dpo"}
    for stage in ("pretrain", "sft"):
        row = results["stages"][stage]
        assert 0 <= row["exact_match"] <= 100 and {"em_colour", "em_count", "pope_f1", "yes_ratio"} <= set(row)
        losses = read_losses(os.path.join(out, stage, "log.jsonl"))
        assert len(losses) >= 10 and sum(losses[-3:]) < sum(losses[:3]), (stage, losses)
    assert set(results["seconds"]) >= {"generate", "pretrain", "eval_pretrain", "sft", "eval_sft", "dpo", "eval_dpo",
                                       "total"}
    dpo_log = [json.loads(line) for line in open(os.path.join(out, "dpo", "log.jsonl"))]
    first, last = [r["loss"] for r in dpo_log[:4]], [r["loss"] for r in dpo_log[-4:]]
    assert sum(last) < sum(first) and dpo_log[-1]["rewards/accuracy"] > 0, (first, last)
    assert json.load(open(os.path.join(out, "results.json")))["stages"] == results["stages"]
    assert sum(1 for _ in open(os.path.join(out, "sft", "predictions.jsonl"))) == 6 * 5

    model = VLM.from_pretrained(os.path.join(out, "sft"))
    image = os.path.join(data, "images", json.loads(open(os.path.join(data, "eval.jsonl")).readline())["image"])
    assert isinstance(model.chat(image, "How many shapes are there?", max_new_tokens=4), str)

    # The same seed gives the same run: SFT again from the same pretrain checkpoint, same losses to the bit.
    again = os.path.join(str(tmp_path), "again")
    flags = quickstart.stage_flags(quickstart.build_parser().parse_args(small + ["--output_dir", again]), "sft")
    subprocess.run([sys.executable, os.path.join(ROOT, "sft_train.py"), "--model_path",
                    os.path.join(out, "pretrain"), *flags], check=True, capture_output=True, cwd=ROOT)
    assert read_losses(os.path.join(again, "sft", "log.jsonl")) == read_losses(os.path.join(out, "sft", "log.jsonl"))
