"""Zero-shot classification: class names -> prompt-ensembled text classifier -> accuracy.

    python evaluate.py --checkpoint runs/NAME --zeroshot DATA            # DATA/<class>/*.jpg
    python evaluate.py --checkpoint runs/NAME --zeroshot cifar10:ROOT    # torchvision's files

Every class name is written into each prompt template ("a photo of a {}."), the prompts
are embedded and L2-normalised, averaged per class and re-normalised (CLIP's prompt
ensembling), giving one (C, D) classifier; an image's class is its most similar row.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clipModel import resize_crop
from clip_foundation.data.splits import decode_images
from clip_foundation.engines.registry import encoder_of
from clip_foundation.evaluate.metrics import embed_images, embed_texts, eval_mode
from clip_foundation.data.records import DataError, open_rgb
from clip_foundation.data.sources import read_class_folders

TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.",
             "a drawing of a {}.", "a close-up photo of a {}.", "a photo of a small {}.",
             "a photo of a large {}.")
CIFAR_FILES = ("cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta")


# ---------------------------------------------------------------- metrics (pure tensor functions)

def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Top-k accuracy (in %) for each k: `logits` (N, C), `labels` (N,) class indices.

    A sample hits at k when fewer than k other classes score at least as high as its label
    (a tie counts against the label, as in evaluate.retrieval_metrics)."""
    if not torch.isfinite(logits).all():  # NaN compares false everywhere: it would rank first
        raise ValueError("non-finite logits (NaN or inf): the model's weights are corrupt")
    true = logits.gather(1, labels[:, None].to(logits.device))  # (N, 1)
    rank = (logits >= true).sum(1)  # (N,) 1-based rank of the true class, ties ranked above it
    return {k: 100.0 * (rank <= k).float().mean().item() for k in ks}


def confusion(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    C = num_classes
    flat = labels.long().cpu() * C + pred.long().cpu()  # (N,) cell index
    return torch.bincount(flat, minlength=C * C).view(C, C)


def per_class_accuracy(matrix: torch.Tensor) -> torch.Tensor:
    """(C,) accuracy in % of each true class from a confusion matrix; NaN for empty rows."""
    totals = matrix.sum(1).double()
    return 100.0 * matrix.diagonal().double() / totals  # 0/0 -> NaN


def mean_per_class_recall(matrix: torch.Tensor) -> float:
    """Mean in % of the per-class accuracies of the classes that have images (balanced
    accuracy, CLIP_benchmark's mean_per_class_recall): every class weighs the same."""
    return per_class_accuracy(matrix).nanmean().item()


# ---------------------------------------------------------------- prompts and the classifier

def clean_class_name(name: str) -> str:
    """Class name -> prompt words: "golden_retriever" -> "golden retriever"."""
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip()


def read_templates(path) -> list[str]:
    """One template per line, each with one `{}` for the class name; blank lines and
    lines starting with `#` are ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: templates file not found")
    templates = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        if text.count("{}") != 1:
            raise DataError(f"{path}:{line}: a template needs exactly one '{{}}' for the class "
                            f"name, got {text!r}")
        templates.append(text)
    if not templates:
        raise DataError(f"{path}: no templates (one per line, e.g. 'a photo of a {{}}.')")
    return templates


def zeroshot_classifier(model, class_names, templates=TEMPLATES) -> torch.Tensor:
    """Prompt-ensembled class embeddings (C, D): per class, the normalised mean of the
    normalised embeddings of every template filled with the cleaned class name."""
    prompts = [t.format(clean_class_name(c)) for c in class_names for t in templates]
    with eval_mode(model), torch.no_grad():
        emb = embed_texts(model, prompts)  # (C * T, D), each row normalised
    return F.normalize(emb.view(len(class_names), len(templates), -1).mean(1), dim=-1)


def classify(model, image, labels, templates=None) -> list[tuple[str, float]]:
    """Classify one image among `labels`: -> [(label, probability)], best first, summing to 1.

    `image` is a PIL image, a path, or a (3, H, W) / (1, 3, H, W) tensor (uint8, or float
    pixel values in [0, 1]). With `templates=None` each label is used as written
    ("a red circle"); pass e.g. `zeroshot.TEMPLATES` to prompt-ensemble bare class names.
    Probabilities are a softmax over the model's (clamped) logit_scale * cosine similarity.
    """
    if isinstance(image, (str, Path)):
        image = open_rgb(image)
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        if len(image) != 1:
            raise ValueError(f"classify takes one image, got a batch of {len(image)}")
        image = image[0]
    x = model.image_transform(train=False)(image)  # (3, S, S) normalised
    with eval_mode(model), torch.no_grad():
        text = (zeroshot_classifier(model, labels, templates) if templates
                else embed_texts(model, list(labels)))  # (C, D)
        features = encoder_of(model).encode_images(x[None])  # (1, D), by the model's engine
        probs = (model.scale() * features @ text.T).softmax(-1)[0].cpu()  # (C,)
    order = probs.argsort(descending=True).tolist()
    return [(labels[i], probs[i].item()) for i in order]


# ---------------------------------------------------------------- labelled image sets

@dataclass
class LabelledImages:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) class indices
    class_names: list[str]
    name: str  # short name for output files, e.g. "cifar10"
    split: str  # "test", or "all" when the folder has no test split


def load_labelled(spec: str, image_size: int, progress: bool = True) -> LabelledImages:
    """`cifar10:ROOT` (torchvision's CIFAR-10 test set, never downloaded) or a folder of
    class folders (its test/ split when it has one), decoded to uint8 images."""
    if spec.lower().startswith("cifar10:"):
        return _load_cifar10(spec.split(":", 1)[1] or ".")
    if not Path(spec).is_dir():
        raise DataError(f"{spec}: folder not found (expected DATA/<class>/*.jpg, optionally under "
                        "DATA/train/ and DATA/test/, or cifar10:ROOT)")
    records, class_names = read_class_folders(spec)
    split = "test" if any(r.split == "test" for r in records) else "all"
    if split == "test":
        records = [r for r in records if r.split == "test"]
    images, records = decode_images(records, image_size, progress=progress)
    index = {c: i for i, c in enumerate(class_names)}
    labels = torch.tensor([index[r.extra["label"]] for r in records])
    name = re.sub(r"[^\w.-]+", "_", Path(spec).resolve().name) or "classes"
    return LabelledImages(images, labels, class_names, name, split)


def _load_cifar10(root: str) -> LabelledImages:
    root = Path(root)
    if root.name == "cifar-10-batches-py":  # the extracted folder itself
        root = root.parent
    missing = [str(root / f) for f in CIFAR_FILES if not (root / f).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 not found: expected {' and '.join(missing)} (the python "
                        f"version, cifar-10-python.tar.gz, extracted into {root}); "
                        "nothing is downloaded")
    from torchvision.datasets import CIFAR10
    try:
        ds = CIFAR10(str(root), train=False, download=False)
    except RuntimeError as e:  # torchvision checks the md5 of every batch file and the meta file
        raise DataError(f"{root / 'cifar-10-batches-py'}: torchvision cannot read CIFAR-10 ({e}); "
                        "nothing is downloaded") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
    return LabelledImages(images, torch.tensor(ds.targets), list(ds.classes), "cifar10", "test")


def _embed(model, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    # uint8 images of any size -> normalised features, resized in chunks to bound memory
    S = model.config.image.image_size
    if images.shape[-2:] == (S, S):
        return embed_images(model, images, batch_size)
    resize = resize_crop(S)
    return torch.cat([embed_images(model, resize(images[s:s + 1024]).as_subclass(torch.Tensor),
                                   batch_size) for s in range(0, len(images), 1024)])


# ---------------------------------------------------------------- evaluation

def zeroshot_evaluate(model, data: LabelledImages, templates=TEMPLATES,
                      batch_size: int = 256) -> dict:
    """Top-1 / top-min(5, C) accuracy, per-class accuracy, its mean over the classes that have
    images (mean per-class recall) and the confusion matrix of `model`; accuracies in %."""
    C = len(data.class_names)
    if len(data.images) == 0:
        raise DataError(f"{data.name}: no images to classify")
    with eval_mode(model), torch.no_grad():
        features = _embed(model, data.images, batch_size)  # (N, D)
    logits = features @ zeroshot_classifier(model, data.class_names, templates).T  # (N, C)
    k = min(5, C)
    acc = topk_accuracy(logits, data.labels, sorted({1, k}))
    matrix = confusion(logits.argmax(1), data.labels, C)
    per_class = per_class_accuracy(matrix).tolist()
    return {"top1": acc[1], f"top{k}": acc[k], "chance_top1": 100.0 / C, "images": len(data.labels),
            "mean_per_class_recall": mean_per_class_recall(matrix),
            "classes": C, "split": data.split, "class_names": list(data.class_names),
            "per_class_accuracy": {c: (None if math.isnan(a) else a)
                                   for c, a in zip(data.class_names, per_class)},
            "class_images": dict(zip(data.class_names, matrix.sum(1).tolist())),
            "confusion": matrix.tolist(), "templates": list(templates)}


def format_zeroshot(m: dict, max_rows: int = 30) -> str:
    """A small table: top-1/top-k, chance, and per-class accuracy (up to `max_rows` classes)."""
    k = min(5, m["classes"])
    rows = [f"zero-shot: {m['classes']} classes, {m['images']} images ({m['split']}), "
            f"{len(m['templates'])} templates",
            f"{'top-1':12}{m['top1']:7.1f}   (chance {m['chance_top1']:.1f})"]
    if k > 1:
        rows.append(f"{f'top-{k}':12}{m[f'top{k}']:7.1f}")
    rows.append(f"{'per-class':12}{m['mean_per_class_recall']:7.1f}   (mean of the classes' accuracies)")
    if m["classes"] <= max_rows:
        rows.append(f"{'class':20}{'images':>7}{'acc':>7}")
        for c, a in m["per_class_accuracy"].items():
            rows.append(f"{c[:20]:20}{m['class_images'][c]:7d}" + (f"{a:7.1f}" if a is not None
                                                                   else f"{'-':>7}"))
    return "\n".join(rows)
