"""Data: records -> validated conversations -> encoded samples -> padded (or packed) batches.

One path serves every stage. A record (LLaVA JSON/JSONL, parquet, or a saved `datasets` folder) becomes a list of
messages and its image references, checked up front; the processor (processor.py) turns a sample into input ids,
labels and pixel values when a batch needs it; collate pads or packs the batch.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from processor import (IGNORE_INDEX, IMAGE_PLACEHOLDER, DataError, VLMProcessor, image_size, image_source,
                       num_views, pad_rows)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_COLUMNS = ("image", "images", "image_bytes")


# ==================================================================== records
@dataclass
class Sample:
    """One conversation as the model sees it, before tokenisation."""

    messages: list[dict]
    images: list  # paths, bytes, PIL images or datasets Image dicts; decoded lazily
    where: str  # "file: sample i (id=...)" for error messages
    rejected: str | None = None  # preference data: the dispreferred final reply (messages end with the chosen one)


def load_records(path: str):
    """A `datasets.Dataset` from LLaVA JSON/JSONL, parquet, a folder written by `Dataset.save_to_disk`, or a folder
    of parquet files as `hf download` leaves a Hub dataset (RLAIF-V), read in name order. Image columns stay
    undecoded ({"bytes", "path"}) until a batch needs them: datasets would otherwise decode every image of every row
    read, the start-up scan's included."""
    import datasets

    if not os.path.exists(path):
        raise DataError(f"{path}: data file not found")
    if os.path.isdir(path) and _is_saved_dataset(path):
        table = datasets.load_from_disk(path)
    elif os.path.isdir(path) or path.endswith(".parquet"):
        files = data_files(path)
        try:
            table = datasets.Dataset.from_parquet(files)
        except Exception:
            _check_parquet_files(files)  # pyarrow's errors name the damage, not the file
            raise
    elif path.endswith((".json", ".jsonl")):
        try:
            table = datasets.Dataset.from_json(path)
        except Exception as error:
            # datasets reports a syntax error without its position: find the line. (Only on failure: parsing a
            # 595K-record file in Python takes 14 s and 1.7 GB.) Valid JSON that still fails gets one line too.
            _check_json_syntax(path)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(f"{path}: valid JSON, but datasets cannot read it as a table of records: {reason}") \
                from None
    else:
        raise DataError(f"{path}: unknown data format (expected .json, .jsonl, .parquet or a saved datasets folder)")
    for column in IMAGE_COLUMNS:
        feature = table.features.get(column)
        if isinstance(feature, datasets.Image):
            table = table.cast_column(column, datasets.Image(decode=False))
        elif isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
            table = table.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return table


def data_files(path: str) -> list[str]:
    """The files load_records reads for `path`, in the order it reads them."""
    if not os.path.isdir(path):
        return [path]
    files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names
                   if not _hidden(folder, path))
    if _is_saved_dataset(path):
        return files
    parquet = [name for name in files if name.endswith(".parquet")]
    if not parquet:
        raise DataError(f"{path}: no parquet files in it, and not a folder written by Dataset.save_to_disk")
    return parquet


def record_names(path: str, count: int) -> list[str]:
    """What an error calls each of the `count` records load_records read from `path`: its record number, or, in
    parquet files, the file and the row in it (a folder of shards is otherwise one long count)."""
    import pyarrow.parquet as pq

    files = data_files(path)
    if not all(file.endswith(".parquet") for file in files):
        return [f"{path}: record {i}" for i in range(count)]
    return [f"{file}: row {i}" for file in files for i in range(pq.ParquetFile(file).metadata.num_rows)]


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in ("dataset_info.json", "state.json"))


def _hidden(folder: str, root: str) -> bool:
    """Inside a dot-folder below root (`hf download --local-dir` keeps its .cache/ there)."""
    return any(part.startswith(".") for part in os.path.relpath(folder, root).split(os.sep) if part != ".")


def _check_parquet_files(files: list[str]) -> None:
    import pyarrow.parquet as pq

    for file in files:
        try:
            pq.ParquetFile(file)
        except Exception as error:
            raise DataError(f"{file}: not a readable parquet file: {error}") from None


def _check_json_syntax(path: str) -> None:
    """datasets' JSON reader reports syntax errors without a position; find the line ourselves."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        json.loads(text)
        return
    except json.JSONDecodeError as whole_error:
        lines = text.splitlines()
        if path.endswith(".jsonl") or (lines and lines[0].lstrip().startswith("{") and len(lines) > 1):
            for number, line in enumerate(lines, 1):
                try:
                    if line.strip():
                        json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: malformed JSON line: {error.msg} "
                                    f"(column {error.colno})") from None
            return
        raise DataError(f"{path}:{whole_error.lineno}: malformed JSON: {whole_error.msg} "
                        f"(column {whole_error.colno})") from None


def parse_record(record: dict, where: str) -> Sample:
    """Check a record's structure and turn it into messages; raise DataError naming `where` on any problem."""
    where = f"{where} (id={record['id']})" if record.get("id") is not None else where
    turns = record.get("conversations", record.get("messages"))
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: 'conversations' is a string but not JSON: {error.msg}") from None
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: no 'conversations' (or 'messages') list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {i} is not an object")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role not in ROLES:
            raise DataError(f"{where}: turn {i} has unknown role {role!r} (expected one of {sorted(ROLES)})")
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {i} has no text ('value' or 'content')")
        messages.append({"role": ROLES[role], "content": content})
    _check_roles(messages, where)
    images = _image_refs(record)
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders != len(images):
        raise DataError(f"{where}: {placeholders} '<image>' placeholders for {len(images)} images "
                        f"(each image needs exactly one '<image>' in a user turn)")
    if any(IMAGE_PLACEHOLDER in m["content"] for m in messages if m["role"] != "user"):
        raise DataError(f"{where}: '<image>' outside a user turn")
    return Sample(messages, images, where)


def parse_preference_record(record: dict, where: str) -> Sample:
    """A preference pair: RLAIF-V style {"image", "question", "chosen", "rejected"}, or LLaVA style with
    "conversations" holding the shared context (ending with the user turn) plus "chosen" / "rejected" replies."""
    named = f"{where} (id={record['id']})" if record.get("id") is not None else where
    chosen, rejected = record.get("chosen"), record.get("rejected")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{named}: '{key}' is missing or empty")
    if chosen.strip() == rejected.strip():
        raise DataError(f"{named}: 'chosen' and 'rejected' are identical; the pair teaches nothing")
    context = record.get("conversations", record.get("messages"))
    if isinstance(context, str):
        try:
            context = json.loads(context)
        except json.JSONDecodeError as error:
            raise DataError(f"{named}: 'conversations' is a string but not JSON: {error.msg}") from None
    if context is None:
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{named}: no 'question' (or 'conversations' context)")
        if _image_refs(record) and IMAGE_PLACEHOLDER not in question:
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
        context = [{"from": "human", "value": question}]
    if not isinstance(context, list) or not context:
        raise DataError(f"{named}: 'conversations' must be a non-empty list ending with the user's turn")
    sample = parse_record({**record, "conversations": list(context) + [{"from": "gpt", "value": chosen}]}, where)
    sample.rejected = rejected
    return sample


def _check_roles(messages: list[dict], where: str) -> None:
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DataError(f"{where}: turn {i + len(messages) - len(body)} is {message['role']!r} where "
                            f"{expected!r} was expected (turns must alternate user/assistant)")
    if not body or body[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant reply")


def _image_refs(record: dict) -> list:
    for column in IMAGE_COLUMNS:
        value = record.get(column)
        if value is None or (isinstance(value, (str, list)) and not value):
            continue
        return list(value) if isinstance(value, list) else [value]
    return []


# ==================================================================== dataset and collate
@dataclass
class ScanPlan:
    """How the start-up scan of a dataset is shared out. This process checks every world_size-th sample from its
    rank on, in `workers` loader processes; `gather` joins every process's results (an all-gather under torchrun);
    the result is kept in the file `cache` for these data files, so that a resume reads it instead of scanning;
    `agree` gives every rank rank 0's verdict on that kept result (a broadcast under torchrun)."""
    rank: int = 0
    world_size: int = 1
    workers: int = 0
    gather: Callable[[list], list] | None = None
    cache: str | None = None
    agree: Callable[[object], object] | None = None  # rank 0's value, on every rank


class ConversationDataset(torch.utils.data.Dataset):
    """Records from one or more files, validated up front and encoded lazily.

    The start-up scan parses every record and checks that its image files exist (no decoding: ~30 us a sample),
    shared over ranks and workers (see ScanPlan). A problem stops the run with a message naming file and sample;
    with skip_bad_samples such samples are dropped and counted instead, and so is any sample that fails later, when
    a batch encodes it (an undecodable image, too many tokens): it leaves its batch, which is never refilled with
    another sample."""

    def __init__(self, paths: list[str], processor: VLMProcessor, image_dir: str | None = None,
                 skip_bad_samples: bool = False, validate: bool = True, parse=parse_record,
                 scan: ScanPlan | None = None):
        self.processor, self.image_dir, self.parse = processor, image_dir, parse
        self.skip_bad_samples, self.scan = skip_bad_samples, scan or ScanPlan()
        self.tables = [(path, load_records(path)) for path in paths]
        self.index = [(t, i) for t, (_, table) in enumerate(self.tables) for i in range(len(table))]
        # Filled by the structural scan, which parses every record anyway: length estimates and the views the tower
        # encodes per sample (one per image, more with tiling).
        self.lengths = self.view_counts = None
        self.unusable: set[int] = set()  # positions found bad after the scan (stage-1 feature caching)
        if not validate:  # check_data() reports every problem itself
            return
        structure = self.structure_scan()
        problems = _problems(structure)
        if problems and not skip_bad_samples:
            raise DataError(_problem_report(problems, len(self.index)))
        self.skipped = problems
        bad = {position for position, _ in problems}
        keep = [position for position in range(len(self.index)) if position not in bad]
        self.index = [self.index[position] for position in keep]
        self.lengths = [structure[position]["length"] for position in keep]
        self.view_counts = [structure[position]["views"] for position in keep]
        if problems and self.scan.rank == 0:
            print(f"skipping {len(problems)} bad samples of {len(self.index) + len(problems)}; first: "
                  f"{problems[0][1]}")
        if not self.index:
            raise DataError(f"no usable samples in {', '.join(paths)}")

    def structure_scan(self) -> list[dict]:
        """Every sample's structural check, in position order: from the cache when it was made for these data
        files, else shared over the plan's processes and workers."""
        plan, key = self.scan, self.fingerprint()
        cached = None
        if plan.cache and os.path.exists(plan.cache):
            with open(plan.cache) as f:
                cached = json.load(f)
            if cached.get("key") != key or len(cached["samples"]) != len(self.index):
                cached = None
        if plan.agree is not None:  # rank 0's files decide, or ranks that disagree would wait for each other
            cached = plan.agree(cached)
        if cached is not None:
            return [{"position": p, "error": e, "length": n, "views": k}
                    for p, (e, n, k) in enumerate(cached["samples"])]
        results = self.check_all(True, range(plan.rank, len(self.index), plan.world_size), plan.workers,
                                 progress=plan.rank == 0)
        if plan.gather is not None:
            results = plan.gather(results)
        results.sort(key=lambda r: r["position"])
        if plan.cache and plan.rank == 0:
            os.makedirs(os.path.dirname(plan.cache) or ".", exist_ok=True)
            with open(plan.cache + ".tmp", "w") as f:
                json.dump({"key": key, "samples": [(r["error"], r.get("length"), r.get("views"))
                                                   for r in results]}, f)
            os.replace(plan.cache + ".tmp", plan.cache)
        return results

    def fingerprint(self) -> str:
        """What the structural scan's result depends on: every data file read (path, size, time), the image folder,
        the record format and the image token count in the length estimates."""
        files = [(name, os.path.getsize(name), os.path.getmtime(name)) for path, _ in self.tables
                 for name in data_files(path)]
        return json.dumps([files, self.image_dir, self.parse.__name__, self.processor.num_image_tokens,
                           self.processor.max_tiles, self.processor.tile_size])

    def sample(self, position: int) -> Sample:
        table_index, row = self.index[position]
        path, table = self.tables[table_index]
        return self.parse(table[row], f"{path}: sample {row}")

    def __len__(self) -> int:
        return len(self.index)

    def length_estimate(self, position: int) -> int:
        """A cheap stand-in for the token count (no tokenizer, no image decoding), for --group_by_length:
        characters of text, plus the image tokens counted as four characters each."""
        if self.lengths is not None:
            return self.lengths[position]
        return self._estimate_length(self.sample(position))

    def _estimate_length(self, sample: Sample, views: int | None = None) -> int:
        text = sum(len(message["content"]) for message in sample.messages) + len(sample.rejected or "")
        return text + 4 * self.processor.num_image_tokens * (len(sample.images) if views is None else views)

    def _views(self, sample: Sample) -> int:
        """Views the tower encodes for the sample: one per image, or with tiling each image's tiles and global view
        (the tile grid comes from the image's size, read from its header)."""
        if self.processor.max_tiles <= 1:
            return len(sample.images)
        sizes = [image_size(ref, self.image_dir, sample.where) for ref in sample.images]
        return sum(num_views(grid) for grid in self.processor.grids(sizes))

    feature_cache = None  # set by feature_cache.attach_feature_cache: stage-1 tower outputs, one row per view

    def __getitem__(self, position: int) -> dict | None:
        """The encoded sample; None for one that cannot be used when skip_bad_samples is on (collate drops it)."""
        try:
            if position in self.unusable:
                raise DataError(f"{self.sample(position).where}: its images could not be encoded for the cache")
            if self.feature_cache is None:
                return self.processor.encode_sample(self.sample(position), self.image_dir)
            item = self.processor.encode_sample(self.sample(position), self.image_dir, decode_images=False)
            item["vision_features"] = self.feature_cache.features(position)
            return item
        except DataError as error:
            if self.skip_bad_samples:
                print(f"skipping a bad sample: {error}", file=sys.stderr)
                return None
            if torch.utils.data.get_worker_info() is not None:
                return Problem(str(error))  # raised by the main process, which gets it as it was (raise_problem)
            raise

    def check_all(self, check_structure_only: bool, positions=None, workers: int = 0,
                  progress: bool = False) -> list[dict]:
        """check() of the samples at `positions` (all by default), in `workers` loader processes."""
        positions = range(len(self)) if positions is None else positions
        loader = torch.utils.data.DataLoader(_Checks(self, check_structure_only, positions), batch_size=256,
                                             num_workers=workers, collate_fn=list,
                                             generator=torch.Generator())  # leaves the global RNG alone
        bar = tqdm(loader, desc="checking samples" if check_structure_only else "checking samples (decoding)",
                   unit="batch", disable=not progress)
        return [result for batch in bar for result in batch]

    def check(self, position: int, check_structure_only: bool) -> dict:
        """What checking one sample finds: its error, or its token, reply and image counts."""
        result = {"position": position, "error": None}
        try:
            sample = self.sample(position)
            if check_structure_only:
                for ref in sample.images:
                    if isinstance(ref, str):  # the file is there (decoded only when its batch comes)
                        image_source(ref, self.image_dir, sample.where)
                views = self._views(sample)
                if views * self.processor.num_image_tokens > self.processor.max_length:  # known before any batch
                    raise DataError(f"{sample.where}: its {views} image view(s) alone take "
                                    f"{views * self.processor.num_image_tokens} tokens, more than max_length "
                                    f"{self.processor.max_length}. Raise --max_length (or lower --max_tiles)")
                return {**result, "length": self._estimate_length(sample, views), "views": views}
            encoded = self.processor.encode_sample(sample, self.image_dir)
        except DataError as error:
            return {**result, "error": str(error)}
        return {**result, "tokens": len(encoded["input_ids"]), "images": len(sample.images),
                "supervised": int((encoded["labels"] != IGNORE_INDEX).sum()),
                "replies": sum(m["role"] == "assistant" for m in sample.messages)}


class PreferenceDataset(ConversationDataset):
    """Preference pairs (parse_preference_record): each item is the chosen conversation plus the rejected reply's
    tokens, and, once DPO has precomputed them, the reference model's log-probabilities of both."""

    reference_logps = None  # (N, 2) chosen/rejected log-probs of the reference, once precomputed

    def __init__(self, paths: list[str], processor: VLMProcessor, image_dir: str | None = None,
                 skip_bad_samples: bool = False, validate: bool = True, scan: ScanPlan | None = None):
        super().__init__(paths, processor, image_dir, skip_bad_samples, validate, parse_preference_record, scan)

    def __getitem__(self, position: int) -> dict | None:
        item = super().__getitem__(position)
        if item is not None and self.reference_logps is not None:
            item["reference_logps"] = self.reference_logps[position]
        return item


class _Checks(torch.utils.data.Dataset):
    """i -> what checking the sample at positions[i] found, so that dataloader workers can check in parallel."""

    def __init__(self, dataset: ConversationDataset, check_structure_only: bool, positions):
        self.dataset, self.check_structure_only, self.positions = dataset, check_structure_only, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict:
        return self.dataset.check(self.positions[i], self.check_structure_only)


class Positioned(torch.utils.data.Dataset):
    """(p, dataset[p]) for p in positions: for passes that put each sample's result back in its place, when skipped
    samples leave gaps in a batch (stage-1 feature caching, DPO's reference log-probs)."""

    def __init__(self, dataset, positions):
        self.dataset, self.positions = dataset, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[int, dict | None]:
        return self.positions[i], self.dataset[self.positions[i]]


def collate_positioned(items: list[tuple[int, dict | None]], collate_fn) -> tuple[list[int], dict | None]:
    """The positions of the usable samples and their batch."""
    kept = [(position, sample) for position, sample in items if sample is not None]
    return [position for position, _ in kept], collate_fn([sample for _, sample in kept])


def _problems(results: list[dict]) -> list[tuple[int, str]]:
    """(position, message) for every sample that check() found failing."""
    return [(r["position"], r["error"]) for r in results if r["error"]]


def _problem_report(problems: list[tuple[int, str]], total: int, shown: int = 10) -> str:
    lines = [f"{len(problems)} of {total} samples are unusable:"] + [f"  {m}" for _, m in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"  ... and {len(problems) - shown} more")
    lines.append("Fix the data, or pass --skip_bad_samples to drop them (they are counted and reported).")
    return "\n".join(lines)


# Batches are padded to a multiple of this many tokens: a handful of distinct shapes instead of one per batch. CPU
# matmul kernels (oneDNN) are set up per shape, which cost seconds per new length in bf16 on a 2-core CPU; GPU
# tensor cores also prefer multiples of 8.
PAD_MULTIPLE = 32


@dataclass
class Problem:
    """A sample that failed in a loader worker. An exception raised there would reach the main process rewritten
    as the worker's traceback; as data, the batch carries it (the whole batch becomes it) and the main process raises
    it with its own message."""

    message: str


def problem_in(samples: list) -> Problem | None:
    return next((sample for sample in samples if isinstance(sample, Problem)), None)


def raise_problem(batch):
    """The batch, unless a sample of it failed in a loader worker: then that sample's DataError, raised here."""
    if isinstance(batch, Problem):
        raise DataError(batch.message)
    return batch


def collate(samples: list[dict | None], pad_token_id: int, pack_length: int | None = None) -> dict | None:
    """Right-pad a list of encoded samples; labels are -100 on padding, pixel_values of all images stacked.
    With pack_length, consecutive samples share rows of up to that many tokens instead (see pack). Skipped samples
    (None) leave the batch; a batch with none left is None, and the loop moves on to the next."""
    if problem := problem_in(samples):
        return problem
    samples = [s for s in samples if s is not None]  # samples skipped as unusable (--skip_bad_samples)
    if not samples:
        return None
    if pack_length:
        return pack(samples, pad_token_id, pack_length)
    width = -(-max(len(s["input_ids"]) for s in samples) // PAD_MULTIPLE) * PAD_MULTIPLE
    return {"input_ids": pad_rows([s["input_ids"] for s in samples], pad_token_id, width),
            "attention_mask": pad_rows([[1] * len(s["input_ids"]) for s in samples], 0, width),
            "labels": pad_rows([s["labels"] for s in samples], IGNORE_INDEX, width), **stack_images(samples)}


def stack_images(samples: list[dict]) -> dict:
    """All images of the batch in sample order, as the image placeholders appear: pixel_values (None when there
    are none) and, from a feature cache, vision_features."""
    batch = {}
    for key in ("pixel_values", "vision_features"):
        images = [s[key] for s in samples if s.get(key) is not None]
        if images or key == "pixel_values":
            batch[key] = torch.cat(images) if images else None
    return batch


def pack(samples: list[dict], pad_token_id: int, pack_length: int) -> dict:
    """Place consecutive samples side by side in rows of at most pack_length tokens, in order. position_ids restart
    at 0 for every sample, which is how the LM tells them apart: it builds a block-diagonal causal mask from them, so
    no token attends across samples. attention_mask marks real tokens (for counting), padding trails each row."""
    rows, row, used = [], [], 0
    for sample in samples:
        if row and used + len(sample["input_ids"]) > pack_length:
            rows.append(row)
            row, used = [], 0
        row.append(sample)
        used += len(sample["input_ids"])
    rows.append(row)
    ids = [torch.cat([torch.as_tensor(s["input_ids"]) for s in row]) for row in rows]
    # Each sample's first label is dropped: the previous sample's last token must not learn to predict it.
    labels = [torch.cat([torch.cat([torch.tensor([IGNORE_INDEX]), torch.as_tensor(s["labels"])[1:]]) for s in row])
              for row in rows]
    positions = [torch.cat([torch.arange(len(s["input_ids"])) for s in row]) for row in rows]
    return {"input_ids": pad_rows(ids, pad_token_id), "attention_mask": pad_rows([[1] * len(r) for r in ids], 0),
            "labels": pad_rows(labels, IGNORE_INDEX), "position_ids": pad_rows(positions, 0),
            **stack_images(samples)}


# ==================================================================== --check_data
def check_data(dataset: ConversationDataset, workers: int = 0) -> dict:
    """Encode every sample (images decoded, tokens counted; in `workers` processes) and summarise; the caller
    prints it."""
    results = dataset.check_all(False, workers=workers, progress=True)
    good = [r for r in results if not r["error"]]
    lengths = [r["tokens"] for r in good]
    return {
        "samples": len(dataset), "ok": len(good), "bad": len(results) - len(good),
        "images": sum(r["images"] for r in good),
        "replies_per_sample": dict(sorted(Counter(r["replies"] for r in good).items())),
        "tokens_mean": round(sum(lengths) / max(len(lengths), 1), 1), "tokens_max": max(lengths, default=0),
        "supervised_tokens_mean": round(sum(r["supervised"] for r in good) / max(len(good), 1), 1),
        "problems": [r["error"] for r in results if r["error"]],
    }
