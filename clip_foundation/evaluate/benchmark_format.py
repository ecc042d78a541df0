"""CLIP_benchmark's result file: the project's metrics -> the JSON `clip_benchmark eval` writes.

    {"dataset": "flickr8k", "model": "...", "pretrained": "runs/NAME", "task": "zeroshot_retrieval",
     "metrics": {"image_retrieval_recall@1": 0.29, "text_retrieval_recall@1": 0.32, ...},
     "language": "en"}

Values are fractions in [0, 1] (the project's own JSON has percents). Key by key:
- image_retrieval_recall@k = text -> image recall@k: one query per caption, over every image;
- text_retrieval_recall@k = image -> text recall@k: an image hits if any of its captions is in
  its top k;
- acc1, acc5 = top-1, top-5 zero-shot accuracy; acc5 is NaN under 5 classes (CLIP_benchmark
  writes it so, as a bare `NaN` that Python's json reads back);
- mean_per_class_recall = the mean over classes of each class's accuracy (sklearn's balanced
  accuracy, which CLIP_benchmark calls).
Pure functions over the dicts `retrieval.retrieval_metrics` and `zeroshot.zeroshot_evaluate` return.
"""
from __future__ import annotations

import math

RETRIEVAL = "zeroshot_retrieval"  # CLIP_benchmark's task names
CLASSIFICATION = "zeroshot_classification"


def retrieval_metrics(metrics: dict) -> dict[str, float]:
    """Recall@K in % (`text_to_image_R@K`, `image_to_text_R@K`) -> CLIP_benchmark's keys, for
    every K the project computed, in the order CLIP_benchmark writes them (both ways per K)."""
    ks = sorted(int(key.rsplit("@", 1)[1]) for key in metrics if key.startswith("text_to_image_R@"))
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = metrics[f"text_to_image_R@{k}"] / 100
        out[f"text_retrieval_recall@{k}"] = metrics[f"image_to_text_R@{k}"] / 100
    return out


def classification_metrics(metrics: dict) -> dict[str, float]:
    """Zero-shot accuracy in % (`top1`, `top5`, `mean_per_class_recall`) -> acc1, acc5,
    mean_per_class_recall; acc5 is NaN under 5 classes, as CLIP_benchmark leaves it."""
    return {"acc1": metrics["top1"] / 100,
            "acc5": metrics["top5"] / 100 if metrics["classes"] >= 5 else math.nan,
            "mean_per_class_recall": metrics["mean_per_class_recall"] / 100}


def result(task: str, metrics: dict, dataset: str, model: str, pretrained: str, language: str = "en") -> dict:
    """The whole file, with CLIP_benchmark's keys in its order: `model` names the architecture,
    `pretrained` the weights (a checkpoint path, as CLIP_benchmark writes local weights)."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
            "metrics": metrics, "language": language}
