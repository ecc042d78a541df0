"""Every figure of the project. These functions draw what others computed; none computes."""
from __future__ import annotations

import math
from pathlib import Path


def _plt():
    import matplotlib.pyplot as plt
    return plt


def _as_array(image):
    """A path, PIL image, (H, W, 3) array or (3, H, W) uint8 tensor -> an (H, W, 3) array for imshow.
    Every figure shows image files through here: decoded as the loader does (readers.open_rgb:
    EXIF rotation applied, so phone photos stand upright); an unreadable file raises DataError."""
    import numpy as np
    from PIL import Image
    from clip_foundation.data.records import open_rgb
    if isinstance(image, (str, Path)):
        return np.asarray(open_rgb(image))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    return array.transpose(1, 2, 0) if array.ndim == 3 and array.shape[0] in (1, 3) else array


def image_grid(matches, title: str = "", columns: int = 3, path=None, ax_size: float = 2.6):
    """Draw search results (objects with .path and .score) as a grid; save to `path` if given."""
    plt = _plt()
    rows = max(1, math.ceil(len(matches) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * ax_size, rows * ax_size + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, matches):
        ax.imshow(_as_array(m.path))
        ax.set_title(f"{m.score:.3f}", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)


def image_grid_png(matches, title: str = "", columns: int = 3, dpi: int = 80) -> bytes:
    """`image_grid` as PNG bytes (for a result list's `_repr_png_` in Jupyter); the figure is closed,
    so an inline backend does not draw it a second time."""
    import io
    fig = image_grid(matches, title=title, columns=columns)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    _plt().close(fig)
    return buffer.getvalue()


def query_grids(results: dict, path=None, ax_size: float = 1.6):
    """One row per query: {query: [matches]} -> a single figure."""
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
            ax.imshow(_as_array(m.path))
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
    """Draw an image (a path, PIL image or array) beside its best captions (objects with .caption
    and .score, best first, as from search.find_captions); save to `path` if given."""
    plt = _plt()
    fig, (ax_img, ax_txt) = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [1, 1.8]})
    ax_img.imshow(_as_array(image))
    ax_img.axis("off")
    ax_img.set_title(title or (Path(image).name if isinstance(image, (str, Path)) else ""), fontsize=9)
    ax_txt.axis("off")
    for row, m in enumerate(matches):
        ax_txt.text(0, 1 - (row + 0.5) / max(len(matches), 5), f"{m.score:.3f}  {m.caption}",
                    fontsize=9, va="center", transform=ax_txt.transAxes, wrap=True)
    fig.tight_layout()
    return _finish(fig, path)


# ---------------------------------------------------------------- notebook figures (build_model.ipynb)

def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "\u2026"


def captioned_images(images, captions, columns: int = 4, path=None, ax_size: float = 2.6, width: int = 30):
    """Images (paths, PIL images, arrays or (3, H, W) uint8 tensors), each with its caption
    wrapped underneath; save to `path` if given."""
    import textwrap
    plt = _plt()
    rows = max(1, math.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * ax_size, rows * (ax_size + 0.7)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(_as_array(image))
        ax.set_title("\n".join(textwrap.wrap(caption, width)[:3]), fontsize=8, y=-0.02, va="top")
    fig.tight_layout()
    return _finish(fig, path)


def similarity_matrix(matrix, images, captions, title: str = "", path=None, max_chars: int = 45):
    """A batch's (B, B) image x caption scores as a heatmap: `matrix[i][j]` scores image i
    against caption j (as `logits_per_image` in loss.clip_loss). Captions label the rows,
    image thumbnails the columns, values are written in the cells and the matching pairs
    (the diagonal) are outlined; save to `path` if given."""
    import numpy as np
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    from matplotlib.patches import Rectangle
    plt = _plt()
    scores = np.asarray(matrix.detach().cpu() if hasattr(matrix, "detach") else matrix, dtype=float).T
    B = len(captions)
    cell = 0.62  # inches per cell
    fig, ax = plt.subplots(figsize=(B * cell + 4.2, B * cell + 1.6))
    shown = ax.imshow(scores, cmap="viridis", aspect="equal")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03, label="scale \u00d7 cosine similarity")
    ax.set_yticks(range(B), [_short(c, max_chars) for c in captions], fontsize=8)
    ax.set_xticks(range(B), [""] * B)
    ax.tick_params(length=0)
    ax.set_xlabel("rows: captions, columns: images; outlined: the matching pairs", fontsize=8)
    low, high = scores.min(), scores.max()
    for j in range(B):
        for i in range(B):
            bright = (scores[j, i] - low) > 0.6 * (high - low + 1e-12)
            ax.text(i, j, f"{scores[j, i]:.1f}", ha="center", va="center", fontsize=7,
                    color="black" if bright else "white")
        ax.add_patch(Rectangle((j - 0.44, j - 0.44), 0.88, 0.88, fill=False, edgecolor="red", lw=1.8))
    thumb = cell * 72 * 0.9  # thumbnail side in points
    for i, image in enumerate(images):
        pixels = _as_array(image)
        box = OffsetImage(pixels, zoom=thumb / max(pixels.shape[:2]))
        ax.add_artist(AnnotationBbox(box, (i, -0.5), xybox=(0, thumb / 2 + 3), xycoords="data",
                                     boxcoords="offset points", frameon=False, annotation_clip=False))
    ax.set_title(title, pad=thumb + 10, fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


def class_probabilities(images, predictions, title: str = "", top: int = 5, path=None, ax_size: float = 2.6):
    """Zero-shot results: each image above a bar chart of its best `top` (label, probability)
    pairs (as from zeroshot.classify, best first); save to `path` if given."""
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(n * ax_size + 0.8, 2 * ax_size + 0.4), squeeze=False,
                             gridspec_kw={"height_ratios": [1.1, 1]})
    for col, (image, preds) in enumerate(zip(images, predictions)):
        axes[0, col].imshow(_as_array(image))
        axes[0, col].axis("off")
        labels, probs = zip(*preds[:top])
        bars = axes[1, col]
        bars.barh(range(len(probs)), probs, color=["tab:green"] + ["tab:gray"] * (len(probs) - 1))
        bars.set_yticks(range(len(labels)), [_short(label, 22) for label in labels], fontsize=8)
        bars.invert_yaxis()
        bars.set_xlim(0, 1)
        bars.tick_params(axis="x", labelsize=7)
        bars.set_xlabel("probability", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)
