"""DPO: the loss against its formula, sequence log-probs, the reference model, precomputed references, data errors,
and a short run that learns the preferences."""

import json
import math
import os

import pytest
import torch
from conftest import draw_image, tiny_vlm

import dpo_train
from data import ConversationDataset, parse_preference_record
from dpo_train import DPOObjective, collate_pairs, dpo_loss, sequence_logps
from model import VLM
from processor import DataError, VLMProcessor
from training import run_stage

POLICY_CHOSEN = torch.tensor([-5.0, -9.0, -2.5])
POLICY_REJECTED = torch.tensor([-6.0, -7.0, -2.0])
REF_CHOSEN = torch.tensor([-5.5, -8.0, -3.0])
REF_REJECTED = torch.tensor([-5.0, -7.5, -2.2])


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_loss_and_rewards_equal_the_formula(loss_type, smoothing):
    beta = 0.3
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED,
                                                        beta, smoothing, loss_type)
    for i in range(3):
        h = (POLICY_CHOSEN[i] - REF_CHOSEN[i]).item() - (POLICY_REJECTED[i] - REF_REJECTED[i]).item()
        if loss_type == "sigmoid":
            expected = (-(1 - smoothing) * math.log(1 / (1 + math.exp(-beta * h)))
                        - smoothing * math.log(1 / (1 + math.exp(beta * h))))
        else:
            expected = (h - 1 / (2 * beta)) ** 2
        assert losses[i].item() == pytest.approx(expected, rel=1e-6)
        assert chosen_rewards[i].item() == pytest.approx(beta * (POLICY_CHOSEN[i] - REF_CHOSEN[i]).item())
        assert rejected_rewards[i].item() == pytest.approx(beta * (POLICY_REJECTED[i] - REF_REJECTED[i]).item())
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward()
    assert policy_chosen.grad.abs().sum() > 0


def test_gradient_reaches_the_policy_only():
    policy = POLICY_CHOSEN.clone().requires_grad_()
    reference = REF_CHOSEN.clone().requires_grad_()
    with torch.no_grad():  # how DPOObjective computes the reference
        reference_value = reference * 1
    dpo_loss(policy, POLICY_REJECTED, reference_value, REF_REJECTED)[0].sum().backward()
    assert policy.grad is not None and reference.grad is None


# ---------------------------------------------------------------- data and log-probs
def pair_records(root, n=8):
    """Colour questions about one-square images: chosen is the true colour, rejected another."""
    colours = ["red", "blue", "green", "yellow"]
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    records = []
    for i in range(n):
        draw_image(os.path.join(root, "images", f"{i}.png"), i)
        truth = colours[i % 4]
        records.append({"id": f"p{i}", "image": f"{i}.png", "question": "What colour is the square?",
                        "chosen": truth, "rejected": colours[(i + 1) % 4] + " and a little" * (i % 3)})
    path = os.path.join(root, "pairs.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path, os.path.join(root, "images")


def test_sequence_logps_cover_only_the_reply_and_ignore_padding(tmp_path, toy_tokenizer):
    model = tiny_vlm(toy_tokenizer)
    processor = VLMProcessor.from_model(model)
    path, image_dir = pair_records(str(tmp_path), 3)
    dataset = ConversationDataset([path], processor, image_dir, parse=parse_preference_record)
    items = [dataset[i] for i in range(3)]
    assert len({len(i["rejected_input_ids"]) for i in items}) == 3  # rejected replies of different lengths
    batch = collate_pairs(items, toy_tokenizer.pad_token_id)
    with torch.no_grad():
        batched, lengths = sequence_logps(model, batch)
        for row, item in enumerate(items):
            for half, prefix in ((0, ""), (1, "rejected_")):
                ids, labels = item[f"{prefix}input_ids"][None], item[f"{prefix}labels"][None]
                embeds = model.embed(ids, item["pixel_values"])
                logits = model.language_model(inputs_embeds=embeds).logits[0, :-1]
                targets = labels[0, 1:]
                mask = targets != -100
                manual = logits.log_softmax(-1)[mask].gather(1, targets[mask, None]).sum()
                reply = toy_tokenizer.decode(targets[mask])
                sample = dataset.sample(row)
                expected = sample.messages[-1]["content"] if half == 0 else sample.rejected
                assert reply == expected + "<|im_end|>"
                assert batched[half * 3 + row].item() == pytest.approx(manual.item(), abs=1e-4)
                assert lengths[half * 3 + row] == mask.sum()
    assert batch["pixel_values"].shape[0] == 3 and batch["image_index"].tolist() == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(rejected=r["chosen"]), "'chosen' and 'rejected' are identical"),
    (lambda r: r.pop("rejected"), "'rejected' is missing or empty"),
    (lambda r: r.update(chosen="  "), "'chosen' is missing or empty"),
    (lambda r: r.update(image="gone.png"), "image not found"),
])
def test_bad_pairs_get_clear_errors(tmp_path, toy_tokenizer, change, message):
    path, image_dir = pair_records(str(tmp_path), 3)
    records = json.load(open(path))
    change(records[1])
    json.dump(records, open(path, "w"))
    processor = VLMProcessor.from_model(tiny_vlm(toy_tokenizer))
    with pytest.raises(DataError, match=rf"pairs.json: sample 1 \(id=p1\): .*{message}"):
        ConversationDataset([path], processor, image_dir, parse=parse_preference_record)


def test_llava_style_pairs_keep_multi_turn_context(toy_tokenizer):
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                {"from": "human", "value": "Is it red?"}], "chosen": "Yes", "rejected": "No"}
    sample = parse_preference_record(record, "f: sample 0")
    processor = VLMProcessor(toy_tokenizer, None, num_image_tokens=4)
    encoded = processor.encode_sample(sample, None)
    assert toy_tokenizer.decode(encoded["input_ids"][encoded["labels"] != -100]) == "Yes<|im_end|>"
    assert toy_tokenizer.decode(encoded["rejected_input_ids"][encoded["rejected_labels"] != -100]) == "No<|im_end|>"
    assert "hello" in toy_tokenizer.decode(encoded["rejected_input_ids"])


# ---------------------------------------------------------------- training
def dpo_args(path, image_dir, start, out, *extra):
    return ["--model_path", str(start), "--data_path", path, "--image_dir", image_dir, "--output_dir", str(out),
            "--num_workers", "0", "--logging_steps", "1", "--dtype", "fp32", "--save_steps", "0",
            "--batch_size", "4", *extra]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [record for record in map(json.loads, f) if "loss" in record]


@pytest.fixture
def start(tmp_path, toy_tokenizer):
    folder = tmp_path / "sft"
    tiny_vlm(toy_tokenizer).save_pretrained(folder)
    return folder


def test_reference_stays_bit_identical_and_precompute_equals_online(tmp_path, start):
    path, image_dir = pair_records(str(tmp_path / "data"))
    initial = VLM.from_pretrained(str(start)).state_dict()
    parser_args = ["--max_steps", "3", "--lr", "1e-3", "--warmup_steps", "0"]
    settings = dpo_train.parse_args(dpo_args(path, image_dir, start, tmp_path / "online", *parser_args))
    objective = DPOObjective.from_settings(settings)
    run_stage(settings, build_dataset=dpo_train.build_preference_dataset, objective=objective,
              collate_fn=collate_pairs)
    for name, tensor in objective.reference.state_dict().items():
        assert torch.equal(tensor.cpu(), initial[name]), name
    assert all(not p.requires_grad for p in objective.reference.parameters())

    dpo_train.main(dpo_args(path, image_dir, start, tmp_path / "pre", *parser_args, "--precompute_ref"))
    online, pre = read_log(tmp_path / "online"), read_log(tmp_path / "pre")
    assert online[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    for a, b in zip(online, pre):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


def test_short_run_learns_the_preferences(tmp_path, start):
    path, image_dir = pair_records(str(tmp_path / "data"))
    out = tmp_path / "dpo"
    dpo_train.main(dpo_args(path, image_dir, start, out, "--max_steps", "20", "--lr", "2e-3", "--warmup_steps", "0",
                            "--beta", "0.5", "--sft_weight", "0.1"))
    log = read_log(out)
    assert log[0]["rewards/accuracy"] == 0.0  # ties at the start: policy equals reference
    late = [r["rewards/accuracy"] for r in log[-5:]]
    assert sum(late) / len(late) > 0.8 and log[-1]["rewards/margin"] > 0
    assert {"rewards/chosen", "rewards/rejected", "tokens_per_s"} <= set(log[-1])
    assert os.path.exists(out / "model.safetensors")
