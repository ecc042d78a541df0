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


def _finish(fig, path):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        _plt().close(fig)
    return fig
