"""Galleries: images (and their captions) embedded once into an index, searched by text or by
image. `Gallery` bundles a model with its indexes for notebooks:

    gallery = Gallery.from_run("runs/NAME")            # the run's test images
    gallery.find_matches("a dog", n=9)                 # [Match(path, score), ...]
    gallery.show("a dog")                              # the same, drawn as a grid
    gallery.find_captions("photo.jpg")                 # [CaptionMatch(caption, score, image_path), ...]
    gallery = Gallery.from_index("INDEX_DIR")          # a prebuilt index, of any size (search.py --build_index)
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from clipModel import CLIPModel, check, model_folder

from clip_foundation.evaluate import querybank
from clip_foundation.search.kinds import Index, open_index
from clip_foundation.data.splits import decode_images, gallery_records
from clip_foundation.search.index import RECALL_QUERIES, GalleryIndex, ensure_faiss, load_index, save_index
from clip_foundation.search.cached import image_gallery, index_identity, paths_digest, user_index_dir
from clip_foundation.common.files import gallery_digest, model_digest
from clip_foundation.data.records import DataError, Record, open_rgb
from clip_foundation.engines.lazy import load_model
from clip_foundation.engines.registry import encoder_of, use_engine
from clip_foundation.evaluate.metrics import embed_images, embed_texts, eval_mode
from clip_foundation.search.quick import MAX_RESULTS, clean_query  # noqa: F401  (where callers find them)

GRID_CELLS = 100  # a grid draws at most the best this many: a 1,000-cell grid was a 15 MB PNG, 1.8 GB to draw


def check_n(n: int, zero_means: str = "") -> None:
    """The one range of a search's `n` (search.py's -n and the find functions): 1 to MAX_RESULTS,
    or 0 where `zero_means` names what 0 stands for; a ConfigError (a ValueError) otherwise."""
    check(1 <= n <= MAX_RESULTS or (n == 0 and bool(zero_means)), "n", n,
          f"1 to {MAX_RESULTS}" + (f", or 0 for {zero_means}" if zero_means else ""))


@dataclass
class Match:
    path: str
    score: float  # cosine similarity between the query and the image


class Matches(list):
    """Search results: a list of `Match(path, score)`, best first, that draws itself as a grid of
    its images with their scores in Jupyter, so `gallery.find_matches("dog")` at the end of a cell
    shows the pictures, as CLIP tutorials draw them, and stays a plain list in code."""

    def __init__(self, matches=(), query: str = ""):
        super().__init__(matches)
        self.query = query  # the grid's title

    def _repr_png_(self) -> bytes | None:
        from clip_foundation.evaluate.plots import image_grid_png
        return image_grid_png(self[:GRID_CELLS], title=self.query) if self else None


@dataclass
class CaptionMatch:
    caption: str
    score: float  # cosine similarity between the image and the caption
    image_path: str | None = None  # the gallery image this caption was written for


# ---------------------------------------------------------------- building indexes

def build_index(model: CLIPModel, records, batch_size: int = 256, images=None, *,
                skip_bad: bool = False, progress: bool = True, chunk: int = 4096) -> GalleryIndex:
    """Embed the gallery `records` (`images`: their decoded uint8 images, if already at hand).
    Images are decoded and embedded `chunk` at a time, so a gallery of any size fits in memory;
    with `skip_bad` undecodable images are left out (and reported) instead of raising."""
    from tqdm.auto import tqdm
    size, parts, kept = model.config.image.image_size, [], []
    with eval_mode(model), tqdm(total=len(records), desc=f"embedding {len(records)} images",
                                disable=not progress, leave=False) as bar:
        for s in range(0, len(records), chunk):
            if images is None:
                batch, recs = decode_images(records[s:s + chunk], size, skip_bad=skip_bad, progress=False)
            else:
                batch, recs = images[s:s + chunk], records[s:s + chunk]
            parts.append(embed_images(model, batch, batch_size).half().cpu())  # (c, D)
            kept += recs
            bar.update(min(chunk, len(records) - s))
    paths = [str(r.image) for r in kept]
    embeddings = torch.cat(parts) if parts else torch.empty(0, model.config.projection_dim).half()
    return GalleryIndex(embeddings, paths, gallery_digest(paths), meta={"kind": "images"})


def build_caption_index(model: CLIPModel, records, batch_size: int = 1024, *,
                        progress: bool = True) -> GalleryIndex:
    """Embed every caption of `records` (one row per caption; `paths` names its image)."""
    from tqdm.auto import tqdm
    captions = [c for r in records for c in r.captions]
    if not captions:
        raise DataError("this gallery has no captions: image -> text search needs a captioned "
                        "dataset (a folder of images alone has none)")
    paths = [str(r.image) for r in records for _ in r.captions]
    with eval_mode(model):
        parts = [embed_texts(model, captions[s:s + batch_size], batch_size).half().cpu()
                 for s in tqdm(range(0, len(captions), batch_size), disable=not progress, leave=False,
                               desc=f"embedding {len(captions)} captions")]
    return GalleryIndex(torch.cat(parts), paths, _caption_digest(captions, paths), captions,
                        meta={"kind": "captions"})


def _caption_digest(captions: list[str], paths: list[str]) -> str:
    h = hashlib.sha256()
    for c, p in zip(captions, paths):
        h.update(f"{p}\0{c}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _paths_key(records) -> str:  # names the cache file of one gallery
    return paths_digest(str(r.image) for r in records)[:16]


def index_from_tower_features(model: CLIPModel, records, tower_features: torch.Tensor,
                              chunk: int = 4096) -> GalleryIndex:
    """The image index of `records` from a frozen image tower's outputs (N, d_image), cached
    when the run trained: only the projection head runs, no image is decoded or encoded again."""
    with eval_mode(model), torch.no_grad():
        parts = [model.project_image(tower_features[s:s + chunk].to(model.device)).half().cpu()
                 for s in range(0, len(tower_features), chunk)]  # (c, D) each
    paths = [str(r.image) for r in records]
    embeddings = torch.cat(parts) if parts else torch.empty(0, model.config.projection_dim).half()
    return GalleryIndex(embeddings, paths, gallery_digest(paths), meta={"kind": "images"})


def load_or_build_index(model: CLIPModel, checkpoint, records, batch_size: int = 256,
                        images=None, *, tower_features=None, backend: str = "auto", stem=None,
                        skip_bad: bool = False) -> GalleryIndex:
    """The image index of `records`, cached in CHECKPOINT/index/ (or saved at `stem`), rebuilt
    when the model or a gallery file changed. `tower_features`: a frozen image tower's outputs
    for `records`, when at hand (then only the projection head runs). `backend` "auto" adds a
    FAISS index to large galleries when faiss is installed, "faiss" always, "exact" never.
    When the checkpoint has a querybank (train.py --querybank=N) each row carries its image's
    hub bias as one more coordinate, so text queries rank by the corrected score."""
    gallery = image_gallery([str(r.image) for r in records], checkpoint)  # the querybank's digest too
    # the bank itself (read and checked by load_bank) is needed only to build: a cached index is searched without
    bank = functools.cache(lambda: querybank.load_bank(checkpoint, model.config.projection_dim))
    name = f"images-{_paths_key(records)}"
    stems = [stem] if stem else [Path(checkpoint) / "index" / name, user_index_dir(checkpoint) / name]
    captions = [c for r in records for c in r.captions]

    def recall_queries():  # text -> image is what this index serves: measure IVF recall on captions
        if not captions:
            return None
        sample = random.Random(0).sample(captions, min(RECALL_QUERIES, len(captions)))
        queries = _encode(model, lambda: embed_texts(model, sample))
        return queries if bank() is None else querybank.normalised_texts(queries)

    def build():
        if tower_features is not None:
            index = index_from_tower_features(model, records, tower_features)
        else:
            index = build_index(model, records, batch_size, images, skip_bad=skip_bad)
        if bank() is not None:  # (N, D) -> (N, D + 1): the last coordinate is -bias
            rows = index.embeddings.float()
            index.embeddings = querybank.normalised_images(rows, querybank.hub_bias(rows, *bank())).half()
            index.meta["querybank"] = True
        index.meta["captioned"] = bool(captions)  # a caption index belongs beside it (a half-built folder lacks it)
        return index
    return _load_or_build(stems, checkpoint, gallery, backend, recall_queries, build)


def load_or_build_caption_index(model: CLIPModel, checkpoint, records, batch_size: int = 1024, *,
                                backend: str = "auto", stem=None) -> GalleryIndex:
    """The index of every caption of `records`, cached like `load_or_build_index` and rebuilt
    when the model or any caption changed."""
    captions = [c for r in records for c in r.captions]
    paths = [str(r.image) for r in records for _ in r.captions]
    name = f"captions-{_paths_key(records)}"
    stems = [stem] if stem else [Path(checkpoint) / "index" / name, user_index_dir(checkpoint) / name]
    return _load_or_build(stems, checkpoint, _caption_digest(captions, paths), backend, None,
                          lambda: build_caption_index(model, records, batch_size))


def _load_or_build(stems, checkpoint, gallery: str, backend: str, queries, build) -> GalleryIndex:
    # stems: where the index may be saved, in order of preference (the first that loads is used)
    model_id = model_digest(checkpoint)
    identity = index_identity(model_id, gallery)  # stale when the model or gallery changed
    for stem in stems:
        if (index := load_index(stem, identity)) is not None:
            return ensure_faiss(index, backend, stem, queries)  # built and saved now if missing
    index = build()
    index.identity = identity
    index.meta.update(checkpoint=str(Path(checkpoint).resolve()), model=model_id)
    ensure_faiss(index, backend, queries=queries)
    for i, stem in enumerate(stems):
        try:
            save_index(index, stem)
            return index
        except OSError as e:  # read-only checkpoint folder, disk full: search on, say where it went
            then = f"; saving it in {stems[i + 1].parent} instead" if i + 1 < len(stems) else \
                "; searching without saving it (it is rebuilt next time)"
            print(f"warning: could not save the index in {Path(stem).parent} ({e.strerror or e}){then}",
                  file=sys.stderr)
    return index


# ---------------------------------------------------------------- searching

def _encode(model: CLIPModel, encode) -> torch.Tensor:
    # A model in eval mode (as loaded) is used as it is: switching every submodule to eval and
    # back (`eval_mode`) costs more than a query's forward. One being trained gets the careful path.
    with eval_mode(model) if model.training else contextlib.nullcontext(), torch.no_grad():
        return encode().float()  # (Q, D)


def embed_image(model: CLIPModel, image) -> torch.Tensor:
    """A PIL image, an image file path, or a tensor -> its normalised embedding (1, D).

    A uint8 tensor (3, H, W) is an image, resized and normalised like gallery images; a float
    tensor (3, S, S) or (1, 3, S, S) is taken as model input, already normalised."""
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"{image}: image file not found")
        image = open_rgb(image)
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        x = image if image.dim() == 4 else image[None]  # (1, 3, S, S)
    else:
        if isinstance(image, torch.Tensor) and image.dim() == 4:
            image = image[0]
        x = model.image_transform()(image)[None]  # (1, 3, S, S)
    return _encode(model, lambda: encoder_of(model).encode_images(x))


def find_matches(model: CLIPModel, index: Index, query: str, n: int = 9,
                 backend: str = "auto") -> Matches:
    """The `n` gallery images most similar to the text `query`, best first, as `Matches` (a list
    of `Match(path, score)` that Jupyter draws as a grid); ValueError for a query `clean_query`
    refuses."""
    query = clean_query(query)
    check_n(n)
    text = _encode(model, lambda: embed_texts(model, [query]))  # (1, D), by the model's engine
    if index.meta.get("querybank"):
        text = querybank.normalised_texts(text)  # (1, D + 1): ranks by cosine - the image's hub bias
    return Matches(nearest_images(index, text, n, backend), query)


def nearest_images(index: Index, embedding: torch.Tensor, n: int, backend: str = "auto") -> list[Match]:
    """The `n` gallery images nearest the normalised (1, D) `embedding`, best first, with their
    cosines. On an index with a querybank, a (1, D + 1) text embedding from
    `querybank.normalised_texts` ranks and scores by cosine minus each image's hub bias."""
    if index.meta.get("querybank") and embedding.shape[1] == index.embeddings.shape[1] - 1:
        embedding = torch.cat([embedding, embedding.new_zeros(len(embedding), 1)], dim=1)  # plain cosine
    scores, rows = index.search(embedding, n, backend)
    return [Match(index.paths[i], s) for s, i in zip(scores[0].tolist(), rows[0].tolist()) if i >= 0]


def find_captions(model: CLIPModel, captions_index: Index, image, n: int = 5,
                  backend: str = "auto", distinct: bool = True) -> list[CaptionMatch]:
    """The `n` gallery captions that best describe `image` (a PIL image, a path or a tensor,
    see `embed_image`), best first; with `distinct`, a caption text is listed once."""
    check_n(n)
    if captions_index.captions is None:
        raise ValueError("not a caption index: build one with load_or_build_caption_index")
    query, total = embed_image(model, image), len(captions_index)
    k = min(total, 4 * n if distinct else n)  # duplicates are common ("a red circle" x 20)
    while True:
        scores, rows = captions_index.search(query, k, backend)
        out, seen = [], set()
        for s, i in zip(scores[0].tolist(), rows[0].tolist()):
            key = captions_index.captions[i].strip().lower() if i >= 0 else None
            if key is None or (distinct and key in seen):
                continue
            seen.add(key)
            out.append(CaptionMatch(captions_index.captions[i], s, captions_index.paths[i]))
        if len(out) >= n or k >= total:
            return out[:n]
        k = min(total, 4 * k)


# ---------------------------------------------------------------- the notebook-friendly object

@dataclass
class Gallery:
    """A model bound to a gallery's image index: search it by text, draw results, caption images.

    `Gallery.from_run(checkpoint)` loads the run's model and embeds its test images once (the
    index is cached beside the checkpoint); the caption index is built on the first
    `find_captions`."""
    model: CLIPModel
    images: Index
    records: list[Record]
    checkpoint: str
    captions: Index | None = None
    index_folder: str | None = None  # the prebuilt index folder it was opened from (`from_index`)

    @classmethod
    def from_run(cls, checkpoint, data: str | None = None, split: str = "test", *, model: CLIPModel | None = None,
                 records: list[Record] | None = None, images: torch.Tensor | None = None,
                 backend: str = "auto", device=None, engine: str = "auto") -> "Gallery":
        """The gallery of `records`, or of the run's `split` ("all": every split) of `data` (default:
        the data it trained on; a plain folder of images works too). `model` (default: loaded
        from `checkpoint`) and `images` (decoded, if already at hand) save work when given. A model
        loaded here encodes with `engine` (see `engines`; a given `model` keeps its own) and reads each
        tower when a search first needs it (`engines.lazy.load_model`: text queries read no image tower).
        A Hub id as `checkpoint` is read from its snapshot in the Hub cache, and the index is cached there."""
        checkpoint = model_folder(checkpoint)
        if model is None:
            model = load_model(checkpoint, device)
            use_engine(model, engine, checkpoint)
        records = records if records is not None else gallery_records(checkpoint, data, split)
        if not records:
            raise DataError(f"the {split} split is empty: nothing to search")
        index = load_or_build_index(model, checkpoint, records, images=images, backend=backend)
        return cls(model, index, records, str(checkpoint))

    @classmethod
    def from_index(cls, folder, checkpoint=None, *, model: CLIPModel | None = None, backend: str = "auto",
                   device=None, engine: str = "auto") -> "Gallery":
        """The gallery of a prebuilt index folder (`open_index`: a small one or one of millions,
        built from an embedding folder), searched with `checkpoint`'s model (default: the one it
        was built with; `model`, when given, is used as it is). No gallery image is read: the
        index holds their paths (or URLs)."""
        checkpoint = checkpoint and model_folder(checkpoint)  # a Hub id: its snapshot in the Hub cache
        index = open_index(folder, "images", checkpoint)
        checkpoint = checkpoint or index.meta["checkpoint"]
        index.prepare(backend, folder)
        if model is None:
            model = load_model(checkpoint, device)  # each tower read when a search first needs it
            use_engine(model, engine, checkpoint)
        return cls(model, index, [], str(checkpoint), index_folder=str(folder))

    def __len__(self) -> int:
        return len(self.images)

    def find_matches(self, query: str, n: int = 9) -> Matches:
        """The `n` gallery images most similar to the text `query`, best first: a list of
        `Match(path, score)` that a notebook cell shows as a 3x3 grid of the images."""
        return find_matches(self.model, self.images, query, n)

    def find_captions(self, image, n: int = 5) -> list[CaptionMatch]:
        """The `n` gallery captions that best describe `image` (a path, PIL image or tensor)."""
        if self.captions is None:
            self.captions = load_or_build_caption_index(self.model, self.checkpoint, self.records)
        return find_captions(self.model, self.captions, image, n)

    def show(self, query: str, n: int = 9, path=None) -> list[Match]:
        """`find_matches`, drawn as a grid of images with their scores (saved at `path` if given;
        the best GRID_CELLS of them)."""
        from clip_foundation.evaluate.plots import image_grid
        matches = self.find_matches(query, n)
        image_grid(matches[:GRID_CELLS], title=query, path=path)
        return matches
