"""Prebuilt index folders of every kind: the `Index` every kind offers, and the one registry that
recognises and opens a folder (`open_index`, used by search.py --index, app.py --index and
`Gallery.from_index`).

    INDEX_KINDS = {"mmap": ..., "gallery": ...}   # tried in this order; a new kind is one more entry
    index = open_index("DIR", "images", checkpoint)
    index.prepare(backend, "DIR", device); index.search(queries, k, backend)

Built in: "mmap", a folder of millions indexed from an embedding folder under a memory budget
(`mmap_index.BigIndex`, images only), and "gallery", a folder written by `search.py --build_index
--out=DIR` (`index.GalleryIndex`: images.* and captions.*). A folder no kind recognises is opened
as DEFAULT_KIND, whose errors say what a complete index holds. Nobody else tells the kinds apart:
callers use the `Index` methods.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from clip_foundation.common.files import model_digest
from clip_foundation.search.index import INDEX_VERSION, BadIndexError, load_index
from clip_foundation.search.mmap_index import REBUILD, BigIndex, is_big_index


class Index(Protocol):
    """What every index kind offers the search command, `Gallery` and the page."""
    meta: dict  # at least "checkpoint" (the model it was built with) and "model" (its weights' sha256)
    captions: list[str] | None  # a caption index: the text of each row; None: rows are images

    @property
    def paths(self) -> Sequence[str]:
        """The image path (or URL) of each row."""

    def __len__(self) -> int:
        """The number of rows."""

    def search(self, queries: torch.Tensor, k: int, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Top-`k` rows of each (Q, D) normalised query -> (scores, indices), (Q, k) each, best
        first, on the CPU; index -1 where fewer rows were found. `backend`: auto | exact | faiss."""

    def prepare(self, backend: str = "auto", folder=None, device=None) -> None:
        """Ready it for searching with `backend` (e.g. a FAISS index built, and saved in the prebuilt
        `folder` when given) on `device` (None: the CPU)."""

    def mark_missing(self, folder, missing: list[str]) -> None:
        """Note, best effort, that these of its images are gone, so a later open can warn."""


@dataclass(frozen=True)
class IndexKind:
    """One kind of prebuilt index folder: how to recognise one, and how to open it."""
    detect: Callable[[Path], bool]  # whether a folder holds (or was being written as) this kind
    open: Callable[..., Index]  # (folder, "images" | "captions", checkpoint or None) -> Index; BadIndexError


def register_index_kind(name: str, detect: Callable[[Path], bool], open: Callable[..., Index]) -> IndexKind:
    """Add (or replace) the index kind `name`: `detect(folder)` says whether a folder is one,
    `open(folder, kind, checkpoint)` opens it as an `Index` checked against `checkpoint`'s model
    (default: the one it was built with). Kinds are tried in the order they were registered."""
    INDEX_KINDS[name] = IndexKind(detect, open)
    return INDEX_KINDS[name]


def open_index(folder, kind: str = "images", checkpoint=None) -> Index:
    """The prebuilt index folder `folder`, of whichever registered kind recognises it (the first
    in INDEX_KINDS; none: DEFAULT_KIND), as an `Index` of `kind` rows ("images" or "captions"),
    checked against `checkpoint` (default: the checkpoint it was built with). BadIndexError, one
    line, when it cannot be searched with that model."""
    found = next((k for k in INDEX_KINDS.values() if k.detect(folder)), INDEX_KINDS[DEFAULT_KIND])
    return found.open(folder, kind, checkpoint)


# ---------------------------------------------------------------- the built-in kinds

def open_big(folder, kind: str = "images", checkpoint=None) -> BigIndex:
    """A folder written by `--build_index --embeddings=EMB --index=DIR` (images only), its files
    verified and its model checked -> BigIndex."""
    if kind != "images":
        raise BadIndexError(f"{folder} indexes images only (built from an embedding folder): "
                            "image -> text search needs a caption index (--build_index --data=DIR)")
    index = BigIndex.open(folder, verify=True)  # every open: a file changed in place keeps its size
    check_model(index.folder, index.meta, checkpoint,
                "embed the gallery with it (python -m clip_foundation.embed --checkpoint={checkpoint} "
                "--data=GALLERY --out=EMB) and " + REBUILD)
    return index


def is_prebuilt(folder) -> bool:
    """Whether `folder` holds an index written by `search.py --build_index --out=DIR`."""
    return any((Path(folder) / f"{stem}.json").is_file() for stem in ("images", "captions"))


def open_prebuilt(folder, kind: str = "images", checkpoint=None):
    """The `kind` index ("images" or "captions") of a folder written by --build_index, checked
    against `checkpoint` (default: the checkpoint it was built with) -> GalleryIndex."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadIndexError(f"{folder}: index folder not found (build one with --build-index)")
    if kind == "captions" and not (folder / "captions.json").is_file() and (folder / "images.json").is_file():
        images = _read_json(folder / "images.json")
        if images.get("captioned") is False:
            raise BadIndexError(f"{folder} has no caption index: its gallery had no captions "
                                "(image -> text search needs a captioned dataset)")
        # the build writes the image index first: one killed in between leaves only that
        raise BadIndexError(f"{folder} is incomplete: its caption index (captions.json) is missing, so its "
                            "build was interrupted; rebuild it with python search.py --build-index "
                            f"--checkpoint {images.get('checkpoint', 'RUN')} --data DIR --out {folder}")
    if not (folder / f"{kind}.json").is_file():
        what = "image" if kind == "images" else "caption"
        raise BadIndexError(f"{folder}: no complete {what} index ({kind}.json + {kind}.safetensors, "
                            f"format v{INDEX_VERSION}); build one with --build-index")
    try:
        index = load_index(folder / kind, strict=True)
    except BadIndexError as e:  # its images may be gone: only a new build can mend it
        raise BadIndexError(f"{e}; rebuild it with --build-index") from None
    if index.meta.get("missing"):
        print(f"warning: {folder} is stale: {len(index.meta['missing'])} of its images were missing when "
              f"it was last searched (first: {index.meta['missing'][0]}); rebuild it with --build-index",
              file=sys.stderr)
    check_model(folder, index.meta, checkpoint)
    return index


def _read_json(path) -> dict:
    """An index's JSON as a dict; {} when it cannot be read (the caller decides what that means)."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def check_model(folder, meta: dict, checkpoint=None,
                rebuild: str = "rebuild it with --build-index --checkpoint {checkpoint}") -> None:
    """BadIndexError unless `checkpoint` (default: meta's "checkpoint") holds the model whose
    weights' sha256 is meta's "model": an index is searched with the model that embedded it.
    `rebuild`: how to build the index again for `checkpoint` (the index kind's own command)."""
    saved = meta.get("checkpoint")
    if not checkpoint and not (isinstance(saved, str) and saved):
        raise BadIndexError(f"{folder}: its index names no checkpoint ({saved!r}): pass --checkpoint=DIR, "
                            "the model it was built with")
    if not checkpoint and not (Path(saved) / "model.safetensors").is_file():
        raise BadIndexError(f"{folder} was built with the checkpoint {saved}, which is not there (moved or "
                            "deleted?): pass --checkpoint=DIR where that model is now")
    checkpoint = Path(checkpoint or saved)
    current = model_digest(checkpoint)
    if current != meta.get("model"):
        raise BadIndexError(f"{folder} was built with another model (checkpoint "
                            f"{meta.get('checkpoint')}, weights {str(meta.get('model'))[:12]}) "
                            f"than {checkpoint} (weights {current[:12]}); search it with --checkpoint=DIR "
                            f"of that model, or {rebuild.format(checkpoint=checkpoint, folder=folder)}")


INDEX_KINDS: dict[str, IndexKind] = {
    "mmap": IndexKind(is_big_index, open_big),  # first: its index.json is what a folder of it is known by
    "gallery": IndexKind(is_prebuilt, open_prebuilt),
}
DEFAULT_KIND = "gallery"  # opens a folder no kind recognises, to say what is missing there
