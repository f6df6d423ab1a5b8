"""The VLM: geometry, spatial downsampling, the three ways to build it, the loss, and generation."""

import pytest
import torch
import torch.nn.functional as F
from conftest import draw_image, tiny_vlm
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, SiglipImageProcessorPil,
                          BitImageProcessorPil, CLIPImageProcessorPil)
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from conversation import ChatSession
from model import (VLM, VLMConfig, Whitening, downsample_grid, preset_configs, vlm_from_components, vlm_from_configs,
                   vlm_from_preset)
from processor import VLMProcessor

QUESTION = "What colour is the square?"


def test_real_geometry_gives_169_image_tokens_from_the_configs():
    vision, text = preset_configs("real", vocab_size=151936)
    config = VLMConfig(vision_config=vision, text_config=text)
    assert (config.vision_grid, config.image_grid, config.num_image_tokens) == (27, 13, 169)
    assert VLMConfig(vision_config=preset_configs("tiny", 300)[0]).num_image_tokens == 16


# Real checkpoints' vision configs and image processors, narrowed to a few channels: the geometry (image size, patch
# size, what the processor makes) is the real one. A DINOv2 folder declares 518 px while its processor crops 224.
REAL_SHAPED = {
    "siglip-so400m-patch14-384": (
        dict(model_type="siglip_vision_model", image_size=384, patch_size=14, vision_use_head=False),
        lambda: SiglipImageProcessorPil(size={"height": 384, "width": 384}), 169),
    "clip-vit-large-patch14-336": (
        dict(model_type="clip_vision_model", image_size=336, patch_size=14),
        lambda: CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}), 144),
    "dinov2-small": (
        dict(model_type="dinov2", image_size=518, patch_size=14),
        lambda: BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                     image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]), 64),
}


@pytest.mark.parametrize("name", sorted(REAL_SHAPED))
def test_image_tokens_follow_what_the_image_processor_makes(name, toy_tokenizer, tmp_path):
    vision, make_processor, expected = REAL_SHAPED[name]
    narrow = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision_config = AutoConfig.for_model(vision.pop("model_type"), **narrow, **vision)
    text_config = AutoConfig.for_model("qwen2", vocab_size=len(toy_tokenizer), num_key_value_heads=2,
                                       **dict(SMALL_TEXT, num_hidden_layers=1))
    torch.manual_seed(0)
    model = vlm_from_configs(vision_config, text_config, toy_tokenizer, make_processor()).eval()
    assert model.config.num_image_tokens == expected

    image = tmp_path / "photo.png"
    Image.new("RGB", (500, 375), (200, 120, 40)).save(image)  # any size: the processor makes it the tower's
    batch = model.processor().encode_generation_batch([str(image)], [QUESTION])
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == expected
    with torch.no_grad():
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape  # features fill exactly the placeholders

    model.save_pretrained(tmp_path / "saved")
    assert VLM.from_pretrained(tmp_path / "saved").config.num_image_tokens == expected


def test_a_processor_that_disagrees_with_a_saved_model_is_an_error(toy_tokenizer, tmp_path):
    model = tiny_vlm(toy_tokenizer)
    model.save_pretrained(tmp_path)
    SiglipImageProcessorPil(size={"height": 96, "width": 96}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="96-px images but the model was built for 64-px"):
        VLM.from_pretrained(tmp_path)


def test_downsampling_merges_spatial_neighbours_not_raster_runs():
    grid = torch.zeros(1, 16, 1)  # a 4x4 grid, one channel, raster order

    def out_after_bump(row, col):
        bumped = grid.clone()
        bumped[0, row * 4 + col] = 1.0
        return downsample_grid(bumped, 4, 2)[0, :, 0].reshape(2, 2)

    top_right = out_after_bump(0, 3)  # a raster-order merge would put this patch in output token 0 (top-left)
    assert top_right[0, 1] > 0 and top_right[1, 0] == 0 and top_right[1, 1] == 0
    bottom_left = out_after_bump(3, 0)
    assert bottom_left[1, 0] > 0 and bottom_left[0, 1] == 0 and bottom_left[0, 0] == 0


# ---------------------------------------------------------------- components from folders
def plain_bpe_tokenizer():
    """A GPT-2-like tokenizer: no chat template, no chat or image tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["a red circle", "What colour is the square?"] * 5,
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


SMALL_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
COMBOS = {
    "siglip+qwen2": (dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, image_size=32, patch_size=8),
                     lambda: SiglipImageProcessorPil(size={"height": 32, "width": 32}), 0,
                     dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True, **SMALL_TEXT), "qwen"),
    "clip+llama": (dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, image_size=32, patch_size=8),
                   lambda: CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                   1, dict(model_type="llama", num_key_value_heads=2, **SMALL_TEXT), "toy"),
    "dinov2-registers+gpt2": (dict(model_type="dinov2_with_registers", hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                                   num_register_tokens=4),
                              lambda: BitImageProcessorPil(size={"shortest_edge": 32},
                                                           crop_size={"height": 32, "width": 32}), 5,
                              dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=512), "plain"),
}


@pytest.mark.parametrize("combo", list(COMBOS))
def test_build_from_saved_component_folders(tmp_path, combo, qwen_tokenizer, toy_tokenizer):
    vision_kwargs, make_processor, num_prefix, text_kwargs, tokenizer_kind = COMBOS[combo]
    tokenizer = {"qwen": qwen_tokenizer, "toy": toy_tokenizer, "plain": plain_bpe_tokenizer()}[tokenizer_kind]
    vision_kwargs, text_kwargs = dict(vision_kwargs), dict(text_kwargs)
    torch.manual_seed(0)
    vision = MODEL_MAPPING[type(AutoConfig.for_model(vision_kwargs["model_type"]))](
        AutoConfig.for_model(vision_kwargs.pop("model_type"), **vision_kwargs))
    language = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(text_kwargs.pop("model_type"), vocab_size=len(tokenizer), **text_kwargs))
    vision.save_pretrained(tmp_path / "vision")
    make_processor().save_pretrained(tmp_path / "vision")
    language.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")

    model = vlm_from_components(str(tmp_path / "vision"), str(tmp_path / "llm")).eval()

    # The pretrained weights arrive untouched (no re-initialisation), and the tower's prefix tokens are dropped.
    original, loaded = vision.state_dict(), model.vision_model.state_dict()
    for name, tensor in loaded.items():
        assert torch.equal(original[name], tensor), name
    assert all(name.split(".")[0] == "head" for name in set(original) - set(loaded))  # SigLIP's unused pooling head
    n_vocab = language.get_input_embeddings().weight.shape[0]
    assert torch.equal(model.language_model.get_input_embeddings().weight[:n_vocab],
                       language.get_input_embeddings().weight)
    assert model.config.num_image_tokens == 4
    pixel_values = torch.zeros(1, 3, 32, 32)
    assert vision(pixel_values=pixel_values).last_hidden_state.shape[1] == 16 + num_prefix
    assert model.encode_images(pixel_values).shape == (1, 4, 32)
    # A tokenizer without a chat template or image token gets them, and the embeddings grow to match.
    assert model.language_model.get_input_embeddings().weight.shape[0] >= len(model.tokenizer)
    assert model.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id

    image = tmp_path / "im.png"
    draw_image(str(image), 1, size=40)
    batch = VLMProcessor.from_model(model).encode_sample(
        __import__("data").Sample([{"role": "user", "content": "<image>\nhi"},
                                   {"role": "assistant", "content": "a red circle"}], [str(image)], "t"), None)
    model.train()
    out = model(input_ids=batch["input_ids"][None], pixel_values=batch["pixel_values"],
                labels=batch["labels"][None])
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.projector.fc1.weight.grad.abs().sum() > 0

    model.eval()
    model.save_pretrained(tmp_path / "vlm")
    reloaded = VLM.from_pretrained(str(tmp_path / "vlm")).eval()
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"][None], pixel_values=batch["pixel_values"], labels=batch["labels"][None])
        b = reloaded(input_ids=batch["input_ids"][None], pixel_values=batch["pixel_values"],
                     labels=batch["labels"][None])
    assert torch.equal(a.supervised_logits, b.supervised_logits)
    assert model.chat(str(image), QUESTION, max_new_tokens=4, min_new_tokens=4) == \
        reloaded.chat(str(image), QUESTION, max_new_tokens=4, min_new_tokens=4)


@pytest.mark.parametrize("kind", ["layernorm", "whiten"])
def test_the_projectors_input_norm_is_saved_with_the_model_and_chat_uses_it(toy_tokenizer, tmp_path, kind):
    torch.manual_seed(0)
    model = vlm_from_preset("tiny", toy_tokenizer, projector_input_norm=kind).eval()
    size = model.config.vision_config.hidden_size
    with torch.no_grad():  # fitted / trained-looking values, not the identity start
        if kind == "whiten":
            model.projector.norm.fit(torch.randn(500, size) @ torch.randn(size, size) + 3)
        else:
            model.projector.norm.weight.uniform_(0.2, 3.0)
            model.projector.norm.bias.normal_()
    image = tmp_path / "im.png"
    draw_image(str(image), 1, size=40)
    model.save_pretrained(tmp_path / "vlm")
    reloaded = VLM.from_pretrained(str(tmp_path / "vlm")).eval()
    assert reloaded.config.projector_input_norm == kind
    saved = {k: v for k, v in model.state_dict().items() if k.startswith("projector.norm.")}
    assert len(saved) == 2
    for key, value in saved.items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    answer = reloaded.chat(str(image), QUESTION, max_new_tokens=6, min_new_tokens=6)
    assert answer == model.chat(str(image), QUESTION, max_new_tokens=6, min_new_tokens=6)
    pixels = VLMProcessor.from_model(reloaded).pixel_values([Image.open(image).convert("RGB")])
    with torch.no_grad():
        features = reloaded.encode_images(pixels)
        reloaded.projector.norm = torch.nn.Identity()  # what chat would compute without the saved norm
        assert not torch.allclose(reloaded.encode_images(pixels), features)


def test_the_projectors_output_norm_is_the_llms_embedding_norm_and_survives_save_and_load(toy_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = vlm_from_preset("tiny", toy_tokenizer, projector_output_norm="embedding").eval()
    embedding_norm = model.language_model.get_input_embeddings().weight.norm(dim=-1).mean().item()
    assert model.config.projector_output_norm == pytest.approx(embedding_norm, rel=1e-3)
    image = tmp_path / "im.png"
    draw_image(str(image), 1, size=40)
    pixels = VLMProcessor.from_model(model).pixel_values([Image.open(image).convert("RGB")])
    with torch.no_grad():
        features = model.encode_images(pixels)
    assert torch.allclose(features.norm(dim=-1), torch.full(features.shape[:2], embedding_norm), rtol=1e-3)
    model.save_pretrained(tmp_path / "vlm")
    reloaded = VLM.from_pretrained(str(tmp_path / "vlm")).eval()
    assert reloaded.projector.output_norm == model.config.projector_output_norm
    answer = reloaded.chat(str(image), QUESTION, max_new_tokens=6, min_new_tokens=6)
    assert answer == model.chat(str(image), QUESTION, max_new_tokens=6, min_new_tokens=6)
    with torch.no_grad():
        assert torch.allclose(reloaded.encode_images(pixels), features, atol=1e-6)
        reloaded.projector.output_norm = None  # what chat would compute without the saved scale
        assert not torch.allclose(reloaded.encode_images(pixels), features, atol=1e-3)
    # The scale is a number saved in the config, not measured again: an LLM whose embeddings change later (SFT)
    # keeps the scale its projector was trained with.
    with torch.no_grad():
        model.language_model.get_input_embeddings().weight.mul_(5)
    model.save_pretrained(tmp_path / "vlm_later")
    later = VLM.from_pretrained(str(tmp_path / "vlm_later"))
    assert later.projector.output_norm == reloaded.config.projector_output_norm
    fixed = vlm_from_preset("tiny", toy_tokenizer, projector_output_norm=50.0).eval()
    with torch.no_grad():
        norms = fixed.encode_images(pixels).norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, 50.0), rtol=1e-4)


def test_whitening_gives_the_fitted_features_zero_mean_and_unit_scale():
    torch.manual_seed(0)
    # A large shared offset and one dominant direction, as a vision tower's features have.
    features = torch.randn(4000, 6) * torch.tensor([20.0, 1, 1, 0.5, 0.5, 0.1]) + 30
    whitening = Whitening(6)
    whitening.fit(features, shrinkage=0.0)
    white = whitening(features)
    assert white.mean(0).abs().max() < 1e-4
    assert torch.allclose(torch.cov(white.T), torch.eye(6), atol=1e-3)
    whitening.fit(features)  # shrinkage: the near-empty direction is not blown up to the others' scale
    variances = torch.cov(whitening(features).T).diag()
    assert variances[-1] < 0.1 < variances[0]


def test_a_model_without_the_input_norm_has_no_norm_weights(toy_tokenizer):
    model = vlm_from_preset("tiny", toy_tokenizer)
    assert not [key for key in model.state_dict() if key.startswith("projector.norm")]
    with pytest.raises(ValueError, match="projector_input_norm 'batchnorm'"):
        vlm_from_preset("tiny", toy_tokenizer, projector_input_norm="batchnorm")


# ---------------------------------------------------------------- forward and loss
@pytest.fixture(scope="module")
def model(toy_tokenizer):
    return tiny_vlm(toy_tokenizer)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    draw_image(str(path), 2, size=64)
    return Image.open(path).convert("RGB")


def encode(model, messages, images):
    processor = VLMProcessor.from_model(model)
    encoded = processor.encode_chat(messages)
    return {"input_ids": encoded["input_ids"][None], "labels": encoded["labels"][None],
            "pixel_values": processor.pixel_values(images)}


TURNS = [{"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": "a red circle"},
         {"role": "user", "content": "Yes?"}, {"role": "assistant", "content": "No"}]


def test_loss_on_supervised_positions_equals_full_logits_loss(model, image):
    batch = encode(model, TURNS, [image])
    with torch.no_grad():
        out = model(**batch)
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
        full_logits = model.language_model(inputs_embeds=embeds).logits
    reference = F.cross_entropy(full_logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100)
    assert torch.allclose(out.loss, reference, atol=1e-6)
    assert out.num_tokens == (batch["labels"] != -100).sum() and out.supervised_logits.shape[0] == out.num_tokens and out.logits is None


def test_image_features_land_on_the_placeholders(model, image):
    batch = encode(model, TURNS, [image])
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
        features = model.encode_images(batch["pixel_values"])
        text = model.language_model.get_input_embeddings()(batch["input_ids"])
    mask = batch["input_ids"][0] == model.config.image_token_id
    assert torch.equal(embeds[0, mask], features[0])
    assert torch.equal(embeds[0, ~mask], text[0, ~mask])


def test_image_token_and_feature_counts_must_agree(model, image):
    batch = encode(model, TURNS, [image])
    with pytest.raises(ValueError, match=r"hold 16 image tokens but the 2 images give 32 features"):
        model(input_ids=batch["input_ids"], pixel_values=torch.cat([batch["pixel_values"]] * 2))
    with pytest.raises(ValueError, match=r"hold 16 image tokens but no pixel_values"):
        model(input_ids=batch["input_ids"])


def test_tokenizer_without_image_token_gets_one_and_embeddings_grow(tmp_path):
    tokenizer = plain_bpe_tokenizer()
    before = len(tokenizer)
    model = tiny_vlm(tokenizer)
    assert len(model.tokenizer) > before
    assert model.language_model.get_input_embeddings().weight.shape[0] == len(model.tokenizer)
    assert model.config.text_config.vocab_size == len(model.tokenizer)


# ---------------------------------------------------------------- generation
GEN = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)  # min_new_tokens: compare 10 real tokens


def generate_ids(model, images, questions, histories=None, **kwargs):
    """Greedy new-token ids per request, through the same prompt encoding chat() uses."""
    processor = VLMProcessor.from_model(model)
    batch = processor.encode_generation_batch(images, questions, histories)
    out = model.generate(**batch, pad_token_id=processor.pad_token_id, **GEN, **kwargs)
    return out[:, batch["input_ids"].shape[1]:].tolist()


def test_greedy_with_and_without_cache_agree(model, image):
    with_cache = generate_ids(model, [image], [QUESTION])
    assert len(with_cache[0]) == 10
    assert with_cache == generate_ids(model, [image], [QUESTION], use_cache=False)
    assert model.chat(image, QUESTION, **GEN) == model.chat(image, QUESTION, use_cache=False, **GEN)


def test_batched_left_padded_generation_equals_one_by_one(model, image, tmp_path):
    other = tmp_path / "other.png"
    draw_image(str(other), 5, size=64)
    images = [image, None, str(other), image]
    questions = [QUESTION, "hi", "Is there a green triangle in the picture at all?", "Yes?"]
    histories = [None, None, None, [("What is this?", "a red circle")]]
    batched = generate_ids(model, images, questions, histories)
    single = [generate_ids(model, [i], [q], [h])[0] for i, q, h in zip(images, questions, histories)]
    assert batched == single
    assert model.batch_chat(images, questions, histories, **GEN) == \
        [model.chat(i, q, h, **GEN) for i, q, h in zip(images, questions, histories)]


def test_streaming_yields_the_same_answer(model, image):
    pieces = list(model.stream_chat(image, QUESTION, **GEN))
    assert len(pieces) > 1 and "".join(pieces).strip() == model.chat(image, QUESTION, **GEN)
    ids = generate_ids(model, [image], [QUESTION])[0]
    assert "".join(pieces).strip() == model.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_second_turn_sees_the_first(model, image):
    processor = VLMProcessor.from_model(model)
    batch = processor.encode_generation_batch([image], ["And now?"], [[(QUESTION, "a red circle")]])
    text = model.tokenizer.decode(batch["input_ids"][0])
    assert text.index("<|image_pad|>") < text.index(QUESTION) < text.index("a red circle") < text.index("And now?")
    assert text.count("<|image_pad|>") == model.config.num_image_tokens


def test_chat_session_reuses_the_cache_and_encodes_the_image_once(model, image):
    calls = []
    hook = model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        session = ChatSession(model, image)
        first = session.ask(QUESTION, **GEN)
        prompt_length = session._cache.get_seq_length()
        second = "".join(session.stream("And now?", **GEN)).strip()
    finally:
        hook.remove()
    assert calls == [1], "the follow-up must reuse the cached image, not encode it again"
    assert session._cache.get_seq_length() > prompt_length
    assert first == model.chat(image, QUESTION, **GEN)
    assert second == model.chat(image, "And now?", history=[(QUESTION, first)], **GEN)
    assert session.history == [(QUESTION, first), ("And now?", second)]


def test_a_session_whose_system_prompt_changes_encodes_the_image_again(model, image):
    """The shared prefix then ends before the image tokens: the cache cannot serve them (the demo sends its system
    prompt box with every message)."""
    session = ChatSession(model, image, system_prompt="You look at pictures.")
    first = session.ask(QUESTION, **GEN)
    session.system_prompt = "You answer in one word."
    second = session.ask("And now?", **GEN)
    assert second == model.chat(image, "And now?", history=[(QUESTION, first)],
                                system_prompt="You answer in one word.", **GEN)


def test_every_chat_entry_point_puts_its_inputs_on_the_models_device(model, image, monkeypatch):
    """Without a GPU: the model claims to live on the meta device and a spy stands in for generate."""
    from types import SimpleNamespace

    seen = []

    def spy(**kwargs):
        seen.append({key: value.device.type for key, value in kwargs.items() if torch.is_tensor(value)})
        ids = kwargs["input_ids"]
        sequences = torch.cat([torch.zeros(ids.shape, dtype=torch.long), torch.ones(ids.shape[0], 1,
                                                                                   dtype=torch.long)], 1)
        return SimpleNamespace(sequences=sequences, cache=None) if kwargs.get("return_dict_in_generate") else sequences

    monkeypatch.setattr(model, "generate", spy)
    monkeypatch.setattr(VLM, "device", property(lambda self: torch.device("meta")))
    model.chat(image, QUESTION)
    model.batch_chat([image, None], [QUESTION, "Hello?"])
    ChatSession(model, image).ask(QUESTION)
    assert len(seen) == 3 and all("pixel_values" in call for call in seen)
    assert all(set(call.values()) == {"meta"} for call in seen), seen
