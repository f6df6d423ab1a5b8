"""eval_vlm.py's metrics on hand-computed cases, its input errors, and the shape-scene generator."""

import json
import random
from collections import Counter

import pytest

import eval_vlm
from eval_vlm import normalise, read_questions, yes_no
from scripts import make_shapes, onpolicy_pairs


def test_normalisation_ignores_case_punctuation_articles_and_space():
    assert normalise("  The Red circle. ") == normalise("red CIRCLE") == "red circle"
    assert normalise("左边。") == "左边"
    assert normalise("an apple!") == "apple" and normalise("theatre") == "theatre"
    assert [yes_no(t) for t in ("Yes.", "no", "是", "否", "没有", "Yes, there is", "left")] == \
        ["yes", "no", "yes", "no", "no", "yes", None]


def test_object_recall_counts_the_named_objects_a_caption_mentions(tmp_path):
    rows = [{"answer": "a red circle on the top left and a blue square on the bottom right", "type": "caption",
             "objects": ["red circle", "blue square"], "prediction": "A red circle at the top, a green square."},
            {"answer": "左上是红色圆形。", "type": "caption", "objects": ["红色圆形"], "prediction": "左上是红色圆形。"}]
    predictions = tmp_path / "pred.jsonl"
    predictions.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    metrics = eval_vlm.main(["--predictions", str(predictions)])
    assert metrics["object_recall"] == round(100 * 2 / 3, 2) and metrics["exact_match"] == 50.0
    # A caption asked for in Chinese but written in English (stage 1's plain format cannot be asked for a language)
    # names its objects when a record lists each object's names in both languages.
    row = {"answer": "左上是红色圆形，右下是蓝色正方形。", "type": "caption", "lang": "zh",
           "objects": [["红色圆形", "red circle"], ["蓝色正方形", "blue square"]],
           "prediction": "a red circle on the top left and a green square on the bottom right"}
    predictions.write_text(json.dumps(row, ensure_ascii=False))
    assert eval_vlm.main(["--predictions", str(predictions)])["object_recall"] == 50.0


def test_the_generator_writes_caption_questions_for_its_held_out_scenes(tmp_path):
    make_shapes.main(["--kind", "eval", "--output_dir", str(tmp_path), "--num_samples", "6", "--seed", "3"])
    questions = [json.loads(line) for line in open(tmp_path / "eval.jsonl")]
    captions = [json.loads(line) for line in open(tmp_path / "eval_captions.jsonl")]
    assert [c["image"] for c in captions] == sorted({q["image"] for q in questions})
    for row in captions:
        # Every object is named in the caption's language first, then in the other.
        assert row["objects"] and all(normalise(o[0]) in normalise(row["answer"]) for o in row["objects"])
        assert all(o[1].isascii() == (row["lang"] == "zh") for o in row["objects"])


def test_metrics_match_a_hand_computed_case(tmp_path):
    # 4 yes/no questions: truth yes, yes, no, no; predictions yes, no, yes, yes -> TP 1, FN 1, FP 2, TN 0.
    rows = [("Yes", "yes", "existence"), ("Yes", "No.", "existence"), ("No", "yes", "existence"),
            ("否", "是", "existence"), ("red", "The red", "colour"), ("3", "2", "count")]
    predictions = tmp_path / "pred.jsonl"
    predictions.write_text("\n".join(json.dumps({"answer": a, "prediction": p, "type": t}) for a, p, t in rows))
    metrics = eval_vlm.main(["--predictions", str(predictions)])
    assert metrics["exact_match"] == round(100 * 2 / 6, 2)
    assert metrics["per_type"] == {"colour": {"exact_match": 100.0, "count": 1},
                                   "count": {"exact_match": 0.0, "count": 1},
                                   "existence": {"exact_match": 25.0, "count": 4}}
    precision, recall = 1 / 3, 1 / 2
    assert metrics["pope"] == {"accuracy": 25.0, "precision": round(100 * precision, 2), "recall": 50.0,
                               "f1": round(100 * 2 * precision * recall / (precision + recall), 2),
                               "yes_ratio": 75.0, "true_yes_ratio": 50.0, "count": 4}


def test_last_line_of_output_is_the_metrics_json(tmp_path, capsys):
    predictions = tmp_path / "pred.jsonl"
    predictions.write_text(json.dumps({"answer": "left", "prediction": "left"}) + "\n")
    eval_vlm.main(["--predictions", str(predictions)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["exact_match"] == 100.0 and "pope" not in json.loads(last)


def test_questions_from_jsonl_and_llava_format(tmp_path):
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text(json.dumps({"image": "a.png", "question": "Q?", "answer": "A", "type": "colour"}) + "\n")
    llava = tmp_path / "q.json"
    llava.write_text(json.dumps([{"id": "x", "image": "a.png", "category": "pos", "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]}]))
    a, b = read_questions(str(jsonl))[0], read_questions(str(llava))[0]
    assert (a["question"], a["answer"], a["type"]) == (b["question"], b["answer"], "colour") == ("Q?", "A", "colour")
    assert b["type"] == "pos"


def test_questions_are_answered_in_batches_of_similar_length_and_returned_in_file_order(tmp_path):
    """A batch is padded to its longest prompt and decodes until its longest answer ends: short and long questions
    go to different batches, and every answer still lands on its own question."""
    questions = ["Is there a red circle?", "图中有几个图形？这是一个很长的问题吗？", "Where?", "黄色正方形在上面还是下面？",
                 "What colour is the triangle?", "Count?"]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"image": None, "question": q, "answer": q[::-1]}) + "\n" for q in questions))

    class Tokenizer:  # one token a character: Chinese characters count as much as they do in SmolLM2's BPE
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text)}

    class Model:
        tokenizer, batches = Tokenizer(), []

        def batch_chat(self, images, texts, max_new_tokens, **kwargs):
            self.batches.append(texts)
            return [text[::-1] for text in texts]

    model = Model()
    results = eval_vlm.HeldOutQuestions(str(path), None).answer(model, batch_size=2, progress=False)
    assert [r["question"] for r in results] == questions
    assert all(r["prediction"] == r["answer"] for r in results)
    assert model.batches == [["Where?", "Count?"], ["黄色正方形在上面还是下面？", "图中有几个图形？这是一个很长的问题吗？"],
                             ["Is there a red circle?", "What colour is the triangle?"]]


@pytest.mark.parametrize("text, message", [
    ('{"image": "a.png", "question": "Q?"}\n', "record 0: no answer"),
    ('{"image": "a.png", "question": "Q?", "answer": "A"}\n{broken\n', "q.jsonl:2: malformed JSON line"),
])
def test_bad_question_files_get_clear_errors(tmp_path, text, message):
    path = tmp_path / "q.jsonl"
    path.write_text(text)
    with pytest.raises(SystemExit, match=message):
        read_questions(str(path))


def test_generator_is_deterministic_and_answers_match_the_scene(tmp_path):
    first = make_shapes.write_split("eval", str(tmp_path / "a"), 20, seed=3, image_size=64)
    second = make_shapes.write_split("eval", str(tmp_path / "b"), 20, seed=3, image_size=64)
    assert open(first).read() == open(second).read()
    rng = random.Random(0)
    for _ in range(200):
        scene = make_shapes.random_scene(rng)
        kinds = {(o["colour"], o["shape"]) for o in scene}
        assert 1 <= len(scene) <= 4 and len(kinds) == len(scene) and len({o["cell"] for o in scene}) == len(scene)
        for present in (True, False):
            question, answer = make_shapes.ask_existence(scene, rng, zh=False, present=present)
            value = question.removesuffix("?").split()[-1]
            key = "shape" if value in make_shapes.SHAPES else "colour"
            assert answer == ("Yes" if any(o[key] == value for o in scene) else "No") == ("Yes" if present else "No")
        question, answer = make_shapes.ask("count", scene, rng, zh=False)
        assert answer == str(len(scene))


def test_object_scale_draws_each_object_smaller_in_its_own_cell():
    """The split where --max_tiles matters: at 0.3 every object spans at most 0.8 x 0.3 of its cell's side."""
    import numpy as np

    scene = [{"colour": "red", "shape": "square", "cell": 0}, {"colour": "blue", "shape": "circle", "cell": 3}]
    for scale in (1.0, 0.3):
        pixels = np.asarray(make_shapes.draw_scene(scene, 224, random.Random(0), object_scale=scale))
        for obj in scene:
            top, left = (obj["cell"] // 2) * 112, (obj["cell"] % 2) * 112
            ys, xs = np.nonzero((pixels[top:top + 112, left:left + 112] != 255).any(-1))
            extent = max(ys.max() - ys.min(), xs.max() - xs.min())
            assert int(112 * 0.55 * scale) <= extent <= int(112 * 0.8 * scale) + 1, (scale, obj, extent)


def test_preference_pairs_reject_counts_on_both_sides_of_the_truth():
    """A rejected count that is always too high lets DPO lower every count instead of reading the image."""
    rng = random.Random(0)
    sides = []
    for _ in range(400):
        scene = make_shapes.random_scene(rng)
        (question, chosen, rejected), = [p for p in make_shapes.preference_pairs(scene, rng, zh=False)
                                         if p[0].startswith("How many")]
        assert chosen == str(len(scene)) and rejected != chosen and 1 <= int(rejected) <= 4
        sides.append(int(rejected) > len(scene))
    assert 0.35 < sum(sides) / len(sides) < 0.65


def test_parquet_questions_carrying_their_images_read_like_the_jsonl(tmp_path):
    """POPE and MME ship as parquet with the image inside each row: a file, or a folder of shards."""
    make_shapes.main(["--kind", "eval", "--output_dir", str(tmp_path), "--num_samples", "3", "--seed", "3"])
    shards = tmp_path / "hub" / "data"
    shards.mkdir(parents=True)
    (shards / "test-00000-of-00001.parquet").write_bytes((tmp_path / "eval.parquet").read_bytes())
    from_jsonl = read_questions(str(tmp_path / "eval.jsonl"))
    for source in (tmp_path / "eval.parquet", tmp_path / "hub"):
        rows = read_questions(str(source))
        assert [(r["id"], r["question"], r["answer"], r["type"]) for r in rows] == \
            [(r["id"], r["question"], r["answer"], r["type"]) for r in from_jsonl]
        for row, reference in zip(rows, from_jsonl):
            assert row["image"]["path"] == reference["image"] == eval_vlm.image_name(row["image"])
            assert row["image"]["bytes"] == (tmp_path / "images" / reference["image"]).read_bytes()
    # A bad row in a folder of shards is named by its shard and its row there.
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "eval.parquet")
    no_answer = table.slice(0, 1).set_column(table.schema.get_field_index("answer"), "answer",
                                             pa.array([None], type=table.schema.field("answer").type))
    pq.write_table(no_answer, shards / "test-00001-of-00001.parquet")
    with pytest.raises(SystemExit, match="test-00001-of-00001.parquet: row 0: no answer"):
        read_questions(str(tmp_path / "hub"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(SystemExit, match="broken.parquet: not a readable parquet file"):
        read_questions(str(tmp_path / "broken.parquet"))
    with pytest.raises(SystemExit, match="no parquet files in it"):
        read_questions(str(tmp_path / "images"))


# ---------------------------------------------------------------- on-policy preference pairs
def test_onpolicy_pairs_only_where_the_model_was_wrong_with_the_truth_chosen():
    def row(qid, answer, prediction):
        return {"id": qid, "image": "a.png", "question": f"q{qid}", "answer": answer, "prediction": prediction,
                "type": "colour"}

    answered = [row(1, "red", "Red."), row(1, "red", "blue"), row(1, "red", "Blue"), row(1, "red", "green"),
                row(2, "Yes", "yes"), row(3, "No", "Yes"), row(4, "2", "")]
    pairs = onpolicy_pairs.pairs_from_answers(answered)
    assert [(p["question"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("q1", "red", "blue"), ("q1", "red", "green"), ("q3", "No", "Yes")]  # "Blue" repeats "blue"; "" is no reply
    for pair in pairs:
        assert normalise(pair["chosen"]) != normalise(pair["rejected"]) and pair["image"] == "a.png"


def test_balanced_pairs_choose_every_answer_as_often_as_they_reject_it():
    """A yes-biased model's mistakes are all "no is right" pairs; mirror pairs on questions whose truth is "yes"
    (against "no") even the two answers out, within a type and language, and never pair a question twice; what
    they cannot even out is dropped."""
    def row(qid, answer, prediction, kind="existence", lang="en"):
        return {"id": qid, "image": f"{qid}.png", "question": f"q{qid}", "answer": answer, "prediction": prediction,
                "type": kind, "lang": lang}

    answered = [row(1, "No", "Yes"), row(2, "No", "Yes."), row(3, "No", "yes"), row(4, "Yes", "Yes"),
                row(5, "Yes", "Yes"), row(6, "No", "No"), row(7, "否", "是", lang="zh"), row(8, "是", "是", lang="zh"),
                row(9, "是", "是", lang="zh"), row(10, "red", "purple", "colour"), row(11, "purple", "purple", "colour")]
    mistakes = onpolicy_pairs.pairs_from_answers(answered)
    pairs = onpolicy_pairs.balance_answers(mistakes, answered)
    assert pairs[:len(mistakes)] == mistakes and len(mistakes) == 5
    mirrors = [(p["question"], p["chosen"], p["rejected"]) for p in pairs[len(mistakes):]]
    assert sorted(mirrors) == [("q11", "purple", "red"), ("q4", "Yes", "No"), ("q5", "Yes", "No"),
                               ("q8", "是", "否")]  # q1-q3 were wrong "yes" answers: two yes-true questions remain
    chosen = Counter((p["type"], p["lang"], normalise(p["chosen"])) for p in pairs)
    rejected = Counter((p["type"], p["lang"], normalise(p["rejected"])) for p in pairs)
    assert chosen[("existence", "en", "yes")] == 2 and rejected[("existence", "en", "yes")] == 3  # no 3rd yes left
    assert chosen[("existence", "zh", "是")] == rejected[("existence", "zh", "是")] == 1
    assert len({p["question_id"] for p in pairs}) == len(pairs)
    # What mirrors could not even out (a third "yes"-rejected pair, no third yes-true question) is dropped.
    balanced = onpolicy_pairs.drop_surplus(pairs)
    chosen = Counter((p["type"], p["lang"], normalise(p["chosen"])) for p in balanced)
    rejected = Counter((p["type"], p["lang"], normalise(p["rejected"])) for p in balanced)
    assert chosen == rejected and len(balanced) == len(pairs) - 1
    assert balanced == [p for p in pairs if p["question"] != "q1"]  # the first surplus pair, q1's, goes


def test_generator_writes_questions_with_their_truth_for_the_preference_images(tmp_path):
    make_shapes.write_split("dpo", str(tmp_path), 6, seed=3, image_size=32)
    questions = read_questions(str(tmp_path / "dpo_questions.jsonl"))
    pair_images = {r["image"] for r in json.load(open(tmp_path / "dpo.json"))}
    assert len(questions) == 6 * 8 and {q["image"] for q in questions} == pair_images
    assert sum(q["type"] == "existence" for q in questions) == 6 * 4  # existence four times, every other type once


# ---------------------------------------------------------------- held-out evaluation during training
def test_metrics_logged_during_training_equal_eval_vlms_on_the_saved_checkpoint(tmp_path, trained_checkpoint):
    """The last in-loop evaluation and eval_vlm.py on the final checkpoint: same answers, same metrics. (From a
    model that answers in words, so that the answers compared are not blanks.)"""
    import sft_train

    root = str(tmp_path)
    make_shapes.write_split("sft", root, 16, seed=1, image_size=32)  # images/ holds both splits
    make_shapes.write_split("eval", root, 4, seed=5, image_size=32)  # 20 questions
    out = tmp_path / "out"
    sft_train.main(["--model_path", trained_checkpoint[0], "--data_path", str(tmp_path / "sft.json"),
                    "--image_dir", str(tmp_path / "images"), "--output_dir", str(out), "--max_steps", "4",
                    "--batch_size", "4", "--lr", "1e-4", "--num_workers", "0", "--dtype", "fp32", "--device", "cpu",
                    "--save_steps", "0", "--eval_data_path", str(tmp_path / "eval.jsonl"), "--eval_steps", "2",
                    "--eval_max_new_tokens", "8"])
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    evaluations = [r for r in log if "eval/exact_match" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    logged = json.load(open(out / "eval_results.json"))

    metrics = eval_vlm.main(["--model_path", str(out), "--data_path", str(tmp_path / "eval.jsonl"), "--image_dir",
                             str(tmp_path / "images"), "--output", str(tmp_path / "again.jsonl"), "--max_new_tokens",
                             "8", "--dtype", "fp32", "--device", "cpu"])
    assert logged == {"step": 4, **metrics}
    assert evaluations[-1]["eval/exact_match"] == metrics["exact_match"]
    for kind in ("colour", "count", "existence"):
        assert evaluations[-1][f"eval/{kind}"] == metrics["per_type"][kind]["exact_match"], kind
    predictions = [json.loads(line)["prediction"] for line in open(out / "predictions.jsonl")]
    assert predictions == [json.loads(line)["prediction"] for line in open(tmp_path / "again.jsonl")]
    assert len(predictions) == 20 and any(predictions)  # it answers something: the comparison is not of blanks
