"""Preference pairs from the model's own answers: where a sampled answer is wrong, the truth is chosen and that
answer rejected.

    python scripts/onpolicy_pairs.py --model_path checkpoints/mini/sft --data_path datasets/shapes/dpo_questions.jsonl \
        --image_dir datasets/shapes/images --output datasets/shapes/dpo_onpolicy.json

The questions carry their true answers (any file eval_vlm.py reads: JSONL, LLaVA records, parquet). Each is answered
--samples times with sampling at --temperature; an answer that does not match the truth after eval_vlm.py's
normalisation becomes the rejected reply of a pair whose chosen reply is the truth, once per distinct wrong answer.
The ground truth is the judge, where RLAIF-V asks a model: the pairs are on-policy (the mistakes this model makes)
and never wrong about which reply is better.

A biased model's mistakes lean one way: an SFT model that says "yes" to almost every existence question makes
almost only "no"-is-right pairs, and DPO on those learns to say "no" to everything (it did, on two seeds). So the
pairs are then balanced (--no-balance turns this off): within each question type and language, every answer is
chosen as often as it is rejected. An answer rejected more often than chosen gets mirror pairs, on questions whose
truth it is, against the answer chosen more often than rejected; what the --max_pairs draw unbalances again, or
mirrors could not even out, is dropped. DPO then learns which answer the image supports, not which answer to
give. The file is what dpo_train.py reads ({"image", "question", "chosen", "rejected"}).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter, defaultdict

from eval_vlm import HeldOutQuestions, image_name, normalise


def pairs_from_answers(answered: list[dict]) -> list[dict]:
    """One pair per (question, distinct wrong answer): chosen = the truth, rejected = the model's answer."""
    pairs, seen = [], set()
    for row in answered:
        wrong = normalise(row["prediction"]) != normalise(row["answer"])
        key = (row["id"], normalise(row["prediction"]))
        if wrong and row["prediction"].strip() and key not in seen:
            seen.add(key)
            pairs.append(make_pair(row, row["prediction"], f"{row['id']}-{len(pairs)}"))
    return pairs


def answer_key(row: dict, reply: str) -> tuple:
    """A reply as balancing counts it: within its question type and language, after eval_vlm's normalisation."""
    return row.get("type"), row.get("lang"), normalise(reply)


def answer_balance(pairs: list[dict]) -> Counter:
    """answer_key -> times chosen minus times rejected."""
    net = Counter()
    for pair in pairs:
        net[answer_key(pair, pair["chosen"])] += 1
        net[answer_key(pair, pair["rejected"])] -= 1
    return net


def balance_answers(pairs: list[dict], answered: list[dict]) -> list[dict]:
    """Add mirror pairs until, within each (type, language), every answer is chosen as often as it is rejected (or
    no unpaired question is left whose truth is the answer short of being chosen)."""
    net, written = answer_balance(pairs), {}  # written: each answer's first spelling
    for pair in pairs:
        for reply in (pair["chosen"], pair["rejected"]):
            written.setdefault(answer_key(pair, reply), reply)
    paired = {pair["question_id"] for pair in pairs}
    unpaired = defaultdict(list)  # answer_key of the truth -> questions not in any pair yet, in the order answered
    for row in {row["id"]: row for row in answered if row["id"] not in paired}.values():
        unpaired[answer_key(row, row["answer"])].append(row)
    mirrors = []
    for short in sorted(key for key, value in net.items() if value < 0):
        for row in unpaired[short]:
            surplus = [key for key, value in net.items() if key[:2] == short[:2] and value > 0]
            if net[short] >= 0 or not surplus:
                break
            over = max(surplus, key=lambda key: (net[key], key))
            mirrors.append(make_pair(row, written[over], f"{row['id']}-mirror"))
            net[short] += 1
            net[over] -= 1
    return pairs + mirrors


def drop_surplus(pairs: list[dict]) -> list[dict]:
    """Drop pairs whose chosen answer is chosen more often than rejected and whose rejected answer is rejected more
    often than chosen, within its (type, language), until no such pair is left: a draw from balanced pairs is
    balanced again. (DPO on a model that cannot yet tell the answers apart from the image moves its prior by about
    logit(share) / beta: 56 "no"-chosen pairs in 100 at beta 0.1 make a model that says "no" to almost everything.)"""
    net, kept = answer_balance(pairs), []
    for pair in pairs:
        chosen, rejected = answer_key(pair, pair["chosen"]), answer_key(pair, pair["rejected"])
        if net[chosen] > 0 and net[rejected] < 0:
            net[chosen] -= 1
            net[rejected] += 1
        else:
            kept.append(pair)
    return kept


def make_pair(row: dict, rejected: str, pair_id: str) -> dict:
    return {"id": pair_id, "question_id": row["id"], "image": image_name(row.get("image")),
            "question": row["question"], "chosen": row["answer"], "rejected": rejected, "type": row.get("type"),
            "lang": row.get("lang")}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_path", required=True, help="the model whose answers are judged (an SFT checkpoint)")
    parser.add_argument("--data_path", required=True, help="questions with their true answers")
    parser.add_argument("--image_dir", default=None, help="folder the image paths are relative to")
    parser.add_argument("--output", required=True, help="the pairs, as a JSON list")
    parser.add_argument("--samples", type=int, default=4, help="answers sampled per question")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--batch_size", type=int, default=64, help="questions per generation batch")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="longest answer")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (None: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="weights' dtype")
    parser.add_argument("--max_pairs", type=int, default=0,
                        help="keep at most this many pairs, drawn at random (0: all); DPO's reference pass and "
                             "steps need no more than the pairs it trains on")
    parser.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                        help="add mirror pairs so that no answer is chosen more often than it is rejected")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling and the draw")
    args = parser.parse_args(argv)

    import torch

    from inference import load_for_inference

    questions = HeldOutQuestions(args.data_path, args.image_dir)
    model = load_for_inference(args.model_path, args.device, args.dtype)
    torch.manual_seed(args.seed)
    answered = []
    for _ in range(args.samples):
        answered += questions.answer(model, args.batch_size, args.max_new_tokens, do_sample=True,
                                     temperature=args.temperature, top_p=1.0, top_k=0)
    pairs = pairs_from_answers(answered)
    wrong = sum(normalise(r["prediction"]) != normalise(r["answer"]) for r in answered)
    mistakes = len(pairs)
    if args.balance:
        pairs = balance_answers(pairs, answered)
    found = len(pairs)
    if 0 < args.max_pairs < found:
        pairs = random.Random(args.seed).sample(pairs, args.max_pairs)
    if args.balance:
        pairs = drop_surplus(pairs)
    by_type = Counter(pair["type"] for pair in pairs)
    print(f"{len(answered)} sampled answers to {len(questions.questions)} questions, {wrong} wrong: {mistakes} "
          f"pairs from mistakes, {found - mistakes} mirror pairs, "
          f"{len(pairs)} kept ({', '.join(f'{k} {v}' for k, v in sorted(by_type.items()))})")
    if not pairs:
        raise SystemExit(f"{args.model_path} answered every sampled question right: no pairs to learn from "
                         f"(raise --samples or --temperature, or give more questions)")
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(pairs, f, ensure_ascii=False)
    print(f"pairs: {args.output}")
    return pairs


if __name__ == "__main__":
    main()
