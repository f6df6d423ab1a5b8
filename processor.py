"""The processor: a conversation and its images -> the model's inputs, with the label masks for training.

The chat template renders the messages (the tokenizer's own, or Qwen2.5's ChatML for one without), each `<image>`
expands to the model's number of image tokens, and the labels supervise exactly the assistant replies and their
end-of-turn token, found by rendering the conversation turn by turn (never by searching token ids for a word). The
same class builds generation prompts, so training and inference tokenise a prompt identically. It imports neither
the model nor the data pipeline: both build on it.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from functools import cached_property

import torch
from PIL import ExifTags, Image, ImageOps

IGNORE_INDEX = -100  # the label of a position that is not supervised
IMAGE_PLACEHOLDER = "<image>"  # where an image goes in a record's text
IMAGE_TOKEN = "<|image_pad|>"  # what each placeholder expands to, num_image_tokens times
# Qwen's chat template injects "You are Qwen, created by Alibaba Cloud..." when no system turn is given; we always
# send one, in training and at inference, so the two prompts never differ.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5-Instruct's chat template without its tool-calling branch. Used for tokenizers that ship no template (the
# tiny preset's, GPT-2's) and in tests; a tokenizer with a template of its own keeps it.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHAT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPT_FORMATS = ("chat", "plain")


class DataError(ValueError):
    """A sample that cannot be trained on; the message names the file, the sample and the problem."""


# ==================================================================== tokenizers
def ensure_chat_tokens(tokenizer, image_token: str) -> int:
    """Give a tokenizer a chat template, a pad token and the image token if it lacks them; returns tokens added."""
    added = 0
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
        added += tokenizer.add_special_tokens({"additional_special_tokens": CHAT_SPECIAL_TOKENS[1:]},
                                              replace_extra_special_tokens=False)
        tokenizer.eos_token = "<|im_end|>"
    if image_token not in tokenizer.get_vocab():
        added += tokenizer.add_special_tokens({"additional_special_tokens": [image_token]},
                                              replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return added


def make_tokenizer(texts, vocab_size: int = 512, image_token: str = IMAGE_TOKEN):
    """A byte-level BPE tokenizer trained on `texts`, with Qwen's special tokens and chat template: what the
    offline presets use instead of downloading Qwen's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = CHAT_SPECIAL_TOKENS + [image_token]
    bpe = Tokenizer(models.BPE())
    # Each CJK character stays a token of its own: a small vocabulary should compose Chinese words, not memorise
    # whole phrases as single tokens.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=specials[1:])
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


# ==================================================================== images
def image_source(ref, image_dir: str | None, where: str):
    """What PIL opens for an image reference: a PIL image as it is, bytes as a stream, a path (relative to
    image_dir) once it is known to exist; datasets' Image feature ({"bytes", "path"}) by its bytes, else its path."""
    if isinstance(ref, dict):
        return image_source(ref.get("bytes") or ref.get("path"), image_dir, where)
    if isinstance(ref, (Image.Image, bytes, bytearray)):
        return ref if isinstance(ref, Image.Image) else io.BytesIO(ref)
    if isinstance(ref, str):
        path = ref if os.path.isabs(ref) or image_dir is None else os.path.join(image_dir, ref)
        if not os.path.isfile(path):
            raise DataError(f"{where}: image not found: {path}")
        return path
    raise DataError(f"{where}: unsupported image value of type {type(ref).__name__}")


def open_image(ref, image_dir: str | None, where: str) -> Image.Image:
    """Decode an image reference fully (so a truncated file fails here, not mid-batch) as RGB, upright: a phone
    photo's EXIF orientation is applied, as transformers' load_image does."""
    source = image_source(ref, image_dir, where)
    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        image.load()
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except Exception as error:
        raise DataError(f"{where}: cannot decode image {ref if isinstance(ref, str) else ''}: {error}") from None


def image_size(ref, image_dir: str | None, where: str) -> tuple[int, int]:
    """An image's upright (width, height) from its header, without decoding the pixels (cached features need no
    pixels): the size open_image returns, so the scan counts the views the processor will cut."""
    source = image_source(ref, image_dir, where)
    if isinstance(source, Image.Image):
        return upright_size(source)
    try:
        with Image.open(source) as image:
            return upright_size(image)
    except Exception as error:
        raise DataError(f"{where}: cannot read the size of image {ref if isinstance(ref, str) else ''}: "
                        f"{error}") from None


def upright_size(image: Image.Image) -> tuple[int, int]:
    """EXIF orientations 5 to 8 turn the stored pixels by 90 degrees: width and height swap once applied."""
    width, height = image.size
    return (height, width) if image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8) else (width, height)


# ==================================================================== dynamic resolution: tiles + a global view
def tile_grid(width: int, height: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(rows, cols) of tile x tile squares to cut an image into, at most max_tiles of them: the grid that keeps the
    most of the image's pixels once the image is scaled to fill it (upscaling earns nothing), then the one that
    wastes the least area (LLaVA-NeXT's rule). So a wide image gets a wide grid, and an image no bigger than one tile
    stays a single view instead of being blown up into blurry tiles."""
    best, best_key = (1, 1), None
    for rows in range(1, max_tiles + 1):
        for cols in range(1, max_tiles // rows + 1):
            scale = min(cols * tile / width, rows * tile / height)
            kept = min(width * height * scale * scale, width * height)
            key = (round(kept), -(rows * cols * tile * tile - kept))
            if best_key is None or key > best_key:
                best, best_key = (rows, cols), key
    return best


def num_views(grid: tuple[int, int]) -> int:
    """Views the tower encodes for an image cut into `grid`: its tiles plus a global view, or just the image."""
    rows, cols = grid
    return 1 if rows * cols == 1 else rows * cols + 1


def placeholder_text(grid: tuple[int, int], pads: str) -> str:
    rows, cols = grid
    if rows * cols == 1:
        return pads
    lines = ["".join(f"<tile {r},{c}>{pads}" for c in range(1, cols + 1)) for r in range(1, rows + 1)]
    return "\n".join(lines) + f"\n<global>{pads}"


def cut_tiles(image: Image.Image, grid: tuple[int, int], tile: int) -> list[Image.Image]:
    """The image resized to the grid (bicubic) and cut into its tiles, row by row."""
    rows, cols = grid
    if rows * cols == 1:
        return []
    resized = image.resize((cols * tile, rows * tile), Image.BICUBIC)
    return [resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
            for r in range(rows) for c in range(cols)]


# ==================================================================== chat template -> tokens and labels
def pad_rows(rows: list, value: int, width: int | None = None, left: bool = False) -> torch.Tensor:
    """Token rows of different lengths as one (rows, width) long tensor, filled with `value` on the right (training
    batches) or on the left (generation prompts, so every row's next token comes last); width: the longest row's."""
    width = width or max(len(row) for row in rows)
    padded = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        row = torch.as_tensor(row, dtype=torch.long)
        if left:
            padded[i, width - len(row):] = row
        else:
            padded[i, :len(row)] = row
    return padded


@dataclass
class VLMProcessor:
    """Tokenizer + image processor + the model's image geometry: everything that turns a conversation into inputs."""

    tokenizer: object
    image_processor: object
    num_image_tokens: int
    image_token: str = IMAGE_TOKEN
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_length: int = 2048
    max_tiles: int = 1  # dynamic resolution: up to this many encoder-sized tiles per image, plus a global view
    tile_size: int | None = None  # the side of the square the vision tower sees (needed when max_tiles > 1)
    # "chat": the tokenizer's chat template. "plain": LLaVA's stage-1 format, the image tokens followed by the reply
    # and the end token, no template, no system prompt, no question (a caption is all stage 1 teaches).
    prompt_format: str = "chat"
    image_token_id: int = field(init=False)

    def __post_init__(self):
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format {self.prompt_format!r}: choose one of {PROMPT_FORMATS}")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_model(cls, model, max_length: int = 2048) -> VLMProcessor:
        config = model.config
        return cls(model.tokenizer, model.image_processor, config.num_image_tokens, config.image_token,
                   config.system_prompt, max_length, config.max_tiles, config.input_size, config.prompt_format)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @cached_property
    def stop_token_ids(self) -> list[int]:
        """The token that ends an assistant turn in this template (Qwen: <|im_end|>), plus the tokenizer's eos."""
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                 {"role": "assistant", "content": "REPLY"}]
        text = self.tokenizer.apply_chat_template(probe, tokenize=False)
        end = text[text.rindex("REPLY") + len("REPLY"):].strip()
        ids = self.tokenizer(end, add_special_tokens=False)["input_ids"][:1] if end else []
        return list(dict.fromkeys(ids + [self.tokenizer.eos_token_id]))

    def with_system_prompt(self, messages: list[dict], system_prompt: str | None = None) -> list[dict]:
        if messages and messages[0]["role"] == "system":
            return messages
        return [{"role": "system", "content": system_prompt or self.system_prompt}] + messages

    # ---------------------------------------------------------------- images: views and their placeholders
    def grid_of(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of tiles for an image of this (width, height); (1, 1): one view, as without tiling."""
        if self.max_tiles <= 1:
            return (1, 1)
        return tile_grid(*image_size, self.max_tiles, self.tile_size)

    def image_tokens(self, grid: tuple[int, int]) -> int:
        """Image tokens for an image cut into `grid`: one view per tile, plus the global view when there are tiles."""
        return self.num_image_tokens * num_views(grid)

    def expand_images(self, messages: list[dict], grids: list[tuple[int, int]] | None = None) -> list[dict]:
        """Each `<image>` -> its image tokens; `grids` gives each image's tile grid in placeholder order (None: one
        view each). A tiled image's views are told apart by text the tokenizer reads, one line per row of tiles,
        then the global view:  <tile 1,1>PADS<tile 1,2>PADS / <tile 2,1>PADS<tile 2,2>PADS / <global>PADS."""
        pads = self.image_token * self.num_image_tokens
        if grids is None:
            return [{**m, "content": m["content"].replace(IMAGE_PLACEHOLDER, pads)} for m in messages]
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if placeholders != len(grids):
            raise DataError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the text for {len(grids)} "
                            f"image(s)")
        remaining = iter(grids)

        def expand(text: str) -> str:
            pieces = text.split(IMAGE_PLACEHOLDER)
            return pieces[0] + "".join(placeholder_text(next(remaining), pads) + piece for piece in pieces[1:])

        return [{**m, "content": expand(m["content"])} for m in messages]

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Full text of the conversation and the character spans to supervise: each assistant reply plus its
        end-of-turn token (not the newline after it). Each span comes from rendering the conversation up to that
        turn, so it follows whatever the template writes around a reply."""
        template = self.tokenizer.apply_chat_template
        text, spans = "", []
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                header = template(messages[:k], tokenize=False, add_generation_prompt=True)
                if not header.startswith(text):
                    raise ValueError("the chat template's generation prompt does not extend the conversation so far")
            rendered = template(messages[: k + 1], tokenize=False)
            if not rendered.startswith(text):
                raise ValueError(f"the chat template re-renders earlier turns when turn {k} is added; per-turn "
                                 f"label masks need a template whose output only grows")
            if message["role"] == "assistant":
                spans.append((len(header), len(rendered.rstrip())))
            text = rendered
        return text, spans

    def encode_chat(self, messages: list[dict], where: str = "sample", last_reply_only: bool = False,
                    grids: list[tuple[int, int]] | None = None) -> dict:
        """input_ids and labels for a training conversation whose `<image>` placeholders are still unexpanded
        (`grids`: each image's tile grid, None for one view each). With last_reply_only, earlier replies are
        context, not targets (preference pairs)."""
        if self.prompt_format == "plain":
            input_ids, labels = self._plain_tokens(messages, where, grids)
            self._check_length(input_ids, messages, where, grids)
            return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
        text, spans = self.render(self.expand_images(self.with_system_prompt(messages), grids))
        spans = spans[-1:] if last_reply_only else spans
        # Tokenised whole, the text gives exactly the prompt inference tokenises, as long as no token straddles a
        # reply's start or end (the common case: one tokenisation, labels from its offsets). Where one does (on
        # Qwen's vocabulary the header's newline and a reply's leading newline merge into one token that neither
        # side owns), the conversation is tokenised boundary by boundary instead.
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        boundaries = [boundary for span in spans for boundary in span]
        if any(start < boundary < end for start, end in encoding["offset_mapping"] for boundary in boundaries):
            input_ids, labels = self._tokens_boundary_by_boundary(text, spans)
        else:
            input_ids = encoding["input_ids"]
            labels = [token if any(start <= offset < end for start, end in spans) else IGNORE_INDEX
                      for token, (offset, _) in zip(input_ids, encoding["offset_mapping"])]
        self._check_length(input_ids, messages, where, grids)
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}

    def _check_length(self, input_ids: list[int], messages: list[dict], where: str, grids) -> None:
        if len(input_ids) > self.max_length:
            num_images = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
            images = (f"{num_images} x {self.num_image_tokens} image tokens" if grids is None else
                      f"{sum(map(self.image_tokens, grids))} image tokens in the views of {num_images} image(s)")
            raise DataError(f"{where}: {len(input_ids)} tokens (with {images}) exceed max_length {self.max_length}; "
                            f"cutting it would cut image tokens or a reply. Raise --max_length or pass "
                            f"--skip_bad_samples to drop such samples")

    def plain_prompt(self, num_images: int, grids: list[tuple[int, int]] | None = None) -> str:
        """The plain format's prompt: the tokenizer's start token where it has one (as LLaVA's Llama prompt starts
        with <s>), then each image's tokens (and tile markers), nothing else. An LLM's first position becomes the
        attention sink that every later token leans on; a text token holds it as in pretraining, where an image
        token would have to learn to."""
        images = self.expand_images([{"role": "user", "content": IMAGE_PLACEHOLDER * num_images}], grids)
        return (self.tokenizer.bos_token or "") + images[0]["content"]

    def _plain_tokens(self, messages: list[dict], where: str, grids) -> tuple[list[int], list[int]]:
        """LLaVA's plain format: the images' tokens, then the one reply and the end token, which alone are
        supervised. The user's words are dropped (stage 1 teaches captions, whatever the record asks)."""
        body = [m for m in messages if m["role"] != "system"]
        num_images = body[0]["content"].count(IMAGE_PLACEHOLDER)
        if len(body) != 2 or not num_images:
            raise DataError(f"{where}: the plain format (stage 1) takes one user turn with its image and one reply; "
                            f"this record has {len(body)} turns and {num_images} image(s). Pass --prompt_format chat "
                            f"for conversations")
        prompt = self.tokenizer(self.plain_prompt(num_images, grids), add_special_tokens=False)["input_ids"]
        reply = self.tokenizer(body[1]["content"], add_special_tokens=False)["input_ids"]
        reply.append(self.tokenizer.eos_token_id)
        return prompt + reply, [IGNORE_INDEX] * len(prompt) + reply

    def _tokens_boundary_by_boundary(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """The tokens up to each boundary are those of the text up to it, tokenised whole (before a reply, the
        prompt as inference tokenises it); where that would rewrite tokens already placed, the text from the last
        boundary is tokenised on its own. (Tokenising every piece on its own would add a word-start marker to each
        reply with SentencePiece-style tokenizers, Llama-2's and Mistral's.)"""
        input_ids, labels, position = [], [], 0
        for start, end in [*spans, (len(text), len(text))]:
            for boundary, supervised in ((start, False), (end, True)):
                if boundary == position:
                    continue
                ids = self.tokenizer(text[:boundary], add_special_tokens=False)["input_ids"]
                if ids[:len(input_ids)] == input_ids:
                    new = ids[len(input_ids):]
                else:
                    new = self.tokenizer(text[position:boundary], add_special_tokens=False)["input_ids"]
                input_ids += new
                labels += new if supervised else [IGNORE_INDEX] * len(new)
                position = boundary
        return input_ids, labels

    def grids(self, images: list) -> list[tuple[int, int]] | None:
        """Each image's tile grid (PIL images or their (width, height)); None when nothing is tiled."""
        if self.max_tiles <= 1:
            return None
        return [self.grid_of(image.size if isinstance(image, Image.Image) else image) for image in images]

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor | None:
        """Every view of every image, in placeholder order: an image's tiles row by row, then its global view (the
        whole image as the image processor makes it, which is the only view of an image that is not tiled)."""
        if not images:
            return None
        whole = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        grids = self.grids(images)
        if grids is None or all(num_views(grid) == 1 for grid in grids):
            return whole
        tiles = [tile for image, grid in zip(images, grids) for tile in cut_tiles(image, grid, self.tile_size)]
        # The tiles are already the tower's size: normalised only, never resized or cropped again.
        as_is = {key: False for key in ("do_resize", "do_center_crop") if getattr(self.image_processor, key, False)}
        tiled = iter(self.image_processor(images=tiles, return_tensors="pt", **as_is)["pixel_values"])
        views = []
        for i, grid in enumerate(grids):
            views += [next(tiled) for _ in range(num_views(grid) - 1)] + [whole[i]]
        return torch.stack(views)

    def encode_sample(self, sample, image_dir: str | None, decode_images: bool = True) -> dict:
        """input_ids, labels, pixel_values; for a preference sample also rejected_input_ids / rejected_labels,
        each supervising only its final reply. Without decode_images, pixel_values is None (cached features)."""
        images = [open_image(ref, image_dir, sample.where) for ref in sample.images] if decode_images else []
        grids = None
        if self.max_tiles > 1:  # the tile grids come from the image sizes (a header read, with cached features)
            grids = self.grids(images if decode_images else
                               [image_size(ref, image_dir, sample.where) for ref in sample.images])
        pair = sample.rejected is not None
        encoded = self.encode_chat(sample.messages, sample.where, last_reply_only=pair, grids=grids)
        if pair:
            rejected = sample.messages[:-1] + [{"role": "assistant", "content": sample.rejected}]
            for key, value in self.encode_chat(rejected, sample.where, last_reply_only=True, grids=grids).items():
                encoded[f"rejected_{key}"] = value
        encoded["pixel_values"] = self.pixel_values(images)
        return encoded

    # ---------------------------------------------------------------- generation
    def generation_messages(self, image, question: str, history: list | None) -> list[dict]:
        messages = []
        for user, assistant in history or []:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": question})
        if image is not None and not any(IMAGE_PLACEHOLDER in m["content"] for m in messages):
            messages[0] = {"role": "user", "content": IMAGE_PLACEHOLDER + "\n" + messages[0]["content"]}
        return messages

    def encode_generation_batch(self, images: list, questions: list[str], histories: list | None = None,
                                system_prompt: str | None = None) -> dict:
        """Left-padded prompts ending in the assistant header, so every row's next token is its answer's first."""
        histories = histories or [None] * len(questions)
        rows, pixel_images = [], []
        for image, question, history in zip(images, questions, histories, strict=True):
            image = None if image is None else open_image(image, None, "chat input")
            grids = self.grids([image] if image is not None else [])
            if self.prompt_format == "plain":  # a stage-1 model continues from the image: it captions it
                if image is None:
                    raise ValueError("this model was trained in the plain format (stage 1): it describes an image "
                                     "and takes no text-only question")
                text = self.plain_prompt(1, grids)
            else:
                messages = self.expand_images(self.with_system_prompt(
                    self.generation_messages(image, question, history), system_prompt), grids)
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if image is not None:
                pixel_images.append(image)
        return {"input_ids": pad_rows(rows, self.pad_token_id, left=True),
                "attention_mask": pad_rows([[1] * len(row) for row in rows], 0, left=True),
                "pixel_values": self.pixel_values(pixel_images)}
