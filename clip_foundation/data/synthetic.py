"""Embedded synthetic caption dataset: coloured shapes on a noisy background.

It lets the whole pipeline (training, evaluation, search) run offline on a fresh machine.
`generate` writes the same layout users give for their own photos - `images/*.png` plus a
`captions.csv` with `image,caption,split` - and adds attribute columns (colours, shapes,
sizes, centres, position, relation) so tests can check what retrieval returns.

    python -m clip_foundation.synthetic --out=data/synthetic --n_train=2000 --seed=0
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {  # caption word -> base RGB; far apart so jitter + noise never cross over
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "purple": (140, 60, 190), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.11, "large": 0.22}  # radius as a fraction of the image side
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
             "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
POSITION_WORDS = {
    "left": ("on the left", "on the left side", "in the left half"),
    "right": ("on the right", "on the right side", "in the right half"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle"),
}
RELATION_WORDS = {  # relation of shape1 to shape2
    "above": ("above", "over", "on top of"), "below": ("below", "under", "beneath"),
    "left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
}
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
# {a} = noun phrase with article, {np} = without, {p} = position, {rel}/{inv} = relation words
ONE_TEMPLATES = ("{a} {p}", "{a}", "there is {a} {p}", "an image of {a}",
                 "a drawing of {a} {p}", "{p} there is {a}", "a single {np} {p}", "one {np} {p}")
TWO_TEMPLATES = ("{a1} {rel} {a2}", "{a2} {inv} {a1}", "there is {a1} {rel} {a2}",
                 "{a1} and {a2}", "an image of {a2} and {a1}", "a drawing of {a1} {rel} {a2}",
                 "{a1} with {a2} {inv} it", "two shapes: {a2} {inv} {a1}")
COLUMNS = ["image", "caption", "split", "n_shapes", "color1", "shape1", "size1", "x1", "y1",
           "color2", "shape2", "size2", "x2", "y2", "position", "relation"]
SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges, still deterministic


@dataclass
class SyntheticConfig:
    n_train: int = 2000  # enough pairs for a tiny CLIP to learn colour/shape/size/layout
    n_val: int = 200  # for early stopping / picking a checkpoint
    n_test: int = 600  # held out: chance recall@1 = 1/600; ~12 images per colour+shape to search
    image_size: int = 64  # small images keep CPU training to minutes
    captions_per_image: int = 5  # several phrasings per image, like COCO
    seed: int = 0  # same seed -> byte-identical dataset


def _clamp(v: float, r: float, size: int) -> float:
    """Keep a centre so a shape of radius r (plus a 2% margin) stays inside the image."""
    m = 0.02 * size
    return min(max(v, r + m), size - r - m)


def _sample_scene(rng: random.Random, size: int) -> dict:
    """Pick 1 or 2 shapes and place them so the position / relation words are unambiguous."""
    def shape() -> dict:
        return {"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES),
                "size": rng.choice(list(SIZES)), "angle": rng.uniform(-10, 10)}

    def radius(s: dict) -> float:
        return SIZES[s["size"]] * size

    a = shape()
    if rng.random() < 0.5:
        pos = rng.choice(list(POSITIONS))
        fx, fy = POSITIONS[pos]
        a["x"] = _clamp(size * (fx + rng.uniform(-0.05, 0.05)), radius(a), size)
        a["y"] = _clamp(size * (fy + rng.uniform(-0.05, 0.05)), radius(a), size)
        return {"shapes": [a], "position": pos, "relation": ""}
    b = shape()
    while (b["color"], b["shape"]) == (a["color"], a["shape"]):  # keep the two tellable apart
        b = shape()
    rel = rng.choice(list(RELATION_WORDS))
    first, second = (a, b) if rel in ("above", "left of") else (b, a)
    axis, cross = ("y", "x") if rel in ("above", "below") else ("x", "y")
    # Along the relation axis the shapes' boxes are separated by a gap, so they never
    # overlap; the leftover room is split at random into before / between / after.
    r1, r2, m, gap = radius(first), radius(second), 0.02 * size, 0.05 * size
    slack = size - 2 * m - 2 * r1 - 2 * r2 - gap
    u, v = sorted(rng.uniform(0, slack) for _ in range(2))
    first[axis] = m + r1 + u
    second[axis] = first[axis] + r1 + r2 + gap + (v - u)
    c = size * (0.5 + rng.uniform(-0.15, 0.15))  # across the axis: roughly aligned
    for s in (a, b):
        s[cross] = _clamp(c + size * rng.uniform(-0.05, 0.05), radius(s), size)
    return {"shapes": [a, b], "position": "", "relation": rel}


def _vertices(shape: str, cx: float, cy: float, r: float, angle: float) -> list:
    # Each polygon is centred on its box and fits within radius ~r even when rotated
    # +-10 degrees, so the boxes used for placement bound it.
    if shape == "square":
        h = 0.82 * r
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":  # equilateral, pointing up, shifted down to centre its box
        pts = [(0, -0.75 * r), (0.87 * r, 0.75 * r), (-0.87 * r, 0.75 * r)]
    else:  # five-pointed star
        polar = [(r if k % 2 == 0 else 0.5 * r, math.radians(-90 + 36 * k)) for k in range(10)]
        pts = [(d * math.cos(t), d * math.sin(t)) for d, t in polar]
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _render(scene: dict, size: int, rng: random.Random, nrng: np.random.Generator) -> Image.Image:
    g, tint = rng.uniform(195, 235), rng.uniform(0, 12)  # light gray .. beige
    k = SUPERSAMPLE
    background = (round(g + tint), round(g + tint / 2), round(g - tint))
    img = Image.new("RGB", (size * k, size * k), background)
    draw = ImageDraw.Draw(img)
    for s in scene["shapes"]:
        rgb = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLORS[s["color"]])
        cx, cy, r = s["x"] * k, s["y"] * k, SIZES[s["size"]] * size * k
        if s["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        else:
            draw.polygon(_vertices(s["shape"], cx, cy, r, s["angle"]), fill=rgb)
    pixels = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    pixels = pixels + nrng.normal(0.0, 4.0, pixels.shape)  # mild noise: not pixel-trivial
    return Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8))


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _caption(scene: dict, rng: random.Random) -> str:
    with_size = rng.random() < 0.7  # some captions leave the size out

    def noun(s: dict) -> str:
        words = [rng.choice(SIZE_WORDS[s["size"]])] if with_size else []
        return " ".join(words + [s["color"], s["shape"]])

    if len(scene["shapes"]) == 1:
        np_ = noun(scene["shapes"][0])
        return rng.choice(ONE_TEMPLATES).format(
            a=_article(np_), np=np_, p=rng.choice(POSITION_WORDS[scene["position"]]))
    n1, n2 = (noun(s) for s in scene["shapes"])
    rel = scene["relation"]
    return rng.choice(TWO_TEMPLATES).format(
        a1=_article(n1), a2=_article(n2), rel=rng.choice(RELATION_WORDS[rel]),
        inv=rng.choice(RELATION_WORDS[INVERSE[rel]]))


def _captions(scene: dict, n: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    for _ in range(50 * n):  # distinct phrasings while there are enough of them
        c = _caption(scene, rng)
        if c not in out:
            out.append(c)
        if len(out) == n:
            return out
    return out + [_caption(scene, rng) for _ in range(n - len(out))]


def _attributes(scene: dict) -> dict:
    row = {"n_shapes": len(scene["shapes"]), "position": scene["position"],
           "relation": scene["relation"]}
    for i in (1, 2):
        s = scene["shapes"][i - 1] if i <= len(scene["shapes"]) else None
        for key in ("color", "shape", "size"):
            row[f"{key}{i}"] = s[key] if s else ""
        for key in ("x", "y"):  # centre in pixels; the pixel containing it is (int(x), int(y))
            row[f"{key}{i}"] = f"{s[key]:.1f}" if s else ""
    return row


def generate(out_dir: str | Path, config: SyntheticConfig = SyntheticConfig(),
             progress: bool = True) -> Path:
    """Write the dataset (images/, captions.csv, synthetic.json) to out_dir; return out_dir."""
    c = config
    if min(c.n_train, c.n_val, c.n_test) < 0 or c.captions_per_image < 1 or c.image_size < 16:
        raise ValueError(f"bad synthetic config: {c}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)  # until complete, the folder is invalid
    splits = ["train"] * c.n_train + ["val"] * c.n_val + ["test"] * c.n_test

    def make(i: int) -> list[dict]:  # image i and its caption rows; depends on (seed, i) only
        rng = random.Random(f"{c.seed}/{i}")
        scene = _sample_scene(rng, c.image_size)
        name = f"images/{i:05d}.png"
        image = _render(scene, c.image_size, rng, np.random.default_rng([c.seed, i]))
        image.save(out_dir / name, compress_level=0)  # deflating these noisy pixels took a third of the
        # generation for 7 KB instead of 12 KB an image, and slowed every decode of them 2.4x
        attrs = _attributes(scene)
        return [{"image": name, "caption": cap, "split": splits[i], **attrs}
                for cap in _captions(scene, c.captions_per_image, rng)]

    from tqdm import tqdm
    # on a thread per core (PIL and numpy release the GIL for most of an image); map keeps the order
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        made = tqdm(pool.map(make, range(len(splits))), total=len(splits), desc="synthetic images",
                    disable=not progress)
        rows = [row for image_rows in made for row in image_rows]
    for stale in (out_dir / "images").glob("*.png"):  # left over from a bigger earlier run
        if stale.stem.isdigit() and int(stale.stem) >= len(splits):
            stale.unlink()
    with open(out_dir / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / MARKER).write_text(json.dumps(asdict(c), indent=2) + "\n")
    return out_dir


def ensure_synthetic(out_dir: str | Path, config: SyntheticConfig = SyntheticConfig(),
                     progress: bool = True) -> Path:
    """Generate the dataset in out_dir unless a complete one with this config is there."""
    out_dir = Path(out_dir)
    try:
        existing = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        existing = None
    if existing != asdict(config) or not (out_dir / "captions.csv").is_file():
        generate(out_dir, config, progress=progress)
    return out_dir


@dataclass
class SyntheticCommand:
    out: str = "data/synthetic"  # output folder
    set: SyntheticConfig = field(default_factory=SyntheticConfig)  # what to generate (--n_train=..., --seed=...)


def main(argv: list[str] | None = None) -> None:
    """Command line: python -m clip_foundation.synthetic --out=data/synthetic [--n_train=2000] [--seed=0] ..."""
    from clip_foundation.common.cli import parse
    args = parse(SyntheticCommand(), argv, "usage: python -m clip_foundation.synthetic [--out=DIR] [--n_train=N] ...")
    config = args.set
    try:
        generate(args.out, config)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    n = config.n_train + config.n_val + config.n_test
    print(f"wrote {n} images ({config.n_train} train / {config.n_val} val / {config.n_test} test) "
          f"and {n * config.captions_per_image} captions to {args.out}")


if __name__ == "__main__":
    main()


MARKER = "synthetic.json"  # written last by `generate`: a folder holding it is the complete synthetic set
SYNTHETIC_QUERIES = ("a red circle", "a blue square", "a green triangle", "a small yellow star",
                     "a red circle above a blue square")  # what the shapes model is shown asking (grids, the page)
PHOTO_QUERIES = ("a dog", "a plane", "gloomy weather", "someone dunks on the basket", "a child in the water")


def is_synthetic(folder) -> bool:
    """Whether `folder` is the built-in synthetic set (its example queries are about shapes)."""
    return bool(folder) and (Path(folder) / MARKER).is_file()


def example_queries(folder) -> tuple[str, ...]:
    """Queries that suit the dataset in `folder`: shapes for the synthetic set, everyday scenes otherwise."""
    return SYNTHETIC_QUERIES if is_synthetic(folder) else PHOTO_QUERIES


def contains(attributes: dict, color: str, shape: str) -> bool:
    """Whether an image, given its captions.csv attribute columns, shows a `color` `shape`."""
    return any(attributes.get(f"color{i}") == color and attributes.get(f"shape{i}") == shape
               for i in (1, 2))
