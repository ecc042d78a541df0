"""What the search page loads and says it loaded: the caption index its image -> text side ranks
(`caption_index`), the example queries and labels that fit the gallery (`gallery_is_synthetic`,
`synthetic_labels`), and the "What is loaded" panel (`describe_run`). No Gradio here."""
from __future__ import annotations

import json
import os
from pathlib import Path

from clipModel import tower_adapter

from clip_foundation.data.synthetic import is_synthetic
from clip_foundation.data.records import DataError, Record
from clip_foundation.search.gallery import Gallery, gallery_records, load_or_build_caption_index
from clip_foundation.search.kinds import Index


def caption_index(gallery: Gallery, source: str, data, backend: str) -> tuple[Index | None, str]:
    """The caption index named by `source` -> (index or None, a line saying where it came from)."""
    try:
        if source == "gallery":
            records, what = gallery.records, "the gallery's captions"
        elif source == "train":
            records, what = gallery_records(gallery.checkpoint, data, "train"), "the run's training captions"
        else:
            path = Path(source)
            if not path.is_file():
                raise DataError(f"{path}: caption file not found")
            lines = [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
            records, what = [Record(path.resolve(), lines)], f"{path.name}"
        if not any(r.captions for r in records):
            raise DataError(f"{what}: none")
        index = load_or_build_caption_index(gallery.model, gallery.checkpoint, records, backend=backend)
        return index, f"{len(index)} from {what}"
    except (OSError, DataError, UnicodeDecodeError) as e:
        return None, f"none ({e}); pass --captions=FILE, one caption per line"


def gallery_is_synthetic(checkpoint, data) -> bool:
    """Whether the gallery is the built-in synthetic set (its example queries are about shapes)."""
    from clip_foundation.data.splits import run_data_config
    try:
        folder = Path(data) if data else Path(run_data_config(checkpoint).path)
    except (OSError, ValueError):
        return False
    return is_synthetic(folder)


def synthetic_labels() -> str:
    """The zero-shot labels that fit the synthetic set: one per colour it draws."""
    from clip_foundation.data.synthetic import COLORS
    return ", ".join(f"a {colour} shape" for colour in COLORS)


def describe_run(gallery: Gallery, captions: Index | None, caption_note: str, data, split) -> dict:
    """What the page shows as loaded: model, towers, gallery, index kind, the run's test recall."""
    cfg, folder = gallery.model.config, Path(gallery.checkpoint)
    towers = [tower_adapter("image", cfg.image.kind).describe(cfg.image),  # from the config: no tower is read
              tower_adapter("text", cfg.text.kind).describe(cfg.text)]
    faiss = gallery.images.meta.get("faiss")
    index = "exact (matrix product + top-k)" if not faiss else faiss["type"] + "".join(
        f", {k} {v}" for k, v in faiss.items() if k in ("nlist", "nprobe") or k.startswith("recall@"))
    info = {"model": folder.resolve().name,
            "towers": f"image: {towers[0]}, {cfg.image.image_size} px; text: {towers[1]}; "
                      f"{cfg.projection_dim}-d embeddings",
            "gallery": f"{len(gallery):,} images (the index {gallery.index_folder})" if gallery.index_folder
                       else f"{len(gallery):,} images ({split} split of {data})" if not _is_folder(gallery)
                       else f"{len(gallery):,} images under {Path(os.path.commonpath(gallery.images.paths))}",
            "index": index, "captions": caption_note}
    try:
        m = json.loads((folder / "metrics.json").read_text())
        info["test recall"] = (f"text -> image R@1/5/10 {m['text_to_image_R@1']:.1f} / {m['text_to_image_R@5']:.1f}"
                               f" / {m['text_to_image_R@10']:.1f} on {m.get('images', '?')} {m.get('split', '')}"
                               " images")
    except (OSError, ValueError, KeyError, TypeError):
        info["test recall"] = "not measured (no metrics.json in the checkpoint folder)"
    return info


def _is_folder(gallery: Gallery) -> bool:  # a plain folder of photos: no captions anywhere
    return bool(gallery.records) and not any(r.captions for r in gallery.records)
