"""Dynamic resolution (max_tiles): the tile grid an image gets, image tokens equal to its views, label masks, batches
mixing tile counts, max_tiles=1 unchanged, save/load, cached features, DPO pairs and the KV-cache chat."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_vlm
from processor import IGNORE_INDEX, IMAGE_PLACEHOLDER, VLMProcessor, num_views, tile_grid
from data import collate
from model import VLM

TILE = 64  # the tiny preset's input side
# Tests of the model's arithmetic also run on a GPU where one is present (CI has none; tests/test_gpu.py's machine).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("size, max_tiles, grid", [
    ((1600, 400), 4, (1, 4)),    # wide: one row of four
    ((400, 1600), 4, (4, 1)),    # tall: one column
    ((50, 40), 6, (1, 1)),       # smaller than one tile: not blown up into tiles
    ((4000, 4000), 4, (2, 2)),   # huge and square
    ((3000, 2000), 6, (2, 3)),   # 3:2 with room for six
    ((3000, 2000), 1, (1, 1)),   # max_tiles=1: one view, whatever the image
    ((100, 30), 4, (1, 2)),      # the fewest tiles that keep every pixel: two, not four upscaled ones
    ((130, 64), 4, (1, 3)),      # every pixel kept beats shrinking by 2% into two tiles (LLaVA-NeXT's rule)
])
def test_tile_grid_fits_the_aspect_ratio_without_needless_upscaling(size, max_tiles, grid):
    assert tile_grid(*size, max_tiles, TILE) == grid


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model(toy_tokenizer):
    model = tiny_vlm(toy_tokenizer)
    model.config.max_tiles = 4
    return model


def conversation(question: str = "What colour is the circle?", reply: str = "a red circle") -> list[dict]:
    return [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"}, {"role": "assistant", "content": reply}]


@pytest.mark.parametrize("size", [(256, 64), (64, 256), (40, 40), (200, 140)])
def test_image_tokens_equal_the_views_and_the_labels_are_the_reply(model, size):
    processor = model.processor()
    image = picture(*size)
    grid = processor.grid_of(image.size)
    encoded = processor.encode_chat(conversation(), grids=processor.grids([image]))
    views = processor.pixel_values([image])
    assert views.shape == (num_views(grid), 3, TILE, TILE)
    assert int((encoded["input_ids"] == processor.image_token_id).sum()) == processor.image_tokens(grid) == \
        num_views(grid) * 16
    supervised = encoded["input_ids"][encoded["labels"] != IGNORE_INDEX]
    assert processor.tokenizer.decode(supervised).startswith("a red circle")
    if num_views(grid) > 1:  # the layout is in text: a marker per tile, then the global view
        text = processor.tokenizer.decode(encoded["input_ids"])
        assert text.count("<tile") == grid[0] * grid[1] and text.count("<global>") == 1


def test_the_global_view_is_the_untiled_image_and_tiles_are_its_parts(model):
    processor = model.processor()
    image = picture(256, 64)
    views = processor.pixel_values([image])
    whole = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.equal(views[-1], whole[0])
    first_tile = image.resize((4 * TILE, TILE), Image.BICUBIC).crop((0, 0, TILE, TILE))
    expected = processor.image_processor(images=[first_tile], return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(views[0], expected, atol=1e-6)


def test_max_tiles_1_is_the_untiled_model_bit_for_bit(toy_tokenizer):
    model = tiny_vlm(toy_tokenizer)
    assert model.config.max_tiles == 1
    processor = model.processor()
    image = picture(256, 64)  # an image that four tiles would cut
    encoded = processor.encode_chat(conversation(), grids=processor.grids([image]))
    pads = processor.image_token * processor.num_image_tokens
    untiled = [{**m, "content": m["content"].replace(IMAGE_PLACEHOLDER, pads)}
               for m in processor.with_system_prompt(conversation())]
    text = processor.tokenizer.apply_chat_template(untiled, tokenize=False)
    assert encoded["input_ids"].tolist() == processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert torch.equal(processor.pixel_values([image]),
                       processor.image_processor(images=[image], return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize("device", DEVICES)
def test_a_batch_mixing_tile_counts_gives_each_sample_its_own_logits(model, device):
    processor = model.processor()
    model = copy.deepcopy(model).to(device)
    images = [picture(256, 64, 1), picture(40, 40, 2), picture(128, 128, 3)]  # 4 + 1, 1, 4 + 1 views
    samples = []
    for i, image in enumerate(images):
        sample = processor.encode_chat(conversation(reply=f"reply {'x' * i}"), grids=processor.grids([image]))
        sample["pixel_values"] = processor.pixel_values([image])
        samples.append(sample)
    assert [len(s["pixel_values"]) for s in samples] == [5, 1, 5]
    seen = []
    hook = model.vision_model.register_forward_hook(lambda module, args, output: seen.append(len(args[0]) if args
                                                                                             else None))
    try:
        with torch.no_grad():
            batch = {key: value.to(device) for key, value in
                     collate(samples, pad_token_id=processor.pad_token_id).items()}
            together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["pixel_values"]).logits
            assert len(seen) == 1  # every view of the batch in one call of the tower
            for i, sample in enumerate(samples):
                alone = model(input_ids=sample["input_ids"][None].to(device),
                              pixel_values=sample["pixel_values"].to(device)).logits[0]
                tolerance = 1e-5 if device == "cpu" else 1e-3  # a GPU's fp32 matmuls may run in TF32
                assert torch.allclose(together[i, :len(alone)], alone, atol=tolerance)
    finally:
        hook.remove()


def test_save_and_load_keep_the_setting(model, tmp_path):
    model.save_pretrained(tmp_path / "tiled")
    loaded = VLM.from_pretrained(tmp_path / "tiled")
    assert loaded.config.max_tiles == 4 and loaded.processor().max_tiles == 4
    image = picture(256, 64)
    assert loaded.processor().pixel_values([image]).shape[0] == 5


@pytest.mark.parametrize("device", DEVICES)
def test_generation_and_the_kv_cache_chat_see_every_view(model, device):
    from conversation import ChatSession

    model = copy.deepcopy(model).to(device)
    image = picture(256, 64)
    first = model.chat(image, "What colour is the circle?", max_new_tokens=4)
    session = ChatSession(model, image)
    assert session.ask("What colour is the circle?", max_new_tokens=4) == first
    follow_up = session.ask("Is there a square?", max_new_tokens=4)
    history = [("What colour is the circle?", first)]
    assert follow_up == model.chat(image, "Is there a square?", history=history, max_new_tokens=4)


def test_dataset_views_feature_rows_and_dpo_pairs_follow_the_tiles(model, tmp_path):
    """The start-up scan counts each sample's views from the image headers (what the feature cache allots rows
    by); a preference pair's chosen and rejected answers share one encoding of every view."""
    import json

    from data import ConversationDataset, parse_preference_record
    from dpo_train import collate_pairs

    sizes = [(256, 64), (40, 40), (64, 256)]
    records = []
    for i, size in enumerate(sizes):
        picture(*size, i).save(tmp_path / f"{i}.png")
        records.append({"image": f"{i}.png", "question": "Is there a circle?", "chosen": "Yes", "rejected": "No"})
    (tmp_path / "pairs.json").write_text(json.dumps(records))
    processor = VLMProcessor.from_model(model, max_length=512)
    dataset = ConversationDataset([str(tmp_path / "pairs.json")], processor, str(tmp_path),
                                  parse=parse_preference_record)
    assert dataset.view_counts == [5, 1, 5]
    items = [dataset[i] for i in range(3)]
    assert [len(item["pixel_values"]) for item in items] == [5, 1, 5]
    batch = collate_pairs(items, pad_token_id=processor.pad_token_id)
    with torch.no_grad():  # the image tokens of 6 rows match 11 views x 2 through image_index
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"], image_index=batch["image_index"])


def test_stage_1_with_tiles_caches_one_row_per_view_and_saves_the_setting(tmp_path, toy_tokenizer):
    """--max_tiles through a stage's command line: the feature cache allots every view a row (the scan's count
    from the image headers), training runs on the cached views, the checkpoint keeps max_tiles."""
    import json

    from conftest import write_llava_json
    import pretrain_train

    path, image_dir = write_llava_json(str(tmp_path), 4, turns=1)  # one image and one reply: stage 1's plain format
    for i, size in enumerate([(256, 64), (40, 40), (128, 128), (64, 200)]):  # 5, 1, 5 and 5 views
        picture(*size, i).save(f"{image_dir}/{i}.png")
    toy_tokenizer.save_pretrained(tmp_path / "tokenizer")
    pretrain_train.main(["--preset", "tiny", "--tokenizer", str(tmp_path / "tokenizer"), "--data_path", path,
                         "--image_dir", image_dir, "--output_dir", str(tmp_path / "out"), "--max_tiles", "4",
                         "--cache_vision_features", str(tmp_path / "cache"), "--max_steps", "2", "--batch_size",
                         "2", "--num_workers", "0", "--save_steps", "0", "--dtype", "fp32", "--max_length", "1024"])
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["images"] == 16 and np.load(tmp_path / "cache" / "features.npy").shape[:2] == (16, 16)
    assert VLM.from_pretrained(tmp_path / "out").config.max_tiles == 4


def test_the_readme_picture_script_draws_the_processors_cut(tmp_path):
    from scripts import show_tiles

    path = show_tiles.main(["--output", str(tmp_path / "tiles.png")])
    rows, cols = tile_grid(1152, 768, 6, 384)
    assert (rows, cols) == (2, 3)
    gap = show_tiles.GAP  # three tiles and the global view across, two rows of tiles down
    assert Image.open(path).size == (cols * (384 + gap) + 384 + 3 * gap, rows * (384 + gap) + 2 * gap)


def test_the_scan_rejects_a_sample_whose_views_cannot_fit_max_length(model, tmp_path):
    import json

    from data import ConversationDataset
    from processor import DataError

    picture(256, 64).save(tmp_path / "wide.png")  # 5 views x 16 tokens = 80
    (tmp_path / "data.json").write_text(json.dumps([{"id": "w", "image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a square"}]}]))
    with pytest.raises(DataError, match=r"sample 0 \(id=w\): its 5 image view\(s\) alone take 80 tokens, more than "
                                        r"max_length 64"):
        ConversationDataset([str(tmp_path / "data.json")], VLMProcessor.from_model(model, max_length=64),
                            str(tmp_path))


def test_an_exif_rotated_photo_is_read_upright_by_the_scan_and_the_processor(model, tmp_path):
    """A phone photo stores its pixels sideways with an EXIF orientation: the pixels are turned upright (as
    transformers' load_image does), and the header size the start-up scan counts views from is the upright one."""
    from PIL import ExifTags

    from processor import image_size, open_image

    stored = picture(256, 64)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # shown turned 90 degrees clockwise: 64 wide, 256 tall
    stored.save(tmp_path / "photo.jpg", exif=exif)
    upright = open_image("photo.jpg", str(tmp_path), "test")
    assert upright.size == (64, 256) == image_size("photo.jpg", str(tmp_path), "test")
    assert np.array_equal(np.asarray(upright), np.asarray(Image.open(tmp_path / "photo.jpg").transpose(
        Image.Transpose.ROTATE_270)))
    processor = model.processor()
    assert processor.grid_of(image_size("photo.jpg", str(tmp_path), "test")) == (4, 1)  # a column, as it is seen
    assert processor.pixel_values([upright]).shape[0] == 5
