"""The standard benchmark files -> `Record`s: Karpathy's split files and the MS-COCO captions.

Image-text retrieval papers report Flickr8k, Flickr30k and MS-COCO on the splits of Karpathy and
Fei-Fei (CVPR 2015), published as `dataset_flickr8k.json`, `dataset_flickr30k.json` and
`dataset_coco.json` in caption_datasets.zip:

    {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
      "split": "test", "sentences": [{"raw": "A man with a red helmet ...", "tokens": [...], ...}, ...],
      "imgid": 0, "sentids": [...], "cocoid": 391895}, ...]}

(the Flickr files have no "filepath"). Splits are train / restval / val / test (restval: COCO's
30,504 val2014 images outside Karpathy's val and test), 1,000 test images for the Flickrs and
5,000 for COCO. The official COCO captions (annotations/captions_train2017.json, ...) are
{"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "id", "caption"}]}.

Both are JSON, so bad input is named by its place in the file (`FILE:images[12]`) instead of a
line; otherwise it follows sources.py: a `DataError`, or with `skip_bad` skipped and counted in
the `LoadReport`.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from clip_foundation.data.records import DataError, DatasetFolders, LoadReport, Record, Source, caption_fault

KARPATHY_FILES = ("dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json")
KARPATHY_SPLITS = ("train", "restval", "val", "test")
# where a split file's images usually are beside it: Kaggle and original Flickr copies, COCO
IMAGE_DIRS = ("Images", "images", "flickr30k-images", "flickr30k_images/flickr30k_images",
              "flickr30k_images", "Flicker8k_Dataset", "Flickr8k_Dataset", "train2014", "val2014")
COCO_YEARS = ("2017", "2014")  # the newest year with a captions file is read (the same photos)
# dataset_coco.json, the largest standard file, is 148 MB; a split file is read whole, in memory
# (about 2.6 times its size), so one past this is refused with a way out rather than read
MAX_SPLIT_FILE_BYTES = 512 * 2**20
COCO_IMAGE_DIRS = tuple(f"{split}{year}" for year in COCO_YEARS for split in ("train", "val"))
KARPATHY_LAYOUT = ("dataset_flickr8k.json, dataset_flickr30k.json or dataset_coco.json (Karpathy's "
                   "train/restval/val/test splits) in the folder, or the file itself; images by "
                   "their filename (COCO: filepath/filename) in the folder or its " + ", ".join(
                       f"{d}/" for d in IMAGE_DIRS) + " (COCO: also train2017/, val2017/)")
COCO_LAYOUT = ("annotations/captions_{train,val}2017.json (or 2014) with images in "
               "train2017/ and val2017/ (or images/train2017/, ...)")


def find_karpathy_file(path: str | Path) -> Path | None:
    """The Karpathy split file `path` is or holds (see KARPATHY_FILES), or None; a folder with
    several is a DataError, as which one is meant cannot be told."""
    path = Path(path)
    if path.is_file():
        return path if path.name in KARPATHY_FILES else None
    found = [path / name for name in KARPATHY_FILES if (path / name).is_file()]
    if len(found) > 1:
        raise DataError(f"{path}: several split files ({', '.join(p.name for p in found)}): "
                        "move the others out or pass the one to read as --data=FILE")
    return found[0] if found else None


def coco_caption_files(root: str | Path) -> dict[str, Path]:
    """{"train" | "val": annotations/captions_<split><year>.json} of the newest year with any."""
    for year in COCO_YEARS:
        found = {split: Path(root) / "annotations" / f"captions_{split}{year}.json" for split in ("train", "val")}
        if found := {split: p for split, p in found.items() if p.is_file()}:
            return found
    return {}


class _ImageFinder:
    # relative image name -> file under ROOT or one of its image folders; each folder is listed
    # once, so a lookup is a set membership test even for COCO's 118k images. An entry may name
    # only images inside those folders (links resolved; COCO's image folders may be links).

    def __init__(self, root: Path, folders: tuple[str, ...]):
        self.folders = [root] + [root / d for d in folders if (root / d).is_dir()]
        self.inside = DatasetFolders(root, *self.folders, *(f / d for f in self.folders for d in COCO_IMAGE_DIRS))
        self.listed: dict[tuple[int, str], tuple[Path, set[str]]] = {}  # (folder, sub) -> its names

    def find(self, *relatives: str) -> Path | None:
        for relative in relatives:
            sub, _, name = relative.rpartition("/")
            for i, folder in enumerate(self.folders):
                if (i, sub) not in self.listed:
                    where = folder / sub
                    if self.inside.outside(where, sub):  # "..", "/tmp": not listed; the reader refuses it
                        return where / name
                    self.listed[i, sub] = (where.resolve(), set(os.listdir(where)) if where.is_dir() else set())
                resolved, names = self.listed[i, sub]
                if name in names:
                    return resolved / name
        return None

    def missing(self, relative: str) -> str:
        """The message for an image found nowhere."""
        return f"image file not found: {relative} (looked in {', '.join(f'{f}/' for f in self.folders)})"


def _load_json(path: Path, *keys: str, fields: tuple[str, ...]) -> dict:
    # the parsed file, a dict holding a list under each of `keys`, its objects holding only `fields`
    # (the ids, tokens and sentence objects nobody reads took 6.6 times the file's size; now 2.6,
    # measured on a 148 MB file shaped like dataset_coco.json)
    size = path.stat().st_size
    if size > MAX_SPLIT_FILE_BYTES:
        raise DataError(f"{path}: {size:,} bytes, more than the {MAX_SPLIT_FILE_BYTES // 2**20} MiB a split "
                        "or caption file may have (readers_standard.MAX_SPLIT_FILE_BYTES): write so large a "
                        "dataset as tar shards (docs/shards.md) and train on those")
    kept = frozenset((*keys, *fields))
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"),
                          object_pairs_hook=lambda pairs: {k: v for k, v in pairs if k in kept})
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for key in keys:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"{path}: expected a JSON object with an {key!r} list")
    return data


def _record(report: LoadReport, where: str, image: Path, captions: list[tuple[str, str]],
            split: str, extra: dict, allow_duplicates: bool) -> Record | None:
    # (where, text) captions -> one record, every caption checked by the shared rule
    kept = []
    for at, caption in captions:
        caption = caption.strip()
        if re.search(r"[\r\n]", caption):  # JSON keeps line breaks in a string: not split rows
            report.note("joined multi-line caption", at, repr(caption))
            caption = " ".join(caption.split())
        if fault := caption_fault(caption):
            report.bad(fault[0], at, f"{fault[1]} for {image.name!r}")
        elif caption in kept and not allow_duplicates:
            report.bad("duplicate row", at, f"{image.name!r} already has caption {caption!r}")
        else:
            if caption in kept:  # published sets repeat a few captions verbatim: kept, but said
                report.note("identical caption kept", at, f"{image.name!r}: {caption!r}")
            kept.append(caption)
    if not kept:
        report.bad("no captions", where, f"{image.name} has no usable captions")
        return None
    return Record(image, kept, split, None, extra)


def _text(entry, key: str):
    value = entry.get(key) if isinstance(entry, dict) else None
    return value if isinstance(value, str) and value.strip() else None


def read_karpathy(root: str | Path, *, restval: bool = True, allow_duplicates: bool = True,
                  skip_bad: bool = False, report: LoadReport | None = None) -> list[Record]:
    """A Karpathy split file (ROOT itself, or the one of KARPATHY_FILES in folder ROOT), its images
    found by `filename` (and COCO's `filepath`) under the file's folder or its usual image
    folders; captions are each image's `sentences[*].raw`. `Record.split` is the file's split,
    with restval read as train unless `restval=False` (then "restval", in no train/val/test
    split). COCO's 2014 names also match the same photos renamed in train2017/ or val2017/."""
    report = report or LoadReport(skip_bad)
    path = Path(root) if Path(root).is_file() else find_karpathy_file(root)
    if path is None:
        raise DataError(f"{root}: no Karpathy split file (expected {KARPATHY_LAYOUT})")
    finder = _ImageFinder(path.parent, IMAGE_DIRS)
    records: dict[Path, tuple[str, Record]] = {}
    entries = _load_json(path, "images", fields=("filename", "filepath", "split", "sentences", "raw"))["images"]
    for i, entry in enumerate(entries):
        where = f"{path}:images[{i}]"
        name, split = _text(entry, "filename"), _text(entry, "split")
        sentences = entry.get("sentences") if isinstance(entry, dict) else None
        if name is None or not isinstance(sentences, list):
            report.bad("bad entry", where, 'expected {"filename": ..., "split": ..., "sentences": [{"raw": ...}]}')
            continue
        if split not in KARPATHY_SPLITS:
            report.bad("unknown split", where, f"split {split!r} is not one of {', '.join(KARPATHY_SPLITS)}")
            continue
        relative = f"{entry['filepath']}/{name}" if _text(entry, "filepath") else name
        coco = re.fullmatch(r"COCO_(?:train|val)2014_0*(\d+)\.jpg", name)
        image = finder.find(relative, name,
                            *([f"{d}/{int(coco[1]):012d}.jpg" for d in ("train2017", "val2017")] if coco else []))
        if image is None:
            report.bad("missing image", where, finder.missing(relative))
            continue
        if outside := finder.inside.outside(image, relative):
            report.bad("outside the dataset", where, outside)
            continue
        if image in records:
            report.bad("duplicate row", where, f"{name} already listed at {records[image][0]}")
            continue
        captions = [(f"{where}.sentences[{k}]", s.get("raw")) for k, s in enumerate(sentences)
                    if isinstance(s, dict) and isinstance(s.get("raw"), str)]
        if len(captions) < len(sentences):
            report.bad("bad entry", where, 'a sentence without a "raw" string')
        record = _record(report, where, image, captions, "train" if split == "restval" and restval else split,
                         {"karpathy_split": split}, allow_duplicates)
        if record is not None:
            records[image] = (where, record)
    if not records:
        raise DataError(f"{path}: no usable images")
    return [record for _, record in records.values()]


def read_coco(root: str | Path, *, allow_duplicates: bool = True, skip_bad: bool = False,
              report: LoadReport | None = None) -> list[Record]:
    """The official MS-COCO captions: annotations/captions_train<YEAR>.json as the train split and
    captions_val<YEAR>.json as val (the newest YEAR present), images in <split><YEAR>/ or
    images/<split><YEAR>/. COCO ships no test captions: papers test on Karpathy's 5,000 images
    (dataset_coco.json, the karpathy layout)."""
    report = report or LoadReport(skip_bad)
    root = Path(root)
    files = coco_caption_files(root)
    if not files:
        raise DataError(f"{root}: no annotations/captions_*.json (expected {COCO_LAYOUT})")
    finder, records = _ImageFinder(root, ("images",)), []
    for split, path in files.items():
        data = _load_json(path, "images", "annotations", fields=("id", "file_name", "image_id", "caption"))
        images, captions = {}, {}  # image id -> (where, file name); -> [(where, caption)]
        for i, entry in enumerate(data["images"]):
            where, name = f"{path}:images[{i}]", _text(entry, "file_name")
            if name is None or not isinstance(entry.get("id"), int):
                report.bad("bad entry", where, 'expected {"id": <int>, "file_name": ...}')
            elif entry["id"] in images:
                report.bad("duplicate row", where, f"image id {entry['id']} already at {images[entry['id']][0]}")
            else:
                images[entry["id"]], captions[entry["id"]] = (where, name), []
        for j, ann in enumerate(data["annotations"]):
            where = f"{path}:annotations[{j}]"
            image_id, caption = (ann.get("image_id"), ann.get("caption")) if isinstance(ann, dict) else (None, None)
            if image_id not in images or not isinstance(caption, str):
                report.bad("bad entry", where, f"expected an \"image_id\" of {path.name}'s images and a "
                           f"\"caption\" string, got {ann!r:.80}")
                continue
            captions[image_id].append((where, caption))
        year = path.stem[-4:]
        for image_id, (where, name) in images.items():
            image = finder.find(f"{split}{year}/{name}", name)
            if image is None:
                report.bad("missing image", where, finder.missing(f"{split}{year}/{name}"))
            elif outside := finder.inside.outside(image, name):
                report.bad("outside the dataset", where, outside)
            elif record := _record(report, where, image, captions[image_id], split, {"coco_id": image_id},
                                   allow_duplicates):
                records.append(record)
    if not records:
        raise DataError(f"{root}: no usable images in {', '.join(p.name for p in files.values())}")
    return records


# The two layouts, registered by sources.py: karpathy is detected before every other layout of a folder
# (a split file beside a Kaggle copy gives it the standard split), coco first among the folder layouts.
KARPATHY = Source("karpathy", KARPATHY_LAYOUT, lambda path: find_karpathy_file(path) is not None, read_karpathy,
                  options=("restval",))
COCO = Source("coco", COCO_LAYOUT, lambda path: Path(path).is_dir() and bool(coco_caption_files(path)), read_coco)
