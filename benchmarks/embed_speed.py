"""Gallery embedding throughput of one process (`clip_foundation.embed.writer`): images/s from JPEG files to
written parts, per model and engine, on this machine.

    python benchmarks/embed_speed.py                                   # data/flickr8k/Images, 256 photos
    python benchmarks/embed_speed.py --images=/path/to/photos --n=512 --models=tiny --engines=torch
    python benchmarks/embed_speed.py --workers=1,2                     # decoding threads

Models: `tiny`, the scratch ViT of the tests' TINY_MODEL (32 px, 64 wide, 2 blocks), and `preset`, the
towers of train.py's earlier flickr8k-pretrained preset (EfficientNet-Lite2 alone at 260 px with 2 pooled blocks,
MiniLM; weights from the pip packages of the `pretrained` extra, so nothing is downloaded; the heads
are untrained, which costs the same). Each is saved as a checkpoint in a temporary folder. A row is
one pass of `embed.embed_part` + `embed_format.write_part` over `--n` photos (decode on a thread pool,
resize, encode by the engine, write the .npy and parquet), after a warm-up part that exports and
loads the engine's graphs; the model's loading is not timed. Also printed: the decode-and-resize
rate alone (no model), the ceiling for a model that costs nothing. The figures depend on the load
of the machine: the first line prints its load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig, resize_crop
from clip_foundation.embed import writer as embed
from clip_foundation.embed import format as fmt
from clip_foundation.engines.registry import installed, use_engine
from clip_foundation.data.splits import image_folder_records

ROOT = Path(__file__).resolve().parents[1]


def model_config(name: str) -> CLIPConfig:
    """`tiny`: the tests' scratch towers; `preset`: the earlier flickr8k-pretrained preset's towers (Lite2 alone)."""
    if name == "tiny":
        return CLIPConfig(image=ImageEncoderConfig(kind="scratch", image_size=32, patch_size=8, width=64, depth=2),
                          text=TextEncoderConfig(kind="scratch", width=64, depth=2), projection_dim=64)
    from clip_foundation.pretrained import require_package, text_model_folder
    require_package("tf_efficientnet_lite2")
    return CLIPConfig(image=ImageEncoderConfig(kind="timm", name="tf_efficientnet_lite2", pool_blocks=2),
                      text=TextEncoderConfig(kind="hf", name=text_model_folder(), pooling="mean"),
                      projection_dim=512)


def save_checkpoint(name: str, folder: Path) -> Path:
    # a scratch tokenizer is trained on captions: a few do (only the image tower is timed)
    captions = ["a dog runs on the grass", "two children play in the water", "a man rides a red bike"]
    CLIPModel(model_config(name), captions=captions).save_pretrained(folder / name)
    return folder / name


def rate_of_decoding(records, size: int, workers: int) -> float:
    """Images/s of open_rgb + resize_crop alone on `workers` threads."""
    from clip_foundation.data.records import open_rgb
    resize = resize_crop(size)
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda r: resize(open_rgb(r.image)), records))
    return len(records) / (time.perf_counter() - start)


class _Bar:  # embed_part's progress bar, silent
    def update(self, n):
        pass


def rate_of_embedding(checkpoint: Path, engine: str, records, workers: int, batch_size: int, out: Path,
                      repeats: int) -> tuple[str, list[float]]:
    """(engine used, images/s of each of `repeats` passes) embedding `records` as one part, after a
    warm-up part that exports and loads the graphs."""
    model = CLIPModel.from_pretrained(checkpoint)
    encoder = use_engine(model, engine, checkpoint)
    parts = embed.RecordParts(records, len(records), records[0].image.parent)
    warm = embed.RecordParts(records[:batch_size], batch_size, records[0].image.parent)
    with ThreadPoolExecutor(workers) as pool, torch.no_grad():
        embed.embed_part(model, warm, 0, pool, batch_size, _Bar())  # exports, compiles and checks the graphs
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            embeddings, rows, skipped = embed.embed_part(model, parts, 0, pool, batch_size, _Bar())
            fmt.write_part(out, 0, embeddings, rows, skipped)
            rates.append(len(rows) / (time.perf_counter() - start))
    fell_back = getattr(encoder, "graphs", {}).get("image", True) is None  # its graph failed: torch encoded
    return encoder.name + (" (torch: graph failed)" if fell_back else ""), rates


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", default=str(ROOT / "data" / "flickr8k" / "Images"), help="a folder of photos")
    p.add_argument("--n", type=int, default=256, help="photos embedded per row")
    p.add_argument("--models", default="tiny,preset", help="tiny and/or preset")
    p.add_argument("--engines", default="torch,onnxruntime,openvino", help="engines to time (those installed)")
    p.add_argument("--workers", default=str(os.cpu_count() or 1), help="decoding threads, comma-separated")
    p.add_argument("--batch_size", type=int, default=256, help="images decoded ahead and embedded together")
    p.add_argument("--threads", type=int, default=0, help="encoding threads (embed's --threads); 0 = torch's default")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per row: the best and the median are printed")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.images).is_dir():
        raise SystemExit(f"{args.images}: no such folder of photos (pass --images=DIR)")
    records = image_folder_records(args.images)[:args.n]
    print(f"{len(records)} photos from {args.images}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'model':8s}{'engine':26s}{'workers':>8s}{'best/s':>10s}{'median/s':>10s}")

    def row(name, label, workers, rates):
        print(f"{name:8s}{label:26s}{workers:8d}{max(rates):10.1f}{statistics.median(rates):10.1f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="embed-speed-") as tmp:
        for name in args.models.split(","):
            checkpoint = save_checkpoint(name, Path(tmp))
            size = model_config(name).image.image_size or CLIPModel.from_pretrained(checkpoint).config.image.image_size
            for workers in (int(w) for w in args.workers.split(",")):
                row(name, "(decode + resize only)", workers,
                    [rate_of_decoding(records, size, workers) for _ in range(args.repeats)])
                for engine in args.engines.split(","):
                    if not installed(engine):
                        print(f"{name:8s}{engine + ' (not installed)':26s}")
                        continue
                    out = Path(tmp) / f"emb-{name}-{engine}-{workers}"
                    used, rates = rate_of_embedding(checkpoint, engine, records, workers, args.batch_size, out,
                                                    args.repeats)
                    row(name, used, workers, rates)


if __name__ == "__main__":
    main()
