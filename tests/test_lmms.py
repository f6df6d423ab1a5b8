"""The lmms-eval adapter (eval_lmms.py): the real lmms-eval pipeline on a task defined from local files, against
eval_vlm.py on the same questions; the task's generation settings; refusals; log-likelihood scoring."""

import glob
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lmms_eval", reason="pip install --no-deps lmms-eval==0.7.3 && "
                                        "pip install -r requirements-lmms.txt (scripts/test.sh does)")

from conftest import ROOT  # noqa: E402

import eval_vlm  # noqa: E402
from eval_lmms import MaryVLM  # noqa: E402


@pytest.fixture(scope="module")
def answering_checkpoint(tmp_path_factory):
    """A tiny VLM trained long enough on the shapes conversations to answer in the data's words ("Yes", "red"), and
    a held-out question file that carries its images, where lmms-eval's local task looks for it."""
    root = tmp_path_factory.mktemp("lmms")
    data = root / "datasets" / "shapes"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_shapes.py"), "--output_dir", str(data),
                    "--num_samples", "128", "--num_eval", "12", "--num_dpo", "2"], check=True, capture_output=True)
    import sft_train

    sft_train.main(["--preset", "tiny", "--tokenizer", str(data / "tokenizer"), "--data_path", str(data / "sft.json"),
                    "--image_dir", str(data / "images"), "--output_dir", str(root / "model"), "--max_steps", "120",
                    "--batch_size", "16", "--lr", "3e-3", "--warmup_steps", "5", "--train_vision", "--num_workers",
                    "0", "--save_steps", "0", "--dtype", "fp32"])
    return root, str(root / "model")


def run_lmms_eval(root, model_path: str, batch_size: int) -> tuple[dict, list[dict]]:
    """The shipped task, benchmarks/lmms_tasks/shapes_qa, through lmms-eval's own command line."""
    output = root / f"out_{batch_size}"
    subprocess.run([sys.executable, os.path.join(ROOT, "eval_lmms.py"), "--model", "mary_vlm", "--model_args",
                    f"pretrained={model_path},dtype=fp32,device=cpu", "--tasks", "shapes_qa", "--include_path",
                    os.path.join(ROOT, "benchmarks", "lmms_tasks"), "--batch_size", str(batch_size),
                    "--log_samples", "--output_path", str(output)],
                   cwd=root, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    (results,) = glob.glob(str(output / "**" / "*_results.json"), recursive=True)
    (samples,) = glob.glob(str(output / "**" / "*_samples_shapes_qa.jsonl"), recursive=True)
    with open(samples) as f:
        rows = sorted((json.loads(line) for line in f), key=lambda row: row["doc_id"])
    with open(results) as f:
        return json.load(f)["results"]["shapes_qa"], rows


def answer_of(sample: dict) -> str:
    response = sample["filtered_resps"]
    return response[0] if isinstance(response, list) else response


def test_lmms_eval_scores_the_local_task_as_eval_vlm_does(answering_checkpoint):
    root, model_path = answering_checkpoint
    scores, samples = run_lmms_eval(root, model_path, batch_size=5)
    _, one_by_one = run_lmms_eval(root, model_path, batch_size=1)
    assert [answer_of(s) for s in samples] == [answer_of(s) for s in one_by_one]  # batching changes no answer

    # eval_vlm.py on the same parquet file: the same answers (the adapter prompts as the project's own chat does).
    parquet = str(root / "datasets" / "shapes" / "eval.parquet")
    ours = [r for r in eval_vlm.predict(SimpleNamespace(model_path=model_path, dtype="fp32", device="cpu",
                                                        image_dir=None, batch_size=64, max_new_tokens=16,
                                                        max_tiles=None, data_path=parquet))
            if r["lang"] == "en"]  # the task keeps the English questions
    assert [q["question"] for q in ours] == [s["input"] for s in samples]
    assert [q["prediction"] for q in ours] == [answer_of(s) for s in samples]
    yes_no = [q for q in ours if q["answer"] in ("Yes", "No")]
    assert {q["answer"] for q in yes_no} == {"Yes", "No"} and {q["prediction"] for q in yes_no} <= {"Yes", "No"}

    # ... and eval_vlm.py's scoring of lmms-eval's answers gives lmms-eval's scores.
    metrics = eval_vlm.compute_metrics([{**q, "prediction": answer_of(s)} for q, s in zip(ours, samples)])
    assert scores["exact_match,none"] == pytest.approx(metrics["exact_match"] / 100, abs=1e-4)
    pope = metrics["pope"]
    for name in ("accuracy", "precision", "recall", "f1_score"):
        assert scores[f"pope_{name},none"] == pytest.approx(pope[name.removesuffix("_score")] / 100, abs=1e-4)
    # lmms-eval's POPE "yes_ratio" is the share of questions whose true answer is yes.
    assert scores["pope_yes_ratio,none"] == pytest.approx(pope["true_yes_ratio"] / 100, abs=1e-4)


@pytest.fixture(scope="module")
def adapter(answering_checkpoint):
    root, model_path = answering_checkpoint
    lm = MaryVLM(pretrained=model_path, dtype="fp32", device="cpu", batch_size=2)
    image = eval_vlm.read_questions(str(root / "datasets" / "shapes" / "eval.parquet"))[0]["image"]
    from PIL import Image
    import io

    picture = Image.open(io.BytesIO(image["bytes"]))
    lm.task_dict = {"t": {"test": [{"visual": [picture]}, {"visual": []}, {"visual": [picture, picture]},
                                   {"visual": ["clip.mp4"]}, {"visual": [picture.convert("L").resize((300, 90))]},
                                   {"visual": picture}, {"visual": [[picture]]}]}}
    return lm


def request(doc_id: int, context: str, settings: dict):
    return SimpleNamespace(args=(context, settings, lambda doc: doc["visual"], doc_id, "t", "test"))


def test_the_tasks_generation_settings_reach_generate(adapter, monkeypatch):
    seen = []
    generate = adapter.model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return generate(*args, **kwargs)

    monkeypatch.setattr(adapter.model, "generate", spy)
    adapter.generate_until([request(0, "What colour is the square?", {"max_new_tokens": 3, "temperature": 0,
                                                                      "until": ["\n\n"], "num_beams": 1})])
    assert seen[-1]["max_new_tokens"] == 3 and seen[-1]["do_sample"] is False and seen[-1]["num_beams"] == 1
    adapter.generate_until([request(0, "What colour is the square?", {"max_new_tokens": 5, "temperature": 0.7,
                                                                      "top_p": 0.9})])
    assert (seen[-1]["max_new_tokens"], seen[-1]["do_sample"], seen[-1]["temperature"], seen[-1]["top_p"]) == \
        (5, True, 0.7, 0.9)


def test_answers_stop_at_the_tasks_stop_strings(adapter, monkeypatch):
    monkeypatch.setattr(adapter.model, "batch_chat", lambda images, questions, **kwargs: ["Yes.\nThe square"] *
                        len(questions))
    answers = adapter.generate_until([request(0, "Is there a square?", {"until": ["\n", "Question:"]}),
                                      request(0, "Is there a square?", {"until": "square"})])
    assert answers == ["Yes.", "Yes.\nThe "]


def test_text_only_and_any_image_mode_answer_like_chat(adapter):
    settings = {"max_new_tokens": 8}
    answers = adapter.generate_until([request(1, "How many shapes are there?", settings),
                                      request(4, "What colour is the square?", settings),
                                      request(0, "What colour is the square?", settings),
                                      request(5, "What colour is the square?", settings),  # not in a list
                                      request(6, "What colour is the square?", settings)])  # in a nested list
    model, docs = adapter.model, adapter.task_dict["t"]["test"]
    assert answers == [model.chat(None, "How many shapes are there?", max_new_tokens=8),
                       model.chat(docs[4]["visual"][0], "What colour is the square?", max_new_tokens=8)] + \
        [model.chat(docs[0]["visual"][0], "What colour is the square?", max_new_tokens=8)] * 3


@pytest.mark.parametrize("doc_id, message", [(2, "2 images; mary_vlm places one image per conversation"),
                                             (3, "a video; mary_vlm answers about images only")])
def test_several_images_or_a_video_are_refused_by_name(adapter, doc_id, message):
    with pytest.raises(ValueError, match=f"t document {doc_id}: {message}"):
        adapter.generate_until([request(doc_id, "What is shown?", {})])


def test_loglikelihood_is_the_replys_log_probability_and_knows_greedy(adapter):
    model, processor = adapter.model, adapter.processor
    image = adapter.task_dict["t"]["test"][0]["visual"][0]
    greedy_answer = model.chat(image, "What colour is the square?", max_new_tokens=1)
    requests = [SimpleNamespace(args=("What colour is the square?", answer, lambda doc: doc["visual"], 0, "t", "test"))
                for answer in (greedy_answer, "purple triangle")]
    (greedy_logp, is_greedy), (other_logp, other_greedy) = adapter.loglikelihood(requests)
    assert is_greedy and not other_greedy

    # By hand: the prompt as generation renders it, the reply's tokens after it, their log-softmax summed.
    prompt = processor.encode_generation_batch([image], ["What colour is the square?"])
    reply = processor.tokenizer("purple triangle", add_special_tokens=False)["input_ids"]
    ids = torch.cat([prompt["input_ids"], torch.tensor([reply])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=prompt["pixel_values"]).logits[0]
    log_probs = torch.log_softmax(logits[-len(reply) - 1:-1].float(), dim=-1)
    assert other_logp == pytest.approx(log_probs[torch.arange(len(reply)), torch.tensor(reply)].sum().item(), abs=1e-4)
    assert other_logp < greedy_logp < 0

    # An option as lmms-eval sends it (" A": the delimiter first) scores as the reply the model would start with;
    # an empty one scores log 1.
    spaced, empty = adapter.loglikelihood([SimpleNamespace(args=("What colour is the square?", text,
                                                                 lambda doc: doc["visual"], 0, "t", "test"))
                                           for text in (" " + greedy_answer, "")])
    assert spaced == (greedy_logp, True) and empty == (0.0, True)
