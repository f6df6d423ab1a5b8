"""Packing: samples side by side in one row give exactly what they give alone, and never see each other."""

import os

import pytest
import torch
from conftest import tiny_vlm, write_llava_json

import sft_train
from data import ConversationDataset, collate
from processor import VLMProcessor
from test_training import common_args, read_log


@pytest.fixture
def setup(tmp_path, toy_tokenizer):
    model = tiny_vlm(toy_tokenizer).train()
    path, image_dir = write_llava_json(str(tmp_path), 6, text_only={2})
    dataset = ConversationDataset([path], VLMProcessor.from_model(model), image_dir)
    return model, [dataset[i] for i in range(6)], toy_tokenizer.pad_token_id


def supervised_logits(model, batch):
    with torch.no_grad():
        return model(**batch).supervised_logits


def test_packed_rows_give_the_unpacked_logits_and_loss(setup):
    model, samples, pad = setup
    padded = collate(samples, pad)
    packed = collate(samples, pad, pack_length=10_000)
    assert packed["input_ids"].shape[0] == 1 and padded["input_ids"].shape[0] == 6
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    with torch.no_grad():
        a, b = model(**padded), model(**packed)
    assert a.num_tokens == b.num_tokens
    assert torch.allclose(a.supervised_logits, b.supervised_logits, atol=1e-5) and torch.allclose(a.loss_sum, b.loss_sum, rtol=1e-6)
    rows = collate(samples, pad, pack_length=2 * max(len(s["input_ids"]) for s in samples))
    assert 1 < rows["input_ids"].shape[0] < 6
    assert torch.allclose(supervised_logits(model, rows), a.supervised_logits, atol=1e-5)


def flash_like_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None,
                         **kwargs):
    """What a flash-attention kernel does with a packed batch, in plain torch: causal attention, split into samples
    at the position-id restarts only when the batch is a single row (transformers' own test for it)."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    length = query.shape[2]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    if _is_packed_sequence(position_ids, query.shape[0]):
        sample = (position_ids[0].diff(prepend=position_ids[0, :1] - 1) != 1).cumsum(0)
        allowed = allowed & (sample[:, None] == sample[None, :])
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2), None


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flash_like"])
def test_several_packed_rows_are_correct_for_every_attention_implementation(setup, implementation):
    """Flash-attention reads sample boundaries from position ids only in a batch of one row: packed rows must reach
    such kernels as one row, or each row's samples attend to one another."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register("flash_like", flash_like_attention)
    AttentionMaskInterface.register("flash_like", flash_attention_mask)
    model, samples, pad = setup
    expected = supervised_logits(model, collate(samples, pad))
    model.language_model.config._attn_implementation = implementation  # what loading with it sets
    rows = collate(samples, pad, pack_length=2 * max(len(s["input_ids"]) for s in samples))
    assert 1 < rows["input_ids"].shape[0] < 6
    assert torch.allclose(supervised_logits(model, rows), expected, atol=1e-5)


def test_changing_one_packed_sample_changes_no_other(setup):
    model, samples, pad = setup
    packed = collate(samples, pad, pack_length=10_000)
    changed = [dict(s) for s in samples]
    changed[3]["input_ids"] = changed[3]["input_ids"].clone()
    changed[3]["input_ids"][-5] = (changed[3]["input_ids"][-5] + 1) % 200  # a token near the end of sample 3
    before, after = supervised_logits(model, packed), supervised_logits(model, collate(changed, pad, 10_000))
    counts = [int((s["labels"][1:] != -100).sum()) for s in samples]
    bounds = torch.tensor([0] + counts).cumsum(0).tolist()
    for i in range(6):
        same = torch.equal(before[bounds[i]:bounds[i + 1]], after[bounds[i]:bounds[i + 1]])
        assert same == (i != 3), i


def test_training_with_packing_matches_padded_batches(tmp_path, setup):
    path, image_dir = write_llava_json(str(tmp_path / "data"), 16, text_only={5})
    steps = ["--preset", "tiny", "--max_steps", "3", "--batch_size", "4", "--save_steps", "0"]
    sft_train.main(common_args((path, image_dir), tmp_path / "padded", *steps))
    sft_train.main(common_args((path, image_dir), tmp_path / "packed", *steps, "--packing"))
    padded, packed = read_log(tmp_path / "padded"), read_log(tmp_path / "packed")
    tolerance = 1e-3 if torch.cuda.is_available() else 1e-5  # a GPU's fp32 matmuls run in TF32
    for step in (1, 2, 3):
        assert packed[step]["loss"] == pytest.approx(padded[step]["loss"], rel=tolerance)
        assert packed[step]["grad_norm"] == pytest.approx(padded[step]["grad_norm"], rel=10 * tolerance)


def test_packing_carries_cached_vision_features(setup):
    model, samples, pad = setup
    cached = []
    for s in samples:
        features = model.vision_features(s["pixel_values"]) if s["pixel_values"] is not None else None
        cached.append({**s, "pixel_values": None, "vision_features": features})
    packed = collate(cached, pad, pack_length=10_000)
    assert packed["pixel_values"] is None and packed["vision_features"].shape[0] == 5
    assert torch.allclose(supervised_logits(model, packed), supervised_logits(model, collate(samples, pad)),
                          atol=1e-5)


# ---------------------------------------------------------------- --group_by_length
def test_length_groups_keep_every_sample_once_sort_within_groups_and_resume(tmp_path, toy_tokenizer):
    from distributed import Runtime
    from sampler import ResumableSampler

    paths = [write_llava_json(str(tmp_path / f"t{t}"), 40, name="d.json", turns=t)[0] for t in range(1, 6)]
    processor = VLMProcessor.from_model(tiny_vlm(toy_tokenizer))
    dataset = ConversationDataset(paths, processor, None, validate=False)  # 1-5 turns: lengths differ a lot
    lengths = [dataset.length_estimate(p) for p in range(len(dataset))]
    true_lengths = [len(dataset.processor.encode_sample(dataset.sample(p), None, decode_images=False)["input_ids"])
                    for p in range(len(dataset))]

    grouped = ResumableSampler(dataset, Runtime(), seed=3, lengths=lengths, group_size=32, batch_size=8)
    plain = ResumableSampler(dataset, Runtime(), seed=3)
    for epoch in (0, 1):
        grouped.set_epoch(epoch)
        order = list(grouped)
        assert sorted(order) == list(range(len(dataset)))
        swept = True
        for start in range(0, len(order), 32):
            batches = [[lengths[i] for i in order[b:b + 8]] for b in range(start, start + 32, 8)]
            assert sorted(sum(batches, []), reverse=True) == sum(sorted(batches, reverse=True), [])  # a group
            swept &= batches == sorted(batches, reverse=True)  # is its sorted samples cut into batches ...
        assert not swept  # ... whose order is shuffled, not a sweep from the longest to the shortest
        grouped.start = 48  # a resumed run continues with exactly the rest of the epoch
        assert list(grouped) == order[48:]
        grouped.start = 0

    def padding(sampler, batch_size=8):
        order = list(sampler)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        return sum(max(true_lengths[i] for i in b) * len(b) - sum(true_lengths[i] for i in b) for b in batches)

    plain.set_epoch(0)
    grouped.set_epoch(0)
    assert padding(grouped) < padding(plain) / 2  # the character-count estimate is good enough to group by


def test_length_estimates_come_from_the_start_up_scan_and_follow_skipped_samples(tmp_path, toy_tokenizer):
    path, image_dir = write_llava_json(str(tmp_path), 12, text_only={3})
    processor = VLMProcessor.from_model(tiny_vlm(toy_tokenizer))
    lazy = ConversationDataset([path], processor, image_dir, validate=False)
    expected = [lazy.length_estimate(p) for p in range(len(lazy))]
    assert expected[4] != expected[5] != expected[6]  # a shifted list would not pass below
    assert ConversationDataset([path], processor, image_dir).lengths == expected
    os.remove(os.path.join(image_dir, "5.png"))
    skipped = ConversationDataset([path], processor, image_dir, skip_bad_samples=True)
    assert [skipped.length_estimate(p) for p in range(len(skipped))] == expected[:5] + expected[6:]


def test_group_by_length_trains(tmp_path, toy_tokenizer):
    path, image_dir = write_llava_json(str(tmp_path / "data"), 16, text_only={5})
    sft_train.main(common_args((path, image_dir), tmp_path / "out", "--preset", "tiny", "--max_steps", "2",
                               "--batch_size", "4", "--save_steps", "0", "--group_by_length"))
    log = read_log(tmp_path / "out")
    assert sorted(log) == [1, 2] and all(record["supervised_tokens"] > 0 for record in log.values())
