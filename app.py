"""A search page in the browser: type a phrase and see the gallery images that match it, drop in a
photo and see the captions and zero-shot labels that fit it (the library side, `SearchPage`:
clip_foundation/webapp.py).

    python app.py --checkpoint=runs/NAME                        # the run's test images, on http://127.0.0.1:7860
    python app.py --checkpoint=runs/NAME --gallery=PHOTOS       # any folder of your own photos
    python app.py --checkpoint=runs/NAME --split=all --port=8080
    python app.py --help                                        # every option

The gallery is embedded once (a progress bar; cached in CHECKPOINT/index/ like search.py's) and
every query reuses it. The server listens on 127.0.0.1 only unless --host or --share is given.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from clip_foundation import cli
from clip_foundation.data import SPLITS
from clip_foundation.records import DataError, DataWarning
from clipModel import CLIPModel, default_device


@dataclass
class AppConfig:
    checkpoint: str = ""  # the run folder written by train.py (any save_pretrained folder)
    gallery: str = ""  # a folder of images to search (every image in it); instead of --data/--split
    data: str = ""  # dataset folder; empty = the one the run trained on
    split: str = "test"  # train | val | test as the run split the data, or all
    captions: str = "train"  # image -> text candidates: train (the run's), gallery, or a file of lines
    backend: str = "auto"  # auto (FAISS for large galleries when installed) | exact | faiss
    host: str = "127.0.0.1"  # address to listen on; 0.0.0.0 opens the page to the network
    port: int = 0  # 0 = the first free port from 7860
    share: bool = False  # also make a public gradio.live link (needs the internet)
    max_upload_mb: float = 10.0  # larger uploads are refused
    device: str = "auto"  # auto (cuda, then mps, then cpu), or a torch device name


USAGE = "usage: python app.py --checkpoint=RUN [--gallery=DIR | --data=DIR --split=test] [--host=ADDR --port=N]"


def main(argv=None):
    args = cli.parse(AppConfig(), argv, USAGE)
    if not args.checkpoint:
        cli.usage_error("--checkpoint=DIR is required (the run folder train.py printed)", USAGE)
    if args.gallery and args.data:
        cli.usage_error("give --gallery=DIR (a folder of images) or --data=DIR (a dataset), not both", USAGE)
    if args.split not in (*SPLITS, "all") or args.backend not in ("auto", "exact", "faiss"):
        cli.usage_error("--split is train, val, test or all; --backend is auto, exact or faiss", USAGE)
    if args.max_upload_mb <= 0 or not 0 <= args.port < 65536:
        cli.usage_error("--max_upload_mb must be positive and --port 0-65535", USAGE)
    from clip_foundation.webapp import SearchPage
    try:
        device = default_device() if args.device == "auto" else torch.device(args.device)
        model = CLIPModel.from_pretrained(args.checkpoint, device=device)
        gallery = None
        if args.gallery:
            from clip_foundation.gallery import Gallery, image_folder_records
            gallery = Gallery.from_run(args.checkpoint, records=image_folder_records(args.gallery), model=model,
                                       backend=args.backend)
        page = SearchPage.from_run(args.checkpoint, args.data or None, args.split, captions=args.captions,
                                   gallery=gallery, model=model, backend=args.backend)
    except (FileNotFoundError, DataError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(page.summary().replace("**", ""))
    return page.launch(args.host, args.port or None, args.share, args.max_upload_mb)


if __name__ == "__main__":
    with cli.reported_warnings(DataWarning):  # one plain line per data issue
        main()
