"""Draw a run's learning curve: held-out exact match against wall-clock seconds, across its stages.

    python scripts/plot_curve.py checkpoints/mini            # -> checkpoints/mini/curve.png
    python scripts/plot_curve.py checkpoints/sft --output sft.png

RUN is a stage's output folder (one with log.jsonl) or a folder of them (the main job's pretrain/, sft/, dpo/). The
points are the held-out evaluations the stages logged (`--eval_data_path` / `--eval_steps`): exact match overall and
per question type, and in stage 1 the share of the scenes' objects its captions name. Time runs from the start of
the first stage's process, so the gaps between stages (start-ups, pair generation) show as they were.
"""

from __future__ import annotations

import argparse
import json
import os

STAGE_ORDER = ("pretrain", "sft", "dpo")
STAGE_COLOURS = ("#dbe9f6", "#fde8d0", "#e3f2dd", "#eeeeee")
SKIPPED = ("eval/seconds", "eval/questions")  # logged beside the metrics, not metrics


def stage_logs(run: str) -> list[tuple[str, list[dict]]]:
    """(stage name, its log.jsonl lines) in the order the stages ran."""
    if os.path.isfile(os.path.join(run, "log.jsonl")):
        folders = [run]
    else:
        folders = [os.path.join(run, name) for name in sorted(os.listdir(run))
                   if os.path.isfile(os.path.join(run, name, "log.jsonl"))]
    if not folders:
        raise SystemExit(f"{run}: no log.jsonl here or in its subfolders; give a stage's --output_dir or the "
                         f"folder that holds them")
    logs = []
    for folder in folders:
        with open(os.path.join(folder, "log.jsonl")) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        if lines:
            logs.append((os.path.basename(os.path.normpath(folder)), lines))
    known = {name: i for i, name in enumerate(STAGE_ORDER)}
    return sorted(logs, key=lambda item: (min(line.get("time", 0) for line in item[1]),
                                          known.get(item[0], len(known))))


def curve(logs: list[tuple[str, list[dict]]]) -> dict:
    """Seconds since the first stage started, per stage, and the evaluations' points."""
    start = min(line["time"] - line.get("run_seconds", 0) for _, lines in logs for line in lines if "time" in line)
    stages, points = [], {}
    for name, lines in logs:
        times = [line["time"] - start for line in lines if "time" in line]
        began = min(line["time"] - line.get("run_seconds", 0) for line in lines if "time" in line) - start
        stages.append((name, began, max(times)))
        for line in lines:
            for key, value in line.items():
                if key.startswith("eval/") and key not in SKIPPED and not (
                        key == "eval/exact_match" and "eval/object_recall" in line):  # a caption is never exact
                    points.setdefault(key.removeprefix("eval/"), []).append((line["time"] - start, value))
    if not points:
        raise SystemExit("no held-out evaluations in these logs: train with --eval_data_path (and --eval_steps)")
    return {"stages": stages, "points": points}


def draw(data: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=120)
    for i, (name, begin, end) in enumerate(data["stages"]):
        axis.axvspan(begin, end, color=STAGE_COLOURS[min(i, len(STAGE_COLOURS) - 1)], zorder=0)
        axis.text((begin + end) / 2, 101, name, ha="center", va="bottom", fontsize=9)
    bold = {"exact_match": ("held-out exact match", "black", "-"), "object_recall": ("objects named (captions)",
                                                                                      "tab:blue", "--")}
    for key, series in sorted(data["points"].items()):
        xs, ys = zip(*series)
        label, colour, style = bold.get(key, (key, None, ":"))
        width = 2.2 if key in bold else 1.0
        axis.plot(xs, ys, style, marker="o", markersize=3, linewidth=width, label=label, color=colour,
                  alpha=1.0 if key in bold else 0.7)
    axis.set_xlabel("wall-clock seconds since the first stage started")
    axis.set_ylabel("%")
    axis.set_ylim(0, 108)
    axis.set_title(title, fontsize=10, pad=16)
    axis.legend(fontsize=7, loc="lower right", ncol=2)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a stage's output folder, or a folder of stage folders (the main job's)")
    parser.add_argument("--output", default=None, help="the PNG (default: RUN/curve.png)")
    parser.add_argument("--title", default=None, help="the figure's title (default: the run folder)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.run):
        raise SystemExit(f"{args.run}: no such folder")
    output = args.output or os.path.join(args.run, "curve.png")
    draw(curve(stage_logs(args.run)), output, args.title or f"learning curve of {args.run}")
    print(f"curve: {output}")
    return output


if __name__ == "__main__":
    main()
