"""Zero-shot classification end to end, as a user runs it: `python evaluate.py --checkpoint=RUN --zeroshot=DIR`,
a fresh process per engine, timed from start to exit, on CIFAR-sized (32 x 32) images in class folders.

    python -m benchmarks.zeroshot_speed --checkpoint=runs/NAME            # e.g. the preset's run
    python -m benchmarks.zeroshot_speed --checkpoint=runs/NAME --images=2000 --engines=torch,auto --repeats=1

The images are smooth random pictures (the figures are speed, not accuracy), written once into a temporary
folder of 10 class folders. Each engine runs `--repeats` times (default 2): the first run of a graph engine
makes (exports, checks and caches) its graphs, the later ones find them. Printed: seconds per run, and each
engine's speed-up (its last run) over the first engine's last run; with the CPU and the load average before
and after (other jobs slow every figure).
"""
import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.cold_query import cpu, here, load, timed

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def class_folders(folder: Path, images: int, side: int = 32) -> Path:
    """`images` smooth random pictures of `side` pixels, spread over 10 class folders, as PNG files."""
    rng = np.random.default_rng(0)
    for i in range(images):
        low = rng.random((4, 4, 3))  # a 4 x 4 colour field, upsampled: smooth like a photo, not noise
        picture = Image.fromarray((low * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
        (folder / CLASSES[i % 10]).mkdir(parents=True, exist_ok=True)
        picture.save(folder / CLASSES[i % 10] / f"{i:05d}.png")
    return folder


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a run folder (train.py's)")
    p.add_argument("--images", type=int, default=2000, help="images to classify")
    p.add_argument("--engines", default="torch,auto", help="evaluate.py's --engine values, the first the baseline")
    p.add_argument("--repeats", type=int, default=2, help="runs per engine (the first makes a graph engine's graphs)")
    args = p.parse_args(argv)
    checkpoint = str(Path(args.checkpoint).resolve())
    result = {"cpu": cpu(), "load_before": load(), "runs": {}}
    scratch = Path(tempfile.mkdtemp(prefix="zeroshot-speed-"))
    try:
        data = class_folders(scratch / "images", args.images)
        start = [sys.executable, str(here() / "evaluate.py")] if here() else [sys.executable, "-m",
                                                                             "clip_foundation.evaluate.command"]
        for engine in args.engines.split(","):
            command = [*start, f"--checkpoint={checkpoint}", f"--zeroshot={data}", f"--engine={engine}",
                       f"--out={scratch / f'{engine}.json'}"]
            result["runs"][engine] = [timed(command) for _ in range(args.repeats)]  # graphs made, then found
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result["load_after"] = load()
    c, base = result["cpu"], None
    print(f"CPU: {c['model']}, {c['cores']} cores; flags: {' '.join(c['flags']) or 'none of avx2/avx512/bf16/vnni/amx'}")
    print(f"load average (1 min): {result['load_before']} before, {result['load_after']} after")
    print(f"zero-shot of {args.images} images ({len(CLASSES)} classes), {checkpoint}, a fresh process per run:")
    for engine, runs in result["runs"].items():
        base = base or runs[-1]
        print(f"  --engine={engine:12s} " + ", ".join(f"run {i + 1} {s:6.1f} s" for i, s in enumerate(runs))
              + f": {base / runs[-1]:.2f}x")
    return result


if __name__ == "__main__":
    main()
