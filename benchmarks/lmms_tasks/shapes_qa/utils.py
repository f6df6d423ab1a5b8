"""shapes_qa: exact match scored by lmms-eval's own metric (case, punctuation, articles and spaces ignored, as
eval_vlm.py normalises), and the yes/no questions by lmms-eval's POPE scoring, so the two harnesses can be compared
on the same predictions. English questions only: POPE's scoring knows "yes" and "no", not 是 and 否."""

from lmms_eval.api.metrics import exact_match_hf_evaluate
from lmms_eval.tasks.pope.utils import (pope_aggregate_accuracy, pope_aggregate_f1_score,
                                        pope_aggregate_precision, pope_aggregate_recall, pope_aggregate_yes_ratio,
                                        pope_process_results)

# The YAML names these aggregations through this module.
__all__ = ["doc_to_text", "doc_to_visual", "english_only", "pope_aggregate_accuracy", "pope_aggregate_f1_score",
           "pope_aggregate_precision", "pope_aggregate_recall", "pope_aggregate_yes_ratio", "process_results"]
IGNORED = [r"(?i)\b(a|an|the)\b", r"\s+"]


def english_only(dataset):
    return dataset.filter(lambda doc: doc["lang"] == "en")


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    scores = {"exact_match": exact_match_hf_evaluate([results[0]], [doc["answer"]], regexes_to_ignore=IGNORED,
                                                     ignore_case=True, ignore_punctuation=True)["exact_match"]}
    if doc["answer"].lower() in ("yes", "no"):
        scores.update(pope_process_results(doc, results))
    return scores
