"""Evaluate a checkpoint on short-answer and yes/no questions.

    python eval_vlm.py --model_path DIR --data_path FILE --image_dir DIR --output PRED.jsonl

FILE is JSONL of {"image", "question", "answer"[, "type"]}, LLaVA-format records (the first user turn is the
question, the first reply the answer), or parquet that carries its images as POPE and MME ship (a file or a folder
of shards); a "type" or "category" field groups the questions. Answers are generated greedily in
batches and written to --output; the metrics are printed, their last line one JSON object:

- exact match after normalisation (case, punctuation, articles, surrounding space), overall and per question type;
- per-object recall where a row lists the objects its answer should name ("objects": ["red circle", ...]; an object
  may be a list of names, any of which counts: ["红色圆形", "red circle"]);
- POPE-style metrics over the yes/no questions (answers yes/no or 是/否): accuracy, precision, recall, F1 and the
  share of "yes" predictions, with the true share beside it.

`--predictions PRED.jsonl` scores an existing predictions file without loading a model.
"""

from __future__ import annotations

import argparse
import json
import re
import string
from collections import defaultdict

YES, NO = {"yes", "是", "有"}, {"no", "否", "不是", "没有"}
ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = set(string.punctuation) | set("，。！？、；：“”‘’（）《》")


def normalise(text: str) -> str:
    text = "".join(" " if ch in PUNCTUATION else ch for ch in str(text).lower())
    return " ".join(ARTICLES.sub(" ", text).split())


def yes_no(text: str) -> str | None:
    """'yes' / 'no' for an answer that starts with one (in English or Chinese), else None."""
    words = normalise(text).split()
    first = words[0] if words else ""
    for value, vocabulary in (("no", NO), ("yes", YES)):
        if first in vocabulary or any(first.startswith(v) for v in vocabulary if not v.isascii()):
            return value
    return None


def names_any(names: str | list[str], prediction: str) -> bool:
    """Whether the prediction names an object given by one name or by a list of accepted names."""
    return any(normalise(n) in normalise(prediction) for n in ([names] if isinstance(names, str) else names))


def compute_metrics(records: list[dict]) -> dict:
    """records: {"prediction", "answer", "type"}. Exact match overall and per type; POPE over yes/no answers."""
    if not records:
        raise ValueError("no predictions to score")
    by_type = defaultdict(list)
    for record in records:
        by_type[record.get("type") or "all"].append(normalise(record["prediction"]) == normalise(record["answer"]))
    metrics = {"exact_match": round(100 * sum(sum(v) for v in by_type.values()) / len(records), 2),
               "count": len(records),
               "per_type": {t: {"exact_match": round(100 * sum(v) / len(v), 2), "count": len(v)}
                            for t, v in sorted(by_type.items())}}
    with_objects = [r for r in records if r.get("objects")]
    if with_objects:  # captions: how many of the named objects the prediction mentions
        found = [names_any(o, r["prediction"]) for r in with_objects for o in r["objects"]]
        metrics["object_recall"] = round(100 * sum(found) / len(found), 2)
    pairs = [(yes_no(r["answer"]), yes_no(r["prediction"])) for r in records if yes_no(r["answer"]) is not None]
    if pairs:
        tp = sum(truth == "yes" and guess == "yes" for truth, guess in pairs)
        fp = sum(truth == "no" and guess == "yes" for truth, guess in pairs)
        fn = sum(truth == "yes" and guess != "yes" for truth, guess in pairs)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        metrics["pope"] = {
            "accuracy": round(100 * sum(truth == guess for truth, guess in pairs) / len(pairs), 2),
            "precision": round(100 * precision, 2), "recall": round(100 * recall, 2),
            "f1": round(100 * 2 * precision * recall / (precision + recall), 2) if precision + recall else 0.0,
            "yes_ratio": round(100 * sum(guess == "yes" for _, guess in pairs) / len(pairs), 2),
            "true_yes_ratio": round(100 * sum(truth == "yes" for truth, _ in pairs) / len(pairs), 2),
            "count": len(pairs)}
    return metrics


def one_question_per_scene(rows: list[dict], count: int) -> list[dict]:
    """Up to `count` rows on distinct images, the question types taking turns (in name order; each type's rows in
    order): a few scenes that show every kind of question."""
    queues: dict[str, list[dict]] = {}
    for row in rows:
        queues.setdefault(row.get("type") or "", []).append(row)
    picked, scenes = [], set()
    while len(picked) < count and any(queues.values()):
        for queue in (queues[kind] for kind in sorted(queues)):
            while queue and queue[0]["image"] in scenes:
                queue.pop(0)
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
                scenes.add(picked[-1]["image"])
    return picked


def read_questions(path: str) -> list[dict]:
    """{"id", "image", "question", "answer", "type"} from JSONL questions, LLaVA-format records, or parquet files
    that carry their images (a file, or a folder of shards as `hf download` leaves POPE and MME). Read by
    data.load_records, the reader training uses, so its errors name the file and line the same way."""
    from data import load_records, record_names  # here: scoring a predictions file needs no torch
    from processor import DataError

    try:
        rows = load_records(path)
        return [question_of(row, where) for row, where in zip(rows, record_names(path, len(rows)))]
    except DataError as error:
        raise SystemExit(str(error)) from None


def question_of(row: dict, where: str) -> dict:
    """One question: the row's own "question" and "answer", or a LLaVA record's first user turn (its image
    placeholder dropped) and the reply to it, parsed by data.parse_record as training parses it."""
    from data import parse_record
    from processor import IMAGE_PLACEHOLDER

    if not isinstance(row, dict):
        raise SystemExit(f"{where}: not a JSON object")
    if row.get("conversations") is not None or row.get("messages") is not None:
        messages = parse_record(row, where).messages
        user = next((m["content"] for m in messages if m["role"] == "user"), "")
        question = user.replace(IMAGE_PLACEHOLDER, "").strip()
        answer = next((m["content"] for m in messages if m["role"] == "assistant"), None)
    else:
        question, answer = row.get("question"), row.get("answer")
    missing = [k for k, v in (("question", question), ("answer", answer)) if not v]
    if missing:
        raise SystemExit(f"{where}: no {' or '.join(missing)}")
    # Other fields (e.g. "lang") are kept in the predictions; a column some rows lack reads as None in theirs.
    extra = {k: v for k, v in row.items() if k not in ("conversations", "messages") and v is not None}
    identifier = next((row[key] for key in ("id", "question_id") if row.get(key) is not None), where)
    return {**extra, "id": identifier, "image": row.get("image"),
            "question": question, "answer": answer,
            "type": row.get("type") or row.get("category") or "all"}


class HeldOutQuestions:
    """A question file with its image files decoded up front, so that a missing or broken image stops a run before
    any answer is generated (or, in training, before step 1). Images carried inside the file (a POPE parquet holds
    thousands) are decoded as their batch comes."""

    def __init__(self, path: str, image_dir: str | None):
        self.path, self.image_dir, self.questions = path, image_dir, read_questions(path)
        self.files = {q["image"]: self.image_of(q) for q in self.questions if isinstance(q["image"], str)
                      and q["image"]}

    def image_of(self, question: dict):
        from processor import DataError, open_image  # here: scoring a predictions file needs no torch

        try:
            return open_image(question["image"], self.image_dir, f"{self.path}: {question['id']}")
        except DataError as error:
            raise SystemExit(str(error)) from None

    def answer(self, model, batch_size: int = 64, max_new_tokens: int = 16, progress: bool = True,
               **generation_kwargs) -> list[dict]:
        """Each question with the model's answer under "prediction": greedy by default, in batches of questions of
        similar length (a batch is padded to its longest prompt and decodes until its longest answer ends, so mixing
        a short English question with a long Chinese one wastes both), returned in the file's order."""
        from tqdm.auto import tqdm

        lengths = [len(model.tokenizer(q["question"], add_special_tokens=False)["input_ids"]) for q in self.questions]
        order = sorted(range(len(self.questions)), key=lambda i: (lengths[i], i))
        predictions = {}
        for start in tqdm(range(0, len(order), batch_size), desc="eval", unit="batch", disable=not progress):
            batch = [self.questions[i] for i in order[start:start + batch_size]]
            images = [self.files.get(q["image"]) if isinstance(q["image"], str) or q["image"] is None
                      else self.image_of(q) for q in batch]
            answers = model.batch_chat(images, [q["question"] for q in batch], max_new_tokens=max_new_tokens,
                                       **generation_kwargs)
            predictions.update(zip(order[start:start + batch_size], answers))
        return [{**q, "prediction": predictions[i]} for i, q in enumerate(self.questions)]


def predict(args) -> list[dict]:
    from inference import describe_precision, load_for_inference

    questions = HeldOutQuestions(args.data_path, args.image_dir)
    model = load_for_inference(args.model_path, args.device, args.dtype, args.max_tiles)
    print(f"precision: {describe_precision(args.dtype, model.device, how='weights')}")
    return questions.answer(model, args.batch_size, args.max_new_tokens)


def write_predictions(results: list[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({**r, "image": image_name(r.get("image"))}, ensure_ascii=False) + "\n"
                     for r in results)


def image_name(image) -> str | None:
    """What a predictions file records of an image: its path, not the bytes a parquet row carries."""
    return image if isinstance(image, str) or image is None else (image.get("path") if isinstance(image, dict)
                                                                   else None)


def print_metrics(metrics: dict) -> None:
    print(f"exact match {metrics['exact_match']:.2f}% over {metrics['count']} questions")
    if "object_recall" in metrics:
        print(f"  objects named in the answers: {metrics['object_recall']:.2f}%")
    for kind, values in metrics["per_type"].items():
        print(f"  {kind:<12} {values['exact_match']:6.2f}%  ({values['count']})")
    if "pope" in metrics:
        pope = metrics["pope"]
        print(f"  yes/no: accuracy {pope['accuracy']:.2f}  precision {pope['precision']:.2f}  recall "
              f"{pope['recall']:.2f}  F1 {pope['f1']:.2f}  yes-ratio {pope['yes_ratio']:.2f} "
              f"(true {pope['true_yes_ratio']:.2f})")
    print(json.dumps(metrics, ensure_ascii=False))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_path", help="a VLM checkpoint folder")
    parser.add_argument("--data_path", help="questions: JSONL, LLaVA-format JSON/JSONL, or parquet (file or folder)")
    parser.add_argument("--image_dir", default=None, help="folder the image paths are relative to")
    parser.add_argument("--output", default=None, help="write one JSON line per question with its prediction")
    parser.add_argument("--predictions", default=None, help="score this predictions file instead of generating")
    parser.add_argument("--batch_size", type=int, default=64, help="questions per generation batch")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="longest answer")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (None: cuda if available)")
    parser.add_argument("--max_tiles", type=int, default=None,
                        help="dynamic resolution: tiles per image plus a global view (default: the checkpoint's)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights' dtype; auto: bf16 on GPUs that have it (else fp16), on a CPU bf16 where it "
                             "measures clearly faster than fp32")
    args = parser.parse_args(argv)

    if args.predictions:
        with open(args.predictions, encoding="utf-8") as f:
            results = [json.loads(line) for line in f if line.strip()]
    elif args.model_path and args.data_path:
        results = predict(args)
    else:
        parser.error("give --model_path and --data_path, or --predictions")
    if args.output:
        write_predictions(results, args.output)
    metrics = compute_metrics(results)
    print_metrics(metrics)
    return metrics


if __name__ == "__main__":
    main()
