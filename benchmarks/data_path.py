"""Benchmark the image data path: direct JPEG decoding each epoch vs the decoded-image cache.

    python benchmarks/data_path.py --data data/flickr8k --images 2000 --size 224

Measures, in images/s: (a) direct loading, open_rgb + resize/crop per image through a
DataLoader, as every epoch costs without a cache (0 workers and os.cpu_count() workers);
(b) an epoch read from the cache (shuffled batches of a memory-mapped uint8 tensor), after
(c) the one-off cache build (thread pool decode + write). Prints a table, writes JSON.
Without --data it uses data/flickr8k when present, else generates 500×375 JPEGs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
from clip_foundation.data.cache import load_images
from clipModel import resize_crop as prepare_transform  # noqa: E402
from clip_foundation.data.sources import load_records
from clip_foundation.data.records import open_rgb  # noqa: E402


class DirectImages(Dataset):
    """Decode on every access: the data path of a DataLoader without a cache."""

    def __init__(self, records, image_size):
        self.records, self.prepare = records, prepare_transform(image_size)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.prepare(open_rgb(self.records[i].image)).as_subclass(torch.Tensor)


class CachedImages(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def make_jpegs(folder: Path, n: int) -> Path:
    # Smooth gradients plus noise: photo-like JPEG sizes, not the huge files of pure noise.
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = ["image,caption"]
    for i in range(n):
        base = np.stack([(x * (i % 7 + 1) + y) % 256, (y * 2 + i) % 256, (x + y * (i % 5)) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)  # (375, 500, 3)
        Image.fromarray(pixels).save(folder / "images" / f"{i}.jpg", quality=90)
        rows.append(f"images/{i}.jpg,synthetic image {i}")
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    return folder


def rss_mb() -> float | None:
    try:  # resident set size now (Linux)
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def epoch(dataset, batch_size: int, workers: int) -> float:
    # -> seconds for one shuffled pass, as the training loop would draw it
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch)
    assert seen == len(dataset)
    return time.perf_counter() - start


def main(argv=None):
    default_data = ROOT / "data" / "flickr8k"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(default_data) if default_data.is_dir() else "",
                   help="dataset folder (any readers layout); empty: generate 500x375 JPEGs")
    p.add_argument("--images", type=int, default=2000, help="use the first N images")
    p.add_argument("--size", type=int, default=224, help="encoder input side")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="cache-read epochs to time (best kept)")
    p.add_argument("--cache_dir", default="", help="where to build the cache; default: a temp dir")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "data_path.json"))
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="data_path_bench_"))
    try:
        data = Path(args.data) if args.data else make_jpegs(tmp / "jpegs", args.images)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reader notes (e.g. repeated captions) are not the point
            records = load_records(data)[:args.images]
        n, workers = len(records), os.cpu_count() or 1
        cache_dir = Path(args.cache_dir) if args.cache_dir else tmp / "cache"
        print(f"{n} images from {data}, size {args.size}, {workers} CPUs (shared machine: "
              f"figures vary with other load)")
        results = {"data": str(data), "images": n, "size": args.size, "cpus": workers,
                   "batch_size": args.batch_size, "torch": torch.__version__,
                   "python": platform.python_version()}

        direct = DirectImages(records, args.size)
        for w in sorted({0, workers}):
            seconds = epoch(direct, args.batch_size, w)
            results[f"direct_workers{w}_images_per_s"] = n / seconds
            print(f"  direct epoch, {w} workers: {seconds:.2f}s")

        start = time.perf_counter()
        load_images(records, args.size, cache_dir, progress=False)
        build = time.perf_counter() - start
        results |= {"build_s": build, "build_images_per_s": n / build}

        rss = rss_mb()
        start = time.perf_counter()
        images, kept = load_images(records, args.size, cache_dir, progress=False)
        results["open_s"] = time.perf_counter() - start  # reuse: index read + memory map
        if rss is not None:
            results["rss_growth_on_open_mb"] = rss_mb() - rss  # ~0: the map is read lazily
        results["cache_mb"] = images.numel() / 2**20
        best = min(epoch(CachedImages(images), args.batch_size, 0) for _ in range(args.epochs))
        results["cache_epoch_images_per_s"] = n / best

        rows = [("direct decode, DataLoader 0 workers", results["direct_workers0_images_per_s"]),
                (f"direct decode, DataLoader {workers} workers",
                 results[f"direct_workers{workers}_images_per_s"]),
                (f"cache build (one-off, {workers} threads, {build:.1f}s)", results["build_images_per_s"]),
                ("epoch read from cache (memmap)", results["cache_epoch_images_per_s"])]
        print(f"\n{'path':<48}{'images/s':>12}")
        for name, rate in rows:
            print(f"{name:<48}{rate:>12.0f}")
        print(f"cache: {results['cache_mb']:.0f} MB, reopened in {results['open_s'] * 1e3:.1f} ms")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
