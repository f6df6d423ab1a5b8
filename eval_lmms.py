"""Standard benchmarks (POPE, MME, MMBench, TextVQA, ...) through lmms-eval, the field's common harness: it owns the
datasets, prompts and scoring, so the numbers compare with those other models report.

    python eval_lmms.py --model mary_vlm --model_args pretrained=checkpoints/sft,dtype=bf16 \\
        --tasks pope,mme --batch_size 8 --output_path checkpoints/sft/lmms_eval
    bash scripts/eval_benchmarks.sh checkpoints/sft          # the recipe's suite, on every visible GPU

Every flag is lmms-eval's own (`python eval_lmms.py --help`); this file adds one model to its registry, "mary_vlm",
and hands the command line to lmms-eval. (The project is a folder of scripts, not an installed package, so
lmms-eval's entry-point plugins cannot find it; registering first is the route lmms-eval leaves for that.)

model_args: pretrained (a checkpoint folder or Hub id), dtype (auto | bf16 | fp16 | fp32), device (default: this
process's GPU, else the CPU), system_prompt (default: the checkpoint's own), max_tiles (default: the checkpoint's).

What the adapter does with a task's requests:
- generate_until: greedy unless the task sets temperature > 0, batched through `VLM.batch_chat` (the checkpoint's
  chat template and system prompt); max_new_tokens, temperature, top_p and num_beams come from the task, and the
  answer is cut at the first of the task's stop strings. Requests are grouped by their generation settings and
  sorted by length, so a batch never mixes settings.
- images of any size and mode (converted to RGB, resized by the checkpoint's image processor); text-only samples
  go without an image. A sample with several images or a video is refused with its task and document named: the
  model places one image per conversation.
- loglikelihood (multiple-choice tasks that score options): the summed log-probability of the continuation as the
  start of the assistant's reply (without the space lmms-eval puts before an option: a reply starts after the
  header's newline), and whether greedy decoding would produce it.
- generate_until_multi_round is not supported (no task of the recipe's suite uses it).
"""

from __future__ import annotations

import os
import sys

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from conversation import on_device
from processor import IGNORE_INDEX
from inference import load_for_inference

MODEL_NAME = "mary_vlm"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")


class MaryVLM(lmms):
    is_simple = True  # takes the task's prompt text and images (doc_to_text / doc_to_visual)

    def __init__(self, pretrained: str, dtype: str = "auto", device: str | None = None, batch_size: int | str = 1,
                 system_prompt: str | None = None, max_tiles: int | None = None, max_batch_size=None,
                 **unknown) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"{MODEL_NAME}: unknown model_args {sorted(unknown)}; it takes pretrained, dtype, "
                             f"device, batch_size, system_prompt, max_tiles")
        if not str(batch_size).isdigit():
            raise ValueError(f"{MODEL_NAME}: --batch_size {batch_size}: give a number of requests per batch")
        # lmms-eval splits the requests over the processes; each takes its own GPU, also when told just "cuda".
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
        self.model = load_for_inference(pretrained, str(self.device), dtype,
                                        None if max_tiles is None else int(max_tiles))
        self.processor = self.model.processor()
        self.batch_size = int(batch_size)
        self.system_prompt = system_prompt

    # ---------------------------------------------------------------- requests' images
    def image_of(self, doc_to_visual, task: str, split: str, doc_id: int):
        """The request's one image, or None for a text-only sample."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
        visuals = [v for v in flatten(visuals) if v is not None]
        if any(isinstance(v, str) and v.lower().endswith(VIDEO_SUFFIXES) for v in visuals):
            raise ValueError(f"{task} document {doc_id}: a video; {MODEL_NAME} answers about images only")
        if len(visuals) > 1:
            raise ValueError(f"{task} document {doc_id}: {len(visuals)} images; {MODEL_NAME} places one image per "
                             f"conversation, so multi-image tasks are unsupported")
        return visuals[0] if visuals else None

    # ---------------------------------------------------------------- generation
    def generation_kwargs(self, task_kwargs: dict) -> tuple[dict, list[str]]:
        """The task's generation settings as `generate` kwargs, and its stop strings."""
        settings = dict(task_kwargs)
        until = settings.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = settings.get("temperature") or 0
        kwargs = {"max_new_tokens": settings.get("max_new_tokens") or 128, "num_beams": settings.get("num_beams") or 1,
                  "do_sample": temperature > 0}
        if kwargs["do_sample"]:
            kwargs.update(temperature=temperature, top_p=settings.get("top_p"))
        return kwargs, until

    def generate_until(self, requests) -> list[str]:
        # Longest prompts first (an out-of-memory shows at once), grouped so one batch shares its settings.
        order = lmms_utils.Collator([r.args for r in requests], lambda args: (-len(args[0]), args[0]),
                                    grouping=True)
        answers = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc=MODEL_NAME)
        for chunk in order.get_batched(n=self.batch_size, batch_fn=None):
            contexts, task_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            images = [self.image_of(v, t, s, d) for v, t, s, d in zip(doc_to_visual, tasks, splits, doc_ids)]
            kwargs, until = self.generation_kwargs(task_kwargs[0])
            for text in self.model.batch_chat(images, list(contexts), system_prompt=self.system_prompt, **kwargs):
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                answers.append(text)
            progress.update(len(chunk))
        progress.close()
        return order.get_original(answers)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME}: multi-round generation tasks are unsupported")

    # ---------------------------------------------------------------- scoring given answers
    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for context, target, doc_to_visual, doc_id, task, split in tqdm([r.args for r in requests],
                                                                       disable=self.rank != 0, desc=MODEL_NAME):
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            reply = self.processor.tokenizer(continuation.lstrip(), add_special_tokens=False)["input_ids"]
            if not reply:  # nothing to score: log 1 = 0, and greedy decoding trivially "produces" it
                results.append((0.0, True))
                continue
            image = self.image_of(doc_to_visual, task, split, doc_id)
            prompt = self.processor.encode_generation_batch([image], [context], system_prompt=self.system_prompt)
            input_ids = torch.cat([prompt["input_ids"], torch.tensor([reply], dtype=torch.long)], dim=1)
            labels = torch.full_like(input_ids, IGNORE_INDEX)
            labels[:, -len(reply):] = torch.tensor(reply)
            output = self.model(**on_device(self.model, {"input_ids": input_ids, "labels": labels,
                                                         "pixel_values": prompt["pixel_values"]}))
            greedy = bool((output.supervised_logits.argmax(-1).cpu() == torch.tensor(reply)).all())
            results.append((-output.loss_sum.item(), greedy))
        return results


def flatten(visuals) -> list:
    """A task's visuals as a flat list: tasks return one image, a list, or lists of lists."""
    if not isinstance(visuals, (list, tuple)):
        return [] if visuals is None else [visuals]
    return [v for item in visuals for v in flatten(item)]


def register() -> None:
    """Make "mary_vlm" a model lmms-eval can load (its registry imports this module by name)."""
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest

    MODEL_REGISTRY_V2.register_manifest(ModelManifest(model_id=MODEL_NAME, simple_class_path="eval_lmms.MaryVLM"),
                                        overwrite=True)


def main(argv=None):
    from lmms_eval.__main__ import cli_evaluate

    register()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    return cli_evaluate()


if __name__ == "__main__":
    main()
