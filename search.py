"""Text -> image and image -> text search over a gallery embedded once (the index: index.py).

    python search.py "a red circle" --checkpoint runs/NAME --data DIR --split test -n 9
    python search.py --image photo.png --checkpoint runs/NAME --data DIR --split test -n 5
    python search.py --build-index --checkpoint runs/NAME --data PHOTOS --out PHOTOS_INDEX
    python search.py "a dog on a beach" --index PHOTOS_INDEX

A gallery is a dataset split (as the model's training run split it) or any plain folder of
images. Its embeddings are cached in CHECKPOINT/index/ and rebuilt when the model or a gallery
file changes; `--build-index --out DIR` saves the same files in DIR to search later.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import cli
from clipModel import CLIPModel, default_device
from data import SPLITS, decode_images, load_splits, run_data_config
from evaluate import embed_images, embed_texts
from index import (INDEX_VERSION, RECALL_QUERIES, GalleryIndex, ensure_faiss, gallery_digest,
                   load_index, mark_missing, model_digest, open_prebuilt, save_index)
from readers import IMAGE_SUFFIXES, DataError, DataWarning, Record, detect_layout, open_rgb

@dataclass
class Match:
    path: str
    score: float  # cosine similarity between the query and the image


@dataclass
class CaptionMatch:
    caption: str
    score: float  # cosine similarity between the image and the caption
    image_path: str | None = None  # the gallery image this caption was written for


# ---------------------------------------------------------------- galleries

def gallery_records(checkpoint, data: str | None, split: str, layout: str = "auto") -> list[Record]:
    """The records of `split` ("all": every split), split exactly as the model's training run
    split them; a plain folder of images (`layout="images"`, or any folder that has images
    but no dataset layout) gives every image in it, with no captions."""
    if data and (layout == "images" or (layout == "auto" and _plain_image_folder(data))):
        return image_folder_records(data)
    try:
        splits = load_splits(run_data_config(checkpoint, data, layout))
    except DataError:
        # nested photo folders look like class folders; if they don't load as those, take the images
        if data and layout == "auto" and detect_layout(data) == "classes":
            return image_folder_records(data)
        raise
    return [r for s in SPLITS for r in splits[s]] if split == "all" else splits[split]


def _image_files(folder: Path):
    for p in sorted(folder.rglob("*")):
        hidden = any(part.startswith(".") for part in p.relative_to(folder).parts)
        if p.suffix.lower() in IMAGE_SUFFIXES and not hidden and p.is_file():
            yield p


def _plain_image_folder(path) -> bool:
    try:
        detect_layout(path)
        return False
    except DataError:  # no dataset layout: a folder of images is still a gallery
        return Path(path).is_dir() and next(_image_files(Path(path)), None) is not None


def image_folder_records(folder) -> list[Record]:
    """Every image under `folder` (recursively, hidden files skipped) as a Record with no captions."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    records = [Record(p.resolve(), []) for p in _image_files(folder)]
    if not records:
        raise DataError(f"{folder}: no image files ({' '.join(sorted(IMAGE_SUFFIXES))}) in it or below")
    return records


# ---------------------------------------------------------------- building indexes

def build_index(model: CLIPModel, records, batch_size: int = 256, images=None, *,
                skip_bad: bool = False, progress: bool = True, chunk: int = 4096) -> GalleryIndex:
    """Embed the gallery `records` (`images`: their decoded uint8 images, if already at hand).
    Images are decoded and embedded `chunk` at a time, so a gallery of any size fits in memory;
    with `skip_bad` undecodable images are left out (and reported) instead of raising."""
    from tqdm.auto import tqdm
    size, was_training = model.config.image.image_size, model.training
    model.eval()
    parts, kept = [], []
    with tqdm(total=len(records), desc=f"embedding {len(records)} images", disable=not progress,
              leave=False) as bar:
        for s in range(0, len(records), chunk):
            if images is None:
                batch, recs = decode_images(records[s:s + chunk], size, skip_bad=skip_bad, progress=False)
            else:
                batch, recs = images[s:s + chunk], records[s:s + chunk]
            parts.append(embed_images(model, batch, batch_size).half().cpu())  # (c, D)
            kept += recs
            bar.update(min(chunk, len(records) - s))
    model.train(was_training)
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
    was_training = model.training
    model.eval()
    parts = [embed_texts(model, captions[s:s + batch_size], batch_size).half().cpu()
             for s in tqdm(range(0, len(captions), batch_size), disable=not progress, leave=False,
                           desc=f"embedding {len(captions)} captions")]
    model.train(was_training)
    return GalleryIndex(torch.cat(parts), paths, _caption_digest(captions, paths), captions,
                        meta={"kind": "captions"})


def _caption_digest(captions: list[str], paths: list[str]) -> str:
    h = hashlib.sha256()
    for c, p in zip(captions, paths):
        h.update(f"{p}\0{c}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _paths_key(records) -> str:  # names the cache file of one gallery
    return hashlib.sha256("\n".join(str(r.image) for r in records).encode("utf-8", "surrogateescape")
                          ).hexdigest()[:16]


def load_or_build_index(model: CLIPModel, checkpoint, records, batch_size: int = 256,
                        images=None, *, backend: str = "auto", stem=None,
                        skip_bad: bool = False) -> GalleryIndex:
    """The image index of `records`, cached in CHECKPOINT/index/ (or saved at `stem`), rebuilt
    when the model or a gallery file changed. `backend` "auto" adds a FAISS index to large
    galleries when faiss is installed, "faiss" always, "exact" never."""
    gallery = gallery_digest([str(r.image) for r in records])
    name = f"images-{_paths_key(records)}"
    stems = [stem] if stem else [Path(checkpoint) / "index" / name, user_index_dir(checkpoint) / name]
    captions = [c for r in records for c in r.captions]

    def recall_queries():  # text -> image is what this index serves: measure IVF recall on captions
        if not captions:
            return None
        sample = random.Random(0).sample(captions, min(RECALL_QUERIES, len(captions)))
        return _encode(model, lambda: embed_texts(model, sample))

    return _load_or_build(stems, checkpoint, gallery, backend, recall_queries,
                          lambda: build_index(model, records, batch_size, images, skip_bad=skip_bad))


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


def user_index_dir(checkpoint) -> Path:
    """Where indexes of `checkpoint` go when its own folder cannot be written (read-only, full):
    a folder per checkpoint under the user's cache ($XDG_CACHE_HOME or ~/.cache)."""
    key = hashlib.sha256(str(Path(checkpoint).resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clip-foundation" / "index" / key


def _load_or_build(stems, checkpoint, gallery: str, backend: str, queries, build) -> GalleryIndex:
    # stems: where the index may be saved, in order of preference (the first that loads is used)
    model_id = model_digest(checkpoint)
    identity = f"v{INDEX_VERSION}:{model_id}:{gallery}"  # stale when the model or gallery changed
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
    was_training = model.training
    model.eval()
    with torch.no_grad():
        features = encode().float()  # (Q, D)
    model.train(was_training)
    return features


def embed_image(image, model: CLIPModel) -> torch.Tensor:
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
    return _encode(model, lambda: model.encode_image(x.to(model.device)))


def find_matches(query: str, model: CLIPModel, index: GalleryIndex, n: int = 9,
                 backend: str = "auto") -> list[Match]:
    """The `n` gallery images most similar to the text `query`, best first."""
    if not query.strip():
        raise ValueError("empty query")
    if n < 1:
        raise ValueError("n must be at least 1")
    text = _encode(model, lambda: model.encode_text([query]))  # (1, D)
    scores, rows = index.search(text, n, backend)
    return [Match(index.paths[i], s) for s, i in zip(scores[0].tolist(), rows[0].tolist()) if i >= 0]


def find_captions(image, model: CLIPModel, captions_index: GalleryIndex, n: int = 5,
                  backend: str = "auto", distinct: bool = True) -> list[CaptionMatch]:
    """The `n` gallery captions that best describe `image` (a PIL image, a path or a tensor,
    see `embed_image`), best first; with `distinct`, a caption text is listed once."""
    if n < 1:
        raise ValueError("n must be at least 1")
    if captions_index.captions is None:
        raise ValueError("not a caption index: build one with load_or_build_caption_index")
    query, total = embed_image(image, model), len(captions_index)
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


# ---------------------------------------------------------------- command line

def _build_cli(args, model, records) -> dict:
    out = Path(args.out) if args.out else None
    built = {"images": load_or_build_index(model, args.checkpoint, records, args.batch_size,
                                           backend=args.backend, skip_bad=args.skip_bad,
                                           stem=out and out / "images")}
    if any(r.captions for r in records):  # so --image works on this index too
        built["captions"] = load_or_build_caption_index(model, args.checkpoint, records,
                                                        backend=args.backend, stem=out and out / "captions")
    where = out or Path(args.checkpoint) / "index"
    for kind, index in built.items():
        faiss = index.meta.get("faiss")
        line = f"{kind}: {len(index)} rows x {index.embeddings.shape[1]} (float16)"
        if faiss:
            line += f", faiss {faiss['type']}" + "".join(
                f", {k} {v}" for k, v in faiss.items() if k in ("nlist", "nprobe") or k.startswith("recall@"))
        print(line)
    print(f"index: {where}")
    return built


def main(argv=None):
    p = argparse.ArgumentParser(description="Search a gallery: the images that best match a text "
                                "query, or the captions that best describe an image.")
    p.add_argument("query", nargs="?", help='text to search for, e.g. "a red circle"')
    p.add_argument("--image", help="an image file: print the gallery captions that best describe it")
    p.add_argument("--build-index", action="store_true",
                   help="embed the gallery and save its index in --out (default: CHECKPOINT/index/)")
    p.add_argument("--index", help="search a folder written by --build-index")
    p.add_argument("--checkpoint", help="folder written by train.py / save_pretrained "
                   "(with --index: default the one the index was built with)")
    p.add_argument("--data", default=None, help="dataset folder or plain folder of images "
                   "(default: the one the model trained on)")
    p.add_argument("--split", default="test", choices=[*SPLITS, "all"])
    p.add_argument("--layout", default="auto", help="dataset layout; 'images' = a plain image folder")
    p.add_argument("-n", type=int, default=None, help="number of results (default 9 images, 5 captions)")
    p.add_argument("--backend", default="auto", choices=["auto", "exact", "faiss"],
                   help="auto: FAISS for large galleries when installed, else exact")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.add_argument("--out", default=None, help="figure path (default: CHECKPOINT/search_QUERY.png); "
                   "with --build-index the index folder")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--skip-bad", action="store_true", help="leave out images that cannot be decoded")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if (args.query is not None) + bool(args.image) + args.build_index != 1:
        p.error("give exactly one of: a text query, --image PATH, --build-index")
    if args.n is not None and args.n < 1:
        p.error("-n must be at least 1")
    if not (args.checkpoint or args.index) or (args.build_index and args.index):
        p.error("--checkpoint DIR is required (searching a prebuilt --index DIR may omit it)"
                if not args.build_index else "--build-index writes an index: give --checkpoint, "
                "and the folder as --out DIR (not --index)")
    kind = "captions" if args.image else "images"
    try:
        if args.query is not None and not args.query.strip():
            raise ValueError("empty query")
        device = default_device() if args.device == "auto" else torch.device(args.device)
        if args.index:
            index = open_prebuilt(args.index, kind, args.checkpoint)
            args.checkpoint = args.checkpoint or index.meta["checkpoint"]
            ensure_faiss(index, args.backend, Path(args.index) / kind)
        model = CLIPModel.from_pretrained(args.checkpoint, device=device)
        if not args.index:
            records = gallery_records(args.checkpoint, args.data, args.split, args.layout)
            if not records:
                raise DataError(f"the {args.split} split is empty")
            if args.build_index:
                return _build_cli(args, model, records)
            index = (load_or_build_caption_index(model, args.checkpoint, records, backend=args.backend)
                     if args.image else load_or_build_index(model, args.checkpoint, records,
                                                            args.batch_size, backend=args.backend,
                                                            skip_bad=args.skip_bad))
        if device.type == "cuda":
            index.embeddings = index.embeddings.to(device)  # exact search on the GPU
        if args.image:
            results = find_captions(args.image, model, index, args.n or 5, args.backend)
        else:
            results = find_matches(args.query, model, index, args.n or 9, args.backend)
    except (FileNotFoundError, DataError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    return _report(args, results)


def _report(args, results):
    """Print the results first, then draw them: a missing image or an unwritable folder must
    not cost the answer. Images gone since a prebuilt index was built are named, and the
    index is marked stale."""
    import plots
    if args.image:
        slug, what = Path(args.image).stem, {"image": args.image}
        out = Path(args.out or Path(args.checkpoint) / f"captions_{slug}.png")
        lines, missing = [f"{m.score:.4f}  {m.caption}" for m in results], []
    else:
        slug = re.sub(r"[^a-z0-9]+", "_", args.query.lower()).strip("_")[:40] or "query"
        what = {"query": args.query}
        out = Path(args.out or Path(args.checkpoint) / f"search_{slug}.png")
        lines = [f"{m.score:.4f}  {m.path}" for m in results]
        missing = [m.path for m in results if not Path(m.path).is_file()]
    figure = "figure" if args.image else "grid"
    if args.json:
        print(json.dumps({**what, figure: str(out), "matches": [asdict(m) for m in results],
                          "missing": missing}, indent=2))
    else:
        print("\n".join(lines))
    if missing:
        print(f"warning: {len(missing)} of these images no longer exist (moved or deleted since the "
              f"index was built): {', '.join(missing)}; rebuild the index", file=sys.stderr)
        if args.index:
            mark_missing(Path(args.index) / "images", missing)
    try:
        if args.image:
            plots.captions_figure(args.image, results, path=out)
        elif shown := [m for m in results if m.path not in missing]:
            plots.image_grid(shown, title=args.query, path=out)
        else:
            return results
    except (OSError, DataError) as e:
        print(f"warning: could not write the {figure} {out} ({getattr(e, 'strerror', None) or e}); "
              "pass --out PATH to write it elsewhere", file=sys.stderr)
    else:
        if not args.json:
            print(f"{figure}: {out}")
    return results


if __name__ == "__main__":
    with cli.reported_warnings(DataWarning):  # one plain line per data issue
        main()
