"""Benchmark streaming from local shards beside the cached and JPEG-folder paths, in images/s.

    python benchmarks/stream_speed.py --data=data/flickr8k --images 1000 --size 224

Converts the first --images records to shards of --shard_size (clip_foundation.data.shards), then
measures: (a) streaming: decode + resize in N DataLoader workers (clip_foundation.data.stream, as
train.py reads shards); (b) the JPEG-folder path: the one-off decode of the folder into the
uint8 cache (thread pool, clip_foundation.data.cache); (c) the cached path: shuffled batches of the
memory-mapped cache. Prints a table and writes JSON (--out).

With --train_images N it also trains train.py's default model for one epoch on a synthetic set
of N training images, from the decoded cache and streamed from its shards (--workers' last
value), alternating --rounds times so both see the same machine load, and reports each path's
median logged pairs/s and the load average:

    python benchmarks/stream_speed.py --data=SYNTHETIC_DIR --images 1000 --size 64 --train_images 1280 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from clip_foundation.data import stream  # noqa: E402
from clip_foundation.data.cache import load_images  # noqa: E402
from clip_foundation.data.sources import load_records  # noqa: E402
from clip_foundation.data.shards import write_shards  # noqa: E402


def streaming_rate(urls, size: int, workers: int, batch: int, images: int) -> float:
    """Images/s of decoded (b, 3, S, S) uint8 pieces out of a DataLoader over the shards."""
    streams = max(workers, 1)
    data = stream.ShardStreams(urls, streams, list(range(streams)), batch // streams, size, 0, 100,
                               {s: (0, 0) for s in range(streams)})
    loader = iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers,
                                              prefetch_factor=4 if workers else None))
    next(loader)  # worker start-up is not counted
    start, n = time.perf_counter(), 0
    while n < images:
        n += len(next(loader)["images"])
    return n / (time.perf_counter() - start)


def cached_rate(images: torch.Tensor, batch: int) -> float:
    start, n = time.perf_counter(), 0
    for order in torch.randperm(len(images)).split(batch):
        n += len(images[order].clone())
    return n / (time.perf_counter() - start)


def training_rates(tmp: Path, train_images: int, workers: int, rounds: int) -> dict[str, list[float]]:
    """Median pairs/s of train.py's logged steps (the first, which holds start-up, left out)
    training one epoch from the decoded cache and streamed from shards, per round."""
    from clip_foundation import training as train
    from clip_foundation.data.shards import ShardsConfig, convert
    from clip_foundation.data.synthetic import SyntheticConfig, generate
    data = generate(tmp / "synthetic", SyntheticConfig(n_train=train_images, n_val=64, n_test=0), progress=False)
    convert(ShardsConfig(src=str(data), out=str(tmp / "train_shards"), shard_size=100, progress=False))
    common = [f"--out_dir={tmp / 'runs'}", "--epochs=1", "--log_every=5", "--progress=false", "--tensorboard=false",
              "--device=cpu", f"--cache_dir={tmp / 'cache'}", "--overwrite"]
    paths = {"cached": [f"--data={data}"],
             "streamed": [f"--data={tmp / 'train_shards/train'}", f"--val_data={tmp / 'train_shards/val'}",
                          f"--workers={workers}"]}
    rates = {name: [] for name in paths}
    for _ in range(rounds):
        for name, args in paths.items():
            _, run_dir, _ = train.main(common + args + [f"--run_name={name}"])
            logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
            steps = [e["pairs_per_s"] for e in logged if "pairs_per_s" in e][1:]
            rates[name].append(statistics.median(steps))
    return rates


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "flickr8k"))
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--shard_size", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--train_images", type=int, default=0, help="also time training both ways (0 = no)")
    p.add_argument("--rounds", type=int, default=2, help="cached/streamed training runs alternated this often")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    records = load_records(args.data)[:args.images]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(records, Path(tmp) / "shards", args.shard_size, progress=False)
        urls = stream.shard_urls(str(Path(tmp) / "shards"))
        for w in [int(x) for x in args.workers.split(",")]:
            rate = streaming_rate(urls, args.size, w, args.batch, len(records))
            rows.append({"path": f"streaming shards, {w} workers", "images_per_s": rate})
        start = time.perf_counter()
        images, _ = load_images(records, args.size, Path(tmp) / "cache", progress=False)
        rows.append({"path": "JPEG folder -> uint8 cache (one-off build, threads)",
                     "images_per_s": len(records) / (time.perf_counter() - start)})
        images, _ = load_images(records, args.size, Path(tmp) / "cache", progress=False)  # memory-mapped
        rows.append({"path": "cached path (memory-mapped uint8 batches)", "images_per_s": cached_rate(images, args.batch)})
        del images
        load = os.getloadavg()[0]
        training = training_rates(Path(tmp), args.train_images, w, args.rounds) if args.train_images else {}
    result = {"images": len(records), "size": args.size, "cpus": os.cpu_count(), "cpu": platform.processor(),
              "torch": torch.__version__, "rows": rows, "training_pairs_per_s": training,
              "load_average": [load, os.getloadavg()[0]]}
    for r in rows:
        print(f"{r['path']:<55} {r['images_per_s']:>10.0f} images/s")
    for name, rates in training.items():
        print(f"training one epoch, {name:<38} {' '.join(f'{r:>6.0f}' for r in rates)} pairs/s (per round)")
    if training:
        ratios = [c / s for c, s in zip(training["cached"], training["streamed"])]
        print(f"cached / streamed: {' '.join(f'{r:.2f}' for r in ratios)}; load average {load:.1f} -> "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
