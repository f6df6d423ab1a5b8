"""Procedural shape scenes in the LLaVA layout: the offline main job's data.

Each image is a 2x2 grid of cells; 1-4 of them hold a shape (circle, square, triangle) of one of five colours, with
random size and jitter inside its cell. From each scene the generator writes:

    pretrain.json   one caption turn per image ("a red circle on the top left and a blue square on the bottom right")
    sft.json        multi-turn conversations asking colour, shape, count, position and existence
    dpo.json        preference pairs {"image", "question", "chosen", "rejected"}: the rejected answer hallucinates
    dpo_questions.jsonl  the same images' questions with their truth, for pairs from the model's own answers
    eval.jsonl      held-out single questions {"image", "question", "answer", "type", "lang"} for eval_vlm.py
    eval_captions.jsonl  the same held-out images to describe, with the objects a caption should name (each in
                    the caption's language and the other: stage 1's plain format has no prompt to ask a language in)
    eval.parquet    the held-out questions with their images inside, as POPE and MME ship on the Hub
    images/         the PNGs, named by split
    tokenizer/      a byte-level BPE learnt from every phrase the generator can write, with Qwen's chat template

About a quarter of the text is Chinese, as in the real recipe. Every split is drawn from its own seed (pretrain: seed,
sft: seed + 1, eval: seed + 2, dpo: seed + 3), so the evaluation scenes are never training scenes.

    python scripts/make_shapes.py --output_dir datasets/shapes --num_samples 4000 --seed 0
    python scripts/make_shapes.py --kind eval --output_dir /tmp/fresh_eval --num_samples 500 --seed 7
    python scripts/make_shapes.py --output_dir datasets/small --image_size 224 --object_scale 0.35
                                  (small objects in large images: the split where --max_tiles matters)
"""

from __future__ import annotations

import argparse
import json
import os
import random

from PIL import Image, ImageDraw


COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (230, 190, 20),
           "purple": (140, 60, 180)}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")
ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "circle": "圆形",
      "square": "正方形", "triangle": "三角形", "top left": "左上", "top right": "右上", "bottom left": "左下",
      "bottom right": "右下", "left": "左边", "right": "右边", "top": "上面", "bottom": "下面", "Yes": "是", "No": "否"}
QUESTION_TYPES = ("colour", "shape", "count", "position", "existence")
ZH_SHARE = 0.25


# ==================================================================== scenes and pictures
def random_scene(rng: random.Random) -> list[dict]:
    """1-4 objects in distinct cells; no two objects share both colour and shape, so each can be named."""
    count = rng.randint(1, 4)
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], count)
    cells = rng.sample(range(4), count)
    return [{"colour": c, "shape": s, "cell": cell} for (c, s), cell in sorted(zip(kinds, cells),
                                                                                key=lambda kc: kc[1])]


def draw_scene(scene: list[dict], size: int, rng: random.Random, object_scale: float = 1.0) -> Image.Image:
    """Each object spans 55-80% of its cell's side, times object_scale (0.3: small objects in a large image)."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    half = size // 2
    for obj in scene:
        extent = rng.randint(int(half * 0.55 * object_scale), int(half * 0.8 * object_scale))
        x0 = (obj["cell"] % 2) * half + rng.randint(1, half - extent - 1)
        y0 = (obj["cell"] // 2) * half + rng.randint(1, half - extent - 1)
        box = (x0, y0, x0 + extent, y0 + extent)
        colour = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse(box, fill=colour)
        elif obj["shape"] == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=colour)
    return image


# ==================================================================== text
def name(obj: dict, zh: bool) -> str:
    return ZH[obj["colour"]] + ZH[obj["shape"]] if zh else f"{obj['colour']} {obj['shape']}"


def caption(scene: list[dict], zh: bool) -> str:
    if zh:
        return "，".join(f"{ZH[CELLS[o['cell']]]}是{name(o, True)}" for o in scene) + "。"
    parts = [f"a {name(o, False)} on the {CELLS[o['cell']]}" for o in scene]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def unique(scene: list[dict], key: str) -> list[dict]:
    return [o for o in scene if sum(p[key] == o[key] for p in scene) == 1]


# What is asked -> (the attribute that names the object, question by that name en/zh, question by cell en/zh).
ATTRIBUTE_QUESTIONS = {
    "colour": ("shape", "What colour is the {}?", "{}是什么颜色？", "What colour is the shape on the {}?",
               "{}的图形是什么颜色？"),
    "shape": ("colour", "What shape is the {} object?", "{}的图形是什么形状？", "What shape is on the {}?", "{}是什么形状？"),
}


def ask_attribute(kind: str, scene: list[dict], rng: random.Random, zh: bool) -> tuple[str, str]:
    """The colour or shape of one object, named by its other attribute when that is unique, else by its cell."""
    key, by_name, by_name_zh, by_cell, by_cell_zh = ATTRIBUTE_QUESTIONS[kind]
    candidates = unique(scene, key)
    obj = rng.choice(candidates or scene)
    word = obj[key] if candidates else CELLS[obj["cell"]]
    template = (by_name_zh if zh else by_name) if candidates else (by_cell_zh if zh else by_cell)
    return template.format(ZH[word] if zh else word), ZH[obj[kind]] if zh else obj[kind]


def ask(kind: str, scene: list[dict], rng: random.Random, zh: bool, yes_share: float = 0.5) -> tuple[str, str]:
    """One (question, answer) of the given type about the scene; existence questions are about something present
    with probability yes_share."""
    if kind in ATTRIBUTE_QUESTIONS:
        return ask_attribute(kind, scene, rng, zh)
    if kind == "count":
        return ("图中有几个图形？" if zh else "How many shapes are there?"), str(len(scene))
    if kind == "position":
        obj = rng.choice(scene)
        if rng.random() < 0.5:
            side = "left" if obj["cell"] % 2 == 0 else "right"
            return ((f"{name(obj, True)}在左边还是右边？", ZH[side]) if zh else
                    (f"Is the {name(obj, False)} on the left or the right?", side))
        side = "top" if obj["cell"] < 2 else "bottom"
        return ((f"{name(obj, True)}在上面还是下面？", ZH[side]) if zh else
                (f"Is the {name(obj, False)} at the top or the bottom?", side))
    return ask_existence(scene, rng, zh, rng.random() < yes_share)


def ask_existence(scene: list[dict], rng: random.Random, zh: bool, present: bool) -> tuple[str, str]:
    """POPE's question, "Is there a <category>?", about a shape or a colour: one the image has when `present`, else
    one it lacks. With all three shapes in the scene no shape is missing, so the question turns to a colour."""
    key, vocabulary = ("shape", SHAPES) if rng.random() < 0.5 else ("colour", tuple(COLOURS))
    if not present and all(any(o["shape"] == s for o in scene) for s in SHAPES):
        key, vocabulary = "colour", tuple(COLOURS)
    seen = {o[key] for o in scene}
    value = rng.choice(sorted(seen) if present else [v for v in vocabulary if v not in seen])
    answer = "Yes" if present else "No"
    if key == "shape":
        return (f"图中有{ZH[value]}吗？", ZH[answer]) if zh else (f"Is there a {value}?", answer)
    return (f"图中有{ZH[value]}的图形吗？", ZH[answer]) if zh else (f"Is there anything {value}?", answer)


def preference_pairs(scene: list[dict], rng: random.Random, zh: bool) -> list[tuple[str, str, str]]:
    """(question, chosen, rejected) pairs aimed at hallucination: the rejected answer claims a shape, a colour or a
    count that the image does not have, or denies one that it has."""
    pairs = []
    for present in (True, True, False, False):
        question, answer = ask_existence(scene, rng, zh, present)
        pairs.append((question, answer, {"Yes": "No", "No": "Yes", "是": "否", "否": "是"}[answer]))
    question, answer = ask("count", scene, rng, zh)
    # Any wrong count, fewer as often as more: were it always "one too many", DPO could lower every count instead of
    # reading the image (measured: after DPO, count exact match fell from 100% to 59%, most answers one too few).
    wrong = rng.choice([n for n in range(1, len(CELLS) + 1) if n != len(scene)])
    pairs.append((question, answer, str(wrong)))
    return pairs


def every_phrase() -> list[str]:
    """Every word and phrase the generator can write, for learning the tokenizer (independent of any seed)."""
    from processor import DEFAULT_SYSTEM_PROMPT

    rng = random.Random(0)
    # The chat template's own words too, so every prompt is a few tokens, not a few dozen bytes.
    texts = ["Describe the image briefly.", "简要描述这张图片。", DEFAULT_SYSTEM_PROMPT, "system\n", "user\n",
             "assistant\n"] * 20
    for _ in range(400):
        scene = random_scene(rng)
        for zh in (False, True):
            texts.append(caption(scene, zh))
            texts.extend(" ".join(ask(kind, scene, rng, zh)) for kind in QUESTION_TYPES)
    return texts


# ==================================================================== splits
def sft_question_type(rng: random.Random, existence_share: float) -> str:
    if rng.random() < existence_share:
        return "existence"
    return rng.choice([kind for kind in QUESTION_TYPES if kind != "existence"])


def write_split(kind: str, output_dir: str, num_samples: int, seed: int, image_size: int,
                sft_yes_share: float = 0.5, sft_existence_share: float = 0.2, object_scale: float = 1.0,
                sft_questions: tuple[int, int] = (3, 6)) -> str:
    rng = random.Random(seed)
    image_dir = os.path.join(output_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    records, captions = [], []
    for i in range(num_samples):
        scene = random_scene(rng)
        file_name = f"{kind}_{seed}_{i:06d}.png"
        draw_scene(scene, image_size, rng, object_scale).save(os.path.join(image_dir, file_name))
        zh = rng.random() < ZH_SHARE
        if kind == "pretrain":
            prompt = "简要描述这张图片。" if zh else "Describe the image briefly."
            records.append({"id": f"{kind}-{i}", "image": file_name, "conversations": [
                {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": caption(scene, zh)}]})
        elif kind == "sft":
            # Several questions per image: each answer is a supervised token, the image is encoded once.
            kinds = [sft_question_type(rng, sft_existence_share) for _ in range(rng.randint(*sft_questions))]
            turns = []
            for t, question_type in enumerate(kinds):
                question, answer = ask(question_type, scene, rng, zh, sft_yes_share)
                turns += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + question},
                          {"from": "gpt", "value": answer}]
            records.append({"id": f"{kind}-{i}", "image": file_name, "conversations": turns})
        elif kind == "dpo":
            for j, (question, chosen, rejected) in enumerate(preference_pairs(scene, rng, zh)):
                records.append({"id": f"{kind}-{i}-{j}", "image": file_name, "question": question,
                                "chosen": chosen, "rejected": rejected})
            # The same images as questions with their truth, for pairs made from the model's own answers
            # (scripts/onpolicy_pairs.py): every type once, and existence, the hallucination DPO is for, three times
            # more (present and absent alike).
            for j, question_type in enumerate(QUESTION_TYPES + ("existence",) * 3):
                question, answer = ask(question_type, scene, rng, zh)
                captions.append({"id": f"{kind}-{i}-q{j}", "image": file_name, "question": question,
                                 "answer": answer, "type": question_type, "lang": "zh" if zh else "en"})
        else:
            captions.append({"id": f"{kind}-{i}-caption", "image": file_name, "type": "caption",
                             "question": "简要描述这张图片。" if zh else "Describe the image briefly.",
                             "answer": caption(scene, zh), "objects": [[name(o, zh), name(o, not zh)] for o in scene],
                             "lang": "zh" if zh else "en"})
            for question_type in QUESTION_TYPES:
                question, answer = ask(question_type, scene, rng, zh)
                records.append({"id": f"{kind}-{i}-{question_type}", "image": file_name, "question": question,
                                "answer": answer, "type": question_type, "lang": "zh" if zh else "en"})
    if kind == "eval":
        path = os.path.join(output_dir, "eval.jsonl")
        for file_name, rows in (("eval.jsonl", records), ("eval_captions.jsonl", captions)):
            with open(os.path.join(output_dir, file_name), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        write_parquet_with_images(records, image_dir, os.path.join(output_dir, "eval.parquet"))
    else:
        path = os.path.join(output_dir, f"{kind}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(records, f, ensure_ascii=False)
    if kind == "dpo":
        with open(os.path.join(output_dir, "dpo_questions.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in captions)
    return path


def write_parquet_with_images(records: list[dict], image_dir: str, path: str) -> None:
    """The questions with their images inside, laid out as POPE and MME ship on the Hub (question_id, question,
    answer, category, image): what eval_vlm.py and the lmms-eval task benchmarks/lmms_tasks/shapes_qa read."""
    import datasets

    rows = []
    for r in records:
        with open(os.path.join(image_dir, r["image"]), "rb") as f:
            image = {"bytes": f.read(), "path": r["image"]}
        rows.append({"question_id": r["id"], "question": r["question"], "answer": r["answer"],
                     "category": r["type"], "lang": r["lang"], "image": image})
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    table.to_parquet(path)


def write_tokenizer(output_dir: str, vocab_size: int) -> str:
    from processor import make_tokenizer

    path = os.path.join(output_dir, "tokenizer")
    make_tokenizer(every_phrase(), vocab_size=vocab_size).save_pretrained(path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write procedural shape scenes in the LLaVA layout.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="datasets/shapes", help="where the files and images/ go")
    parser.add_argument("--kind", default="all", choices=["all", "pretrain", "sft", "dpo", "eval"],
                        help="all: pretrain + sft + dpo + eval + tokenizer")
    parser.add_argument("--num_samples", type=int, default=4000, help="images per training split (or of --kind)")
    parser.add_argument("--num_dpo", type=int, default=1000, help="images of the dpo split with --kind all "
                                                                 "(about five pairs each)")
    parser.add_argument("--num_eval", type=int, default=300, help="images of the eval split with --kind all "
                                                                  "(five questions each)")
    parser.add_argument("--sft_yes_share", type=float, default=0.5,
                        help="share of SFT existence questions whose answer is yes (the eval split keeps 0.5)")
    parser.add_argument("--sft_questions", type=int, nargs=2, default=[3, 6], metavar=("MIN", "MAX"),
                        help="questions per SFT conversation: each image is asked between MIN and MAX of them")
    parser.add_argument("--sft_existence_share", type=float, default=0.2,
                        help="share of SFT questions that are existence questions (0.2: as often as each other type)")
    parser.add_argument("--seed", type=int, default=0,
                        help="pretrain uses seed, sft seed + 1, eval seed + 2, dpo seed + 3")
    parser.add_argument("--image_size", type=int, default=64, help="pixels per side")
    parser.add_argument("--object_scale", type=float, default=1.0,
                        help="object size relative to the default; with a large --image_size, a small value draws "
                             "small objects in a large image, the split where --max_tiles matters")
    parser.add_argument("--vocab_size", type=int, default=1024, help="size of the learnt tokenizer")
    args = parser.parse_args(argv)

    offsets = {"pretrain": 0, "sft": 1, "eval": 2, "dpo": 3}
    counts = {"eval": args.num_eval, "dpo": args.num_dpo}
    kinds = ["pretrain", "sft", "dpo", "eval"] if args.kind == "all" else [args.kind]
    for kind in kinds:
        count = counts.get(kind, args.num_samples) if args.kind == "all" else args.num_samples
        seed = args.seed + offsets[kind] if args.kind == "all" else args.seed
        path = write_split(kind, args.output_dir, count, seed, args.image_size, args.sft_yes_share,
                           args.sft_existence_share, args.object_scale, tuple(args.sft_questions))
        print(f"{kind}: {path} ({count} images)")
    if args.kind == "all":
        print(f"tokenizer: {write_tokenizer(args.output_dir, args.vocab_size)}")


if __name__ == "__main__":
    main()
