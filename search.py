"""Text -> image search over a gallery whose embeddings are computed once and cached.

    python search.py "a red circle" --checkpoint runs/NAME --data DIR --split test -n 9
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import cli
from clipModel import CLIPModel, default_device
from data import decode_images, load_splits, run_data_config
from evaluate import embed_images
from readers import DataError, DataWarning

INDEX_VERSION = 1  # bump when the index format changes, so old caches are rebuilt


@dataclass
class Match:
    path: str
    score: float  # cosine similarity between the query and the image


@dataclass
class GalleryIndex:
    embeddings: torch.Tensor  # (N, D) float16, L2-normalised
    paths: list[str]
    identity: str  # hash of the model weights + gallery files; a mismatch means rebuild


def file_digest(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gallery_digest(paths: list[str]) -> str:
    """Changes when an image is added, removed, or rewritten (size or mtime)."""
    h = hashlib.sha256()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def build_index(model: CLIPModel, records, batch_size: int = 256, images=None) -> GalleryIndex:
    """Embed the gallery `records` (`images`: their decoded uint8 images, if already at hand)."""
    if images is None:
        images, records = decode_images(records, model.config.image.image_size)
    paths = [str(r.image) for r in records]
    was_training = model.training
    embeddings = embed_images(model.eval(), images, batch_size).half().cpu()
    model.train(was_training)
    return GalleryIndex(embeddings, paths, gallery_digest(paths))


def load_or_build_index(model: CLIPModel, checkpoint, records, batch_size: int = 256,
                        images=None) -> GalleryIndex:
    """The gallery index cached in CHECKPOINT/index/, rebuilt when model or gallery changed."""
    from safetensors.torch import load_file, save_file
    checkpoint = Path(checkpoint)
    paths = [str(r.image) for r in records]
    model_id = file_digest(checkpoint / "model.safetensors")
    identity = f"v{INDEX_VERSION}:{model_id}:{gallery_digest(paths)}"
    stem = checkpoint / "index" / hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    meta_path, emb_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if meta_path.is_file() and emb_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("identity") == identity and meta.get("paths") == paths:
            return GalleryIndex(load_file(emb_path)["embeddings"], paths, identity)
    index = build_index(model, records, batch_size, images)
    index.identity = identity
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": index.embeddings.contiguous()}, emb_path)
    meta_path.write_text(json.dumps({"identity": identity, "paths": paths}))  # last: marks complete
    return index


@torch.no_grad()
def find_matches(query: str, model: CLIPModel, index: GalleryIndex, n: int = 9) -> list[Match]:
    """The `n` gallery images most similar to the text `query`, best first."""
    if not query.strip():
        raise ValueError("empty query")
    was_training = model.training
    text = model.eval().encode_text([query]).float().cpu()  # (1, D)
    model.train(was_training)
    scores = (index.embeddings.float() @ text.T).squeeze(1)  # (N,)
    top = scores.topk(min(n, len(scores)))
    return [Match(index.paths[i], float(s)) for s, i in zip(top.values, top.indices)]


def gallery_records(checkpoint, data: str | None, split: str, layout: str = "auto"):
    """The records of `split`, split exactly as the model's training run split them."""
    return load_splits(run_data_config(checkpoint, data, layout))[split]


def main(argv=None) -> list[Match]:
    p = argparse.ArgumentParser(description="Find the images that best match a text query.")
    p.add_argument("query", help='text to search for, e.g. "a red circle"')
    p.add_argument("--checkpoint", required=True, help="folder written by train.py / save_pretrained")
    p.add_argument("--data", default=None, help="dataset folder (default: the one the model trained on)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--layout", default="auto")
    p.add_argument("-n", type=int, default=9, help="number of images to return")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.add_argument("--out", default=None, help="grid PNG path (default: CHECKPOINT/search_QUERY.png)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("-n must be at least 1")
    try:
        device = default_device() if args.device == "auto" else torch.device(args.device)
        model = CLIPModel.from_pretrained(args.checkpoint, device=device)
        records = gallery_records(args.checkpoint, args.data, args.split, args.layout)
        if not records:
            raise DataError(f"the {args.split} split is empty")
        index = load_or_build_index(model, args.checkpoint, records)
        matches = find_matches(args.query, model, index, args.n)
    except (FileNotFoundError, DataError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    from plots import image_grid
    slug = re.sub(r"[^a-z0-9]+", "_", args.query.lower()).strip("_")[:40] or "query"
    out = Path(args.out or Path(args.checkpoint) / f"search_{slug}.png")
    image_grid(matches, title=args.query, path=out)
    if args.json:
        print(json.dumps({"query": args.query, "grid": str(out),
                          "matches": [m.__dict__ for m in matches]}, indent=2))
    else:
        for m in matches:
            print(f"{m.score:.4f}  {m.path}")
        print(f"grid: {out}")
    return matches


if __name__ == "__main__":
    with cli.reported_warnings(DataWarning):  # one plain line per data issue
        main()
