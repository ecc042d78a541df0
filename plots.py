"""Every figure of the project. These functions draw what others computed; none computes."""
from __future__ import annotations

import math
from pathlib import Path


def _plt():
    import matplotlib.pyplot as plt
    return plt


def image_grid(matches, title: str = "", columns: int = 3, path=None, ax_size: float = 2.6):
    """Draw search results (objects with .path and .score) as a grid; save to `path` if given."""
    from PIL import Image
    plt = _plt()
    rows = max(1, math.ceil(len(matches) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * ax_size, rows * ax_size + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, matches):
        with Image.open(m.path) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_title(f"{m.score:.3f}", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)


def query_grids(results: dict, path=None, ax_size: float = 1.6):
    """One row per query: {query: [matches]} -> a single figure."""
    from PIL import Image
    plt = _plt()
    columns = max(len(m) for m in results.values())
    fig, axes = plt.subplots(len(results), columns, squeeze=False,
                             figsize=(columns * ax_size + 1.5, len(results) * ax_size))
    for row, (query, matches) in zip(axes, results.items()):
        for ax in row:
            ax.set_xticks([]), ax.set_yticks([])
            ax.spines[:].set_visible(False)
        row[0].set_ylabel(query, rotation=0, ha="right", va="center", fontsize=9)
        for ax, m in zip(row, matches):
            with Image.open(m.path) as im:
                ax.imshow(im.convert("RGB"))
    fig.tight_layout()
    return _finish(fig, path)


def training_curves(history: list[dict], path=None):
    """Loss per step, recall and temperature per epoch, from train.py's log entries."""
    plt = _plt()
    steps = [h for h in history if "loss" in h and "step" in h and "epoch_end" not in h]
    epochs = [h for h in history if h.get("epoch_end")]
    fig, (ax_loss, ax_rec, ax_temp) = plt.subplots(1, 3, figsize=(13, 3.6))
    ax_loss.plot([h["step"] for h in steps], [h["loss"] for h in steps], lw=0.8, label="train")
    ax_loss.set(xlabel="step", ylabel="contrastive loss", title="loss")
    for key, label in (("val_text_to_image_R@1", "text->image R@1"),
                       ("val_text_to_image_R@5", "text->image R@5"),
                       ("val_image_to_text_R@1", "image->text R@1")):
        pts = [(h["epoch"], h[key]) for h in epochs if key in h]
        if pts:
            ax_rec.plot(*zip(*pts), marker="o", label=label)
    ax_rec.set(xlabel="epoch", ylabel="recall (%)", title="validation recall")
    ax_rec.legend(fontsize=8)
    pts = [(h["step"], h["temperature"]) for h in steps if "temperature" in h]
    if pts:
        ax_temp.plot(*zip(*pts))
    ax_temp.set(xlabel="step", ylabel="1 / logit_scale", title="temperature")
    fig.tight_layout()
    return _finish(fig, path)


def confusion_matrix(matrix, class_names, path=None, title: str = ""):
    """Row-normalised confusion matrix (rows = true class, columns = predicted); class names
    on the axes up to 30 classes (indices beyond), cell values written up to 12 classes;
    save to `path` if given."""
    import numpy as np
    plt = _plt()
    counts = np.asarray(matrix, dtype=float)
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # fraction of each true class
    C = len(class_names)
    side = min(16.0, 3.5 + 0.28 * C)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    shown = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if C <= 30:
        ax.set_xticks(range(C), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(C), class_names, fontsize=8)
    else:  # names would overlap: class indices every 10 (the JSON lists the names in order)
        ax.set_xticks(range(0, C, 10)), ax.set_yticks(range(0, C, 10))
    if C <= 12:
        for i in range(C):
            for j in range(C):
                ax.text(j, i, f"{rows[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if rows[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted class", ylabel="true class", title=title or "zero-shot confusion")
    fig.tight_layout()
    return _finish(fig, path)


def _finish(fig, path):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        _plt().close(fig)
    return fig


def captions_figure(image, matches, path=None, title: str = ""):
    """Draw an image (a path or PIL image) beside its best captions (objects with .caption
    and .score, best first, as from search.find_captions); save to `path` if given."""
    from PIL import Image
    plt = _plt()
    fig, (ax_img, ax_txt) = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [1, 1.8]})
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            ax_img.imshow(im.convert("RGB"))
    else:
        ax_img.imshow(image)
    ax_img.axis("off")
    ax_img.set_title(title or (Path(image).name if isinstance(image, (str, Path)) else ""), fontsize=9)
    ax_txt.axis("off")
    for row, m in enumerate(matches):
        ax_txt.text(0, 1 - (row + 0.5) / max(len(matches), 5), f"{m.score:.3f}  {m.caption}",
                    fontsize=9, va="center", transform=ax_txt.transAxes, wrap=True)
    fig.tight_layout()
    return _finish(fig, path)
