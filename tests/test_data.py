"""Label masks, image-token expansion, loaders and the errors bad data gets."""

import io
import json
import os

import datasets
import pytest
import torch
from PIL import Image
from conftest import conversation, draw_image, write_llava_json

from data import PAD_MULTIPLE, ConversationDataset, ScanPlan, check_data, collate, parse_record
from processor import IGNORE_INDEX, IMAGE_PLACEHOLDER, DataError, VLMProcessor

QWEN_IMAGE_PAD, QWEN_IM_END = 151655, 151645


def supervised_spans(input_ids, labels):
    """Contiguous runs of supervised tokens, as lists of ids."""
    spans, current = [], []
    for token, label in zip(input_ids.tolist(), labels.tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def replies(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


MULTI_TURN = [
    {"role": "user", "content": "<image>\n图里有什么？"},
    {"role": "assistant", "content": "一只猫，正在睡觉。"},
    {"role": "user", "content": "What colour is it?"},
    {"role": "assistant", "content": " Orange, with\nwhite paws.\n"},  # leading space and newlines must survive
    {"role": "user", "content": "Is there a dog?"},
    {"role": "assistant", "content": "No"},
]


def test_labels_decode_to_the_replies_on_qwen_vocabulary(qwen_tokenizer):
    processor = VLMProcessor(qwen_tokenizer, None, num_image_tokens=169)
    encoded = processor.encode_chat(MULTI_TURN)
    spans = supervised_spans(encoded["input_ids"], encoded["labels"])
    decoded = [qwen_tokenizer.decode(span) for span in spans]
    assert decoded == [reply + "<|im_end|>" for reply in replies(MULTI_TURN)]
    assert all(span[-1] == QWEN_IM_END for span in spans)


@pytest.mark.parametrize("reply", ["\nA red square.", "\n\n- one\n- two", " leading space", "plain"])
def test_reply_tokens_start_where_inference_starts(qwen_tokenizer, reply):
    """Training must tokenise the prompt exactly as inference does and supervise the whole reply. On Qwen's
    vocabulary "assistant\n" + "\nA" would merge the two newlines into one token that straddles the boundary."""
    processor = VLMProcessor(qwen_tokenizer, None, num_image_tokens=4)
    question = [{"role": "user", "content": "<image>\nWhat is it?"}]
    encoded = processor.encode_chat(question + [{"role": "assistant", "content": reply}])
    spans = supervised_spans(encoded["input_ids"], encoded["labels"])
    assert [qwen_tokenizer.decode(span) for span in spans] == [reply + "<|im_end|>"]
    prompt = processor.encode_generation_batch([None], [question[0]["content"]])["input_ids"][0]
    assert encoded["input_ids"][:len(prompt)].tolist() == prompt.tolist()
    assert (encoded["labels"][:len(prompt)] == -100).all() and encoded["labels"][len(prompt)] != -100


def test_image_placeholder_expands_to_geometry_count_on_qwen_vocabulary(qwen_tokenizer):
    processor = VLMProcessor(qwen_tokenizer, None, num_image_tokens=169)
    ids = processor.encode_chat(MULTI_TURN)["input_ids"]
    positions = (ids == QWEN_IMAGE_PAD).nonzero().flatten()
    assert len(positions) == 169
    assert (positions.diff() == 1).all(), "image tokens must form one block"
    assert processor.image_token_id == QWEN_IMAGE_PAD
    assert IMAGE_PLACEHOLDER not in qwen_tokenizer.decode(ids)


def test_explicit_system_prompt_replaces_qwens_default(qwen_tokenizer):
    processor = VLMProcessor(qwen_tokenizer, None, num_image_tokens=4, system_prompt="You look at pictures.")
    text = qwen_tokenizer.decode(processor.encode_chat(MULTI_TURN)["input_ids"])
    assert text.startswith("<|im_start|>system\nYou look at pictures.<|im_end|>")
    assert "Alibaba" not in text
    prompt = processor.encode_generation_batch([None], ["hi"])["input_ids"][0]
    assert "You look at pictures." in qwen_tokenizer.decode(prompt)
    assert "Alibaba" not in qwen_tokenizer.decode(prompt)


def test_labels_on_toy_tokenizer_and_record_system_turn(toy_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}] + MULTI_TURN[:2]
    processor = VLMProcessor(toy_tokenizer, None, num_image_tokens=16)
    encoded = processor.encode_chat(messages)
    spans = supervised_spans(encoded["input_ids"], encoded["labels"])
    assert [toy_tokenizer.decode(s) for s in spans] == [MULTI_TURN[1]["content"] + "<|im_end|>"]
    assert toy_tokenizer.decode(encoded["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_generation_prompt_pads_left_and_ends_with_assistant_header(qwen_tokenizer):
    processor = VLMProcessor(qwen_tokenizer, None, num_image_tokens=4)
    batch = processor.encode_generation_batch([None, None], ["hi", "a much longer question than the first"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[1, 0] == 1 and (mask[:, -1] == 1).all()
    assert (ids[0][mask[0] == 0] == qwen_tokenizer.pad_token_id).all()
    for row, row_mask in zip(ids, mask):
        assert qwen_tokenizer.decode(row[row_mask == 1]).endswith("<|im_start|>assistant\n")


CAPTION = [{"role": "user", "content": "<image>\nDescribe the image briefly."},
           {"role": "assistant", "content": "a red circle on the top left"}]


def test_plain_format_supervises_only_the_caption_and_its_end_token(qwen_tokenizer):
    """LLaVA's stage-1 format: the image tokens, then the caption and <|im_end|>; no template, no system prompt, no
    question, and only the caption and its end token are labels."""
    from transformers import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    processor = VLMProcessor(qwen_tokenizer, image_processor, num_image_tokens=169, prompt_format="plain")
    encoded = processor.encode_chat([{"role": "system", "content": "ignored"}] + CAPTION)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert (ids[:169] == QWEN_IMAGE_PAD).all() and (ids == QWEN_IMAGE_PAD).sum() == 169
    assert (labels[:169] == -100).all() and (labels[169:] != -100).all()
    assert qwen_tokenizer.decode(ids[169:]) == "a red circle on the top left<|im_end|>"
    assert len(ids) < len(VLMProcessor(qwen_tokenizer, None, num_image_tokens=169).encode_chat(CAPTION)["input_ids"])
    # Generation prompts it the same way: the image tokens alone, whatever the question.
    prompt = processor.encode_generation_batch([Image.new("RGB", (8, 8))], ["What is it?"])
    assert prompt["input_ids"].tolist() == [ids[:169].tolist()]


def test_plain_format_starts_with_the_tokenizers_start_token_where_it_has_one(qwen_tokenizer):
    """SmolLM2's and Llama's tokenizers name a start token (Qwen's does not): the plain prompt puts it before the
    image tokens, in training and in generation alike, and it is never a label."""
    import copy

    tokenizer = copy.deepcopy(qwen_tokenizer)
    tokenizer.bos_token = "<|endoftext|>"
    processor = VLMProcessor(tokenizer, None, num_image_tokens=4, prompt_format="plain")
    encoded = processor.encode_chat(CAPTION)
    ids, labels = encoded["input_ids"].tolist(), encoded["labels"].tolist()
    assert ids[:5] == [tokenizer.bos_token_id] + [QWEN_IMAGE_PAD] * 4 and labels[:5] == [IGNORE_INDEX] * 5
    assert tokenizer.decode(ids[5:]) == "a red circle on the top left<|im_end|>"
    assert processor.plain_prompt(1) == "<|endoftext|>" + "<|image_pad|>" * 4


def test_plain_format_refuses_conversations(qwen_tokenizer):
    processor = VLMProcessor(qwen_tokenizer, None, num_image_tokens=4, prompt_format="plain")
    with pytest.raises(DataError, match="sample 3: the plain format .* 6 turns"):
        processor.encode_chat(MULTI_TURN, "sample 3")


def test_collate_pads_right_and_masks_padding(toy_tokenizer):
    processor = VLMProcessor(toy_tokenizer, None, num_image_tokens=4)
    short = processor.encode_chat(MULTI_TURN[:2])
    long = processor.encode_chat(MULTI_TURN)
    short["pixel_values"], long["pixel_values"] = torch.zeros(1, 3, 8, 8), None
    batch = collate([short, long], pad_token_id=toy_tokenizer.pad_token_id)
    n, m = len(short["input_ids"]), len(long["input_ids"])
    width = -(-m // PAD_MULTIPLE) * PAD_MULTIPLE  # a few distinct batch shapes, not one per batch
    assert batch["input_ids"].shape == (2, width) and width - PAD_MULTIPLE < m <= width
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()
    assert batch["attention_mask"][1, :m].all() and not batch["attention_mask"][1, m:].any()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, n:] == toy_tokenizer.pad_token_id).all()
    assert torch.equal(batch["labels"][1, :m], long["labels"]) and (batch["labels"][1, m:] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape == (1, 3, 8, 8)


# ---------------------------------------------------------------- loaders
@pytest.fixture
def processor(toy_tokenizer):
    from model import preset_configs, preset_image_processor

    vision, _ = preset_configs("tiny", vocab_size=len(toy_tokenizer))
    return VLMProcessor(toy_tokenizer, preset_image_processor(vision), num_image_tokens=16, max_length=256)


def test_llava_json_jsonl_parquet_and_saved_dataset_encode_identically(tmp_path, processor):
    path, image_dir = write_llava_json(str(tmp_path), 5, text_only={3})
    records = json.load(open(path))
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    # Records that carry the image itself, as minimind-v's parquet does: bytes in an Image column.
    embedded = datasets.Dataset.from_list([
        {"id": r["id"], "conversations": json.dumps(r["conversations"], ensure_ascii=False),
         "image": {"bytes": open(os.path.join(image_dir, r["image"]), "rb").read(), "path": None}
         if "image" in r else None} for r in records]).cast_column("image", datasets.Image())
    embedded.to_parquet(str(tmp_path / "data.parquet"))
    embedded.save_to_disk(str(tmp_path / "saved"))
    # A Hub dataset as `hf download --local-dir` leaves it (RLAIF-V): parquet shards, a README, its .cache/.
    hub = tmp_path / "hub"
    (hub / ".cache" / "huggingface").mkdir(parents=True)
    (hub / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n")
    embedded.select(range(3)).to_parquet(str(hub / "part_000.parquet"))
    embedded.select(range(3, 5)).to_parquet(str(hub / "part_001.parquet"))
    embedded.select(range(2)).to_parquet(str(hub / ".cache" / "huggingface" / "stale.parquet"))

    reference = ConversationDataset([path], processor, image_dir)
    for other in (ConversationDataset([str(jsonl)], processor, image_dir),
                  ConversationDataset([str(tmp_path / "data.parquet")], processor),
                  ConversationDataset([str(tmp_path / "saved")], processor),
                  ConversationDataset([str(hub)], processor)):
        assert len(other) == len(reference) == 5
        for i in range(5):
            a, b = reference[i], other[i]
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
            assert (a["pixel_values"] is None) == (b["pixel_values"] is None) == (i == 3)
            if a["pixel_values"] is not None:
                assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_several_files_concatenate(tmp_path, processor):
    first, image_dir = write_llava_json(str(tmp_path), 3, name="a.json")
    second, _ = write_llava_json(str(tmp_path), 2, name="b.json")
    assert len(ConversationDataset([first, second], processor, image_dir)) == 5


def write_records(tmp_path, records, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def good_record(i=0, image="0.png"):
    return {"id": f"r{i}", "image": image, "conversations": conversation(i)}


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(image="missing.png"), "image not found"),
    (lambda r: r["conversations"][0].update({"from": "robot"}), "unknown role 'robot'"),
    (lambda r: r["conversations"][0].update(value="no placeholder here"), "0 '<image>' placeholders for 1 images"),
    (lambda r: r["conversations"][0].update(value="<image><image> two"), "2 '<image>' placeholders for 1 images"),
    (lambda r: r["conversations"].reverse(), "turns must alternate"),
    (lambda r: r["conversations"].pop(), "must end with an assistant reply"),
    (lambda r: r.pop("conversations"), "no 'conversations'"),
])
def test_bad_records_name_file_sample_and_problem(tmp_path, processor, mutate, message):
    draw_image(str(tmp_path / "0.png"), 0)
    records = [good_record(0), good_record(1), good_record(2)]
    mutate(records[1])
    path = write_records(tmp_path, records)
    with pytest.raises(DataError) as error:
        ConversationDataset([path], processor, str(tmp_path))
    text = str(error.value)
    assert message in text and f"{path}: sample 1 (id=r1)" in text and "1 of 3 samples" in text


def test_corrupt_image_is_an_error_never_a_substitute(tmp_path, processor):
    draw_image(str(tmp_path / "0.png"), 0)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    path = write_records(tmp_path, [good_record(0), good_record(1, image="broken.png")])
    dataset = ConversationDataset([path], processor, str(tmp_path))  # files exist: structure is fine
    assert dataset[0]["pixel_values"] is not None
    with pytest.raises(DataError, match=r"bad.json: sample 1 \(id=r1\): cannot decode image broken.png"):
        dataset[1]


def test_over_long_sample_is_rejected_not_cut(tmp_path, toy_tokenizer, processor):
    draw_image(str(tmp_path / "0.png"), 0)
    path = write_records(tmp_path, [good_record(0)])
    processor.max_length = 20
    dataset = ConversationDataset([path], processor, str(tmp_path))
    with pytest.raises(DataError, match=r"sample 0 \(id=r0\): \d+ tokens \(with 1 x 16 image tokens\) exceed "
                                        r"max_length 20"):
        dataset[0]


@pytest.mark.parametrize("name, text, where", [
    ("broken.json", '[{"id": "a", "conversations": []},\n {"id": "b", "conversations": [}]', "broken.json:2"),
    ("broken.jsonl", '{"id": "a"}\n{"id": "b"}\n{"id": oops}\n', "broken.jsonl:3"),
])
def test_malformed_json_names_the_line(tmp_path, processor, name, text, where):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=where):
        ConversationDataset([str(tmp_path / name)], processor)


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_samples_drops_and_counts(tmp_path, processor, workers, capsys):
    """A missing image is found by the start-up scan, an undecodable one when its batch is built: both samples
    leave, nothing takes their place."""
    draw_image(str(tmp_path / "0.png"), 0)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    records = [good_record(0), good_record(1, image="broken.png"), good_record(2, image="missing.png"),
               good_record(3)]
    dataset = ConversationDataset([write_records(tmp_path, records)], processor, str(tmp_path),
                                  skip_bad_samples=True, scan=ScanPlan(workers=workers))
    assert len(dataset) == 3 and len(dataset.skipped) == 1 and "missing.png" in dataset.skipped[0][1]
    assert [dataset.sample(i).where.split("id=")[1] for i in range(3)] == ["r0)", "r1)", "r3)"]
    assert dataset[1] is None and "sample 1 (id=r1): cannot decode image" in capsys.readouterr().err
    batch = collate([dataset[i] for i in range(3)], processor.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2
    assert collate([dataset[1]], processor.pad_token_id) is None
    with pytest.raises(DataError, match="cannot decode image"):
        ConversationDataset([write_records(tmp_path, records[:2])], processor, str(tmp_path))[1]


def test_images_stored_in_the_records_are_decoded_only_when_used(tmp_path, processor, capsys):
    """datasets decodes an Image column whenever a row is read: the start-up scan would decode every image, and a
    corrupt one would end it with PIL's error instead of being skipped."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="PNG")
    records = datasets.Dataset.from_list([
        {"conversations": json.dumps(conversation(0)), "image": {"bytes": buffer.getvalue(), "path": None}},
        {"conversations": json.dumps(conversation(1)), "image": {"bytes": b"not an image", "path": None}},
    ]).cast_column("image", datasets.Image())
    records.to_parquet(str(tmp_path / "images.parquet"))
    dataset = ConversationDataset([str(tmp_path / "images.parquet")], processor, skip_bad_samples=True)
    assert len(dataset) == 2 and dataset[0]["pixel_values"] is not None
    assert dataset[1] is None and "cannot decode image" in capsys.readouterr().err


def test_check_data_summarises_every_problem(tmp_path, processor):
    draw_image(str(tmp_path / "0.png"), 0)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    records = [good_record(0), good_record(1, image="broken.png"), good_record(2, image="missing.png")]
    dataset = ConversationDataset([write_records(tmp_path, records)], processor, str(tmp_path), validate=False)
    summary = check_data(dataset)
    assert (summary["samples"], summary["ok"], summary["bad"], summary["images"]) == (3, 1, 2, 1)
    assert any("sample 1 (id=r1): cannot decode image" in p for p in summary["problems"])
    assert any("sample 2 (id=r2): image not found" in p for p in summary["problems"])


def test_parse_record_accepts_role_content_messages():
    sample = parse_record({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                          "f: sample 0")
    assert sample.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert sample.images == []


def test_sentencepiece_style_tokenizers_get_the_whole_texts_tokens():
    """A Metaspace tokenizer (Llama-2, Mistral) marks the start of every text it is given as a word start: replies
    tokenised on their own would begin with a marker that the whole conversation, and so inference, never has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from processor import CHAT_SPECIAL_TOKENS, CHATML_TEMPLATE

    specials = CHAT_SPECIAL_TOKENS + ["<|image_pad|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    bpe.decoder = decoders.Metaspace(prepend_scheme="always")
    texts = ["a red circle and a blue square", "What colour is the square?", "Yes", "No"] * 4
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=specials[1:])
    tokenizer.chat_template = CHATML_TEMPLATE
    processor = VLMProcessor(tokenizer, None, num_image_tokens=4)
    messages = [{"role": "user", "content": "What colour is the square?"},
                {"role": "assistant", "content": "a red circle"},
                {"role": "user", "content": "Is there a blue square?"}, {"role": "assistant", "content": "Yes"}]
    encoded = processor.encode_chat(messages)
    text, _ = processor.render(processor.expand_images(processor.with_system_prompt(messages)))
    assert encoded["input_ids"].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(supervised_spans(encoded["input_ids"], encoded["labels"])) == 2
