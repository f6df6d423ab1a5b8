"""Show what a run's model answers: held-out scenes, each with a question, every stage's answer and the truth.

    python scripts/sample_grid.py checkpoints/mini --image_dir datasets/shapes/images   # -> .../samples.png

RUN is a folder of stage folders (the main job's pretrain/, sft/, dpo/). Each stage that answered questions in its
last held-out evaluation left them in predictions.jsonl; the grid reads those files and runs no model, so it shows
exactly the answers the stages were scored on. Stage 1 answers no questions (it captions), so under each scene it
shows that scene's caption. Question types take turns, so that every type shows; a tick marks an answer that
matches the truth as eval_vlm.py scores it.
"""

from __future__ import annotations

import argparse
import json
import os


from eval_vlm import normalise, one_question_per_scene

STAGES = ("pretrain", "sft", "dpo")


def read_predictions(run: str) -> dict[str, dict[str, dict]]:
    """stage -> question id -> its row (question, answer, prediction, image, type, lang), for the stages that
    left predictions."""
    found = {}
    for stage in STAGES:
        path = os.path.join(run, stage, "predictions.jsonl")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                found[stage] = {row["id"]: row for row in map(json.loads, filter(str.strip, f))}
    if not any(row.get("type") != "caption" for rows in found.values() for row in rows.values()):
        raise SystemExit(f"{run}: no stage folder with answered questions (predictions.jsonl, written by a held-out "
                         f"evaluation: --eval_data_path)")
    return found


def pick_samples(found: dict[str, dict[str, dict]], count: int, lang: str = "en") -> list[dict]:
    """`count` questions on distinct scenes, in `lang` (the picture's font has Latin letters), question types in
    turn. Each: the image, the question, the truth, every question-answering stage's answer, the scene's caption."""
    last = [stage for stage in STAGES if stage in found and any(
        row.get("type") != "caption" for row in found[stage].values())][-1]
    captions = {row["image"]: row["prediction"] for row in found.get("pretrain", {}).values()
                if row.get("type") == "caption"}
    rows = [row for row in found[last].values() if row.get("lang", lang) == lang and row.get("type") != "caption"]
    picked = []
    for row in one_question_per_scene(rows, count):
        answers = {stage: found[stage][row["id"]]["prediction"] for stage in STAGES
                   if row["id"] in found.get(stage, {})}
        picked.append({"image": row["image"], "type": row["type"], "question": row["question"],
                       "truth": row["answer"], "answers": answers, "caption": captions.get(row["image"])})
    return picked


def caption_lines(sample: dict, width: int = 34) -> list[tuple[str, str]]:
    """The text under one scene, as (line, colour) pairs."""
    import textwrap

    lines = [(line, "black") for line in textwrap.wrap(f"Q: {sample['question']}", width)]
    for stage, answer in sample["answers"].items():
        right = normalise(answer) == normalise(sample["truth"])
        lines.append((f"{stage}: {answer.strip() or '(nothing)'} {'✓' if right else '✗'}"[:width + 4],
                      "#1a7f37" if right else "#c62828"))
    lines.append((f"truth: {sample['truth']}", "black"))
    if sample["caption"] is not None:
        wrapped = textwrap.wrap(f"stage 1 caption: {sample['caption']}", width)
        if len(wrapped) > 2:  # two lines at most, the cut marked
            wrapped = [wrapped[0], wrapped[1] + " …"]
        lines += [(line, "#555555") for line in wrapped]
    return lines


def draw(samples: list[dict], image_dir: str, output: str, columns: int = 4, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = -(-len(samples) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 5.2 * rows), squeeze=False,
                                gridspec_kw={"hspace": 0.95, "wspace": 0.12})
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_visible(False)
    for axis, sample in zip(axes.flat, samples):
        path = os.path.join(image_dir, sample["image"])
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: the image of held-out question on {sample['image']} is not there "
                             f"(give --image_dir, the folder the evaluation read)")
        axis.set_visible(True)
        axis.imshow(Image.open(path).convert("RGB"))
        for i, (line, colour) in enumerate(caption_lines(sample)):
            axis.text(0.0, -0.05 - 0.095 * i, line, transform=axis.transAxes, va="top", fontsize=9, color=colour)
    if title:
        figure.suptitle(title)
    figure.subplots_adjust(left=0.02, right=0.98, top=0.95 if title else 0.98, bottom=0.12)
    figure.savefig(output, dpi=80)
    plt.close(figure)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run", help="the folder holding the stage folders (pretrain/, sft/, dpo/)")
    parser.add_argument("--image_dir", required=True, help="the folder the held-out images are in")
    parser.add_argument("--output", default=None, help="the picture (default: RUN/samples.png)")
    parser.add_argument("--count", type=int, default=12, help="scenes shown")
    parser.add_argument("--title", default=None, help="a title above the grid")
    args = parser.parse_args(argv)

    samples = pick_samples(read_predictions(args.run), args.count)
    output = args.output or os.path.join(args.run, "samples.png")
    draw(samples, args.image_dir, output, title=args.title)
    print(f"samples: {output}")
    return output


if __name__ == "__main__":
    main()
