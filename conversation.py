"""Conversation with a VLM: one answer, a batch of them, a stream, and a multi-turn session whose KV cache carries
over between turns. `VLM.chat`, `VLM.batch_chat` and `VLM.stream_chat` call into it; the demo uses ChatSession.

Every entry point puts its inputs on the model's device, the images in the vision tower's dtype: a path that moves
only the token ids works on a CPU and fails at the first question on a GPU.
"""

from __future__ import annotations

import threading
from typing import Iterator

import torch
from transformers import TextIteratorStreamer

from processor import open_image


def on_device(model, batch: dict) -> dict:
    """Every tensor of a batch on the model's device (the images in the vision tower's dtype too)."""
    moved = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            dtype = model.vision_model.dtype if key == "pixel_values" else None
            value = value.to(model.device, dtype=dtype)
        moved[key] = value
    return moved


@torch.no_grad()
def batch_chat(model, images: list, questions: list[str], histories: list | None = None,
               system_prompt: str | None = None, **generation_kwargs) -> list[str]:
    """Answer several (image, question[, history]) requests in one left-padded batch."""
    processor = model.processor()
    batch = on_device(model, processor.encode_generation_batch(images, questions, histories, system_prompt))
    output = model.generate(**batch, **generation_defaults(processor, generation_kwargs))
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    return [text.strip() for text in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


class ChatSession:
    """A multi-turn conversation whose KV cache carries over between turns: the image is encoded once, and each
    follow-up question only runs its own new tokens through the model.

        session = ChatSession(model, image)
        session.ask("What is in the picture?")
        for piece in session.stream("And what colour is it?"):
            print(piece, end="")
    """

    def __init__(self, model, image=None, system_prompt: str | None = None):
        self.model, self.system_prompt = model, system_prompt
        self.image = None if image is None else open_image(image, None, "chat input")
        self.history: list[tuple[str, str]] = []
        self._ids: torch.Tensor | None = None  # every token the cache holds, prompt and answers
        self._cache = None

    @torch.no_grad()
    def ask(self, question: str, **generation_kwargs) -> str:
        model, processor = self.model, self.model.processor()
        batch = on_device(model, processor.encode_generation_batch([self.image], [question], [self.history],
                                                                   self.system_prompt))
        input_ids = batch["input_ids"]
        kwargs = {"pixel_values": batch["pixel_values"]}
        reused = self._reusable_prefix(input_ids)
        if reused:  # the image and earlier turns are in the cache already: only the new tokens are computed
            surplus = self._cache.get_seq_length() - reused
            if surplus:
                self._cache.crop(-surplus)
            kwargs = {"cache": self._cache}
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                return_dict_in_generate=True,
                                **generation_defaults(processor, generation_kwargs), **kwargs)
        self._ids, self._cache = output.sequences, output.cache
        answer = processor.tokenizer.decode(output.sequences[0, input_ids.shape[1]:], skip_special_tokens=True)
        self.history.append((question, answer.strip()))
        return answer.strip()

    def stream(self, question: str, **generation_kwargs) -> Iterator[str]:
        """ask(), yielding the answer's text piece by piece."""
        yield from stream(lambda streamer: self.ask(question, streamer=streamer, **generation_kwargs),
                          self.model.processor().tokenizer)

    def _reusable_prefix(self, input_ids: torch.Tensor) -> int:
        """How many leading tokens the cache can serve (at least one new token must remain to be computed). Zero
        unless the shared prefix covers every image token: a step from the cache encodes no image (a changed system
        prompt, say, ends the shared prefix before the image)."""
        if self._cache is None:
            return 0
        cached = self._ids[0, : self._cache.get_seq_length()]
        width = min(len(cached), input_ids.shape[1] - 1)
        same = int((cached[:width] == input_ids[0, :width]).long().cumprod(0).sum())
        image_positions = (input_ids[0] == self.model.config.image_token_id).nonzero()
        return 0 if len(image_positions) and same <= int(image_positions[-1]) else same


def generation_defaults(processor, generation_kwargs: dict) -> dict:
    """Greedy, up to 128 new tokens, stopping at the template's end-of-turn token; the caller's kwargs win."""
    kwargs = {"max_new_tokens": 128, "do_sample": False, "eos_token_id": processor.stop_token_ids,
              "pad_token_id": processor.pad_token_id, **generation_kwargs}
    if not kwargs["do_sample"]:  # greedy: silence the sampling settings a generation config may carry
        for key in ("temperature", "top_p", "top_k"):
            kwargs.setdefault(key, None)
    return kwargs


def stream(generate, tokenizer) -> Iterator[str]:
    """Run generate(streamer) in a thread and yield its text as it arrives; re-raise its error here."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors = []

    def run():
        try:
            generate(streamer)
        except Exception as error:  # handed to the consumer, which re-raises it below
            errors.append(error)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]
