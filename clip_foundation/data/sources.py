"""Dataset layouts on disk -> a list of `Record`s (one per image, all its captions).

Every reader returns the same record type, so everything downstream (splits, the image
cache, training, evaluation, search) is layout-agnostic. Layouts: a caption CSV of your own
photos, Flickr30k and Flickr8k (Kaggle and original files), labelled class folders, Karpathy's
standard split files and the MS-COCO captions (in readers_standard.py), and Hugging Face
`datasets` (in readers_hf.py). Bad input raises `DataError` naming file:line,
or with `skip_bad=True` is skipped, counted in a `LoadReport` and warned about once.
"""
from __future__ import annotations

import csv
import io
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from clip_foundation.data.records import (MAX_CAPTION_CHARS, SPLIT_ALIASES, DataError, DataWarning, DatasetFolders,  # noqa: F401
                      LoadReport, Record, caption_fault, image_files)
from clip_foundation.data.standard import (COCO_LAYOUT, KARPATHY_LAYOUT, coco_caption_files, find_karpathy_file,
                               read_coco, read_karpathy)

DEFAULT_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of a {}.",
                     "a photo of the small {}.", "a photo of the large {}.")
LAYOUTS = {
    "karpathy": KARPATHY_LAYOUT,  # detected first: the standard split wins over any other
    "coco": COCO_LAYOUT,
    "csv": "captions.csv (or one *.csv) with image and caption columns; image paths "
           "relative to the CSV's folder, to image_dir, or absolute (inside those folders)",
    "flickr30k": "flickr30k_images/results.csv ('image_name| comment_number| comment') and "
                 "flickr30k_images/flickr30k_images/*.jpg (or ROOT = the inner flickr30k_images)",
    "flickr8k": "captions.txt (image,caption) or Flickr8k.token.txt (name.jpg#N<TAB>caption), "
                "images in Images/ or Flicker8k_Dataset/, optional splits/{train,dev,test}.txt "
                "or Flickr_8k.{train,dev,test}Images.txt",
    "classes": "one folder of images per class (<class>/*.jpg|png), optionally under "
               "train/, val/, test/",
    "hf": "'hf:NAME' (Hugging Face hub), a datasets save_to_disk folder, or *.parquet files",
}


def _read_text(path: Path) -> tuple[str, bool]:
    # (text, dirty): undecodable bytes survive as surrogates so the row holding them is named
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", "surrogateescape").removeprefix("\ufeff"), True


def _not_utf8(fields: list[str]) -> bytes:
    return bytes(ord(c) - 0xDC00 for f in fields for c in f if 0xDC80 <= ord(c) <= 0xDCFF)


def _csv_rows(text: str) -> Iterator[tuple[int, list[str]]]:
    # (first line, fields) per non-blank row: a quoted caption may span several lines. A stray
    # quote can swallow the rest of a large file into one field, past csv's field size limit
    # (128 KB): the limit is lifted to the text's size (it is in memory already) while parsing,
    # so the caption rules, not a _csv.Error, name the lines that field spans.
    limit = csv.field_size_limit(max(len(text), csv.field_size_limit()))
    try:
        rows, end, found = csv.reader(io.StringIO(text, newline="")), 0, []
        for row in rows:
            line, end = end + 1, rows.line_num
            if row and "".join(row).strip():
                found.append((line, row))
        return iter(found)
    finally:
        csv.field_size_limit(limit)


def _spans_lines(line: int, text: str) -> str:
    # csv lets a quoted field run over line ends: one stray quote eats the rows after it
    breaks = len(re.findall(r"\r\n|\r|\n", text.rstrip()))  # a trailing one ends the file
    return f"spans lines {line}-{line + breaks}: an unclosed quote?" if breaks else ""


def _row_ok(report: LoadReport, line: int, where: str, row: list[str], expected: list[str],
            dirty: bool) -> bool:
    if len(row) != len(expected):
        spans = _spans_lines(line, ",".join(row))
        report.bad("wrong field count", where, f"expected {len(expected)} fields {expected}, "
                   f"got {len(row)}" + (f"; the row {spans}" if spans else ""))
    elif dirty and (bad := _not_utf8(row)):
        report.bad("not utf-8", where, f"bytes that are not UTF-8: {bad!r}")
    else:
        return True
    return False


class _Grouper:
    # Collects caption rows into records, reporting every kind of bad row the same way.

    def __init__(self, report: LoadReport, resolve, folders: DatasetFolders, allow_duplicates: bool = False):
        self.report, self.resolve = report, resolve  # resolve(name) -> Path | None if missing
        self.folders = folders  # where the names may lead
        self.allow_duplicates = allow_duplicates
        self.numbers: set[tuple[Path, str]] = set()  # (image, caption number) where numbered
        self.paths: dict[str, Path | None] = {}  # every image name met -> its file
        self.records: dict[Path, Record] = {}    # keyed by file: two spellings, one image
        self.seen: set[tuple[Path, str]] = set()

    def add(self, where: str, line: int, name: str, caption: str,
            split: str | None = None, extra: dict | None = None, number: str | None = None):
        if not name.strip():
            return self.report.bad("empty image name", where, "no image name")
        if name not in self.paths:
            self.paths[name] = self.resolve(name)
            if self.paths[name] is None:
                return self.report.bad("missing image", where, f"image file not found: {name}")
            if outside := self.folders.outside(self.paths[name], name):
                self.paths[name] = None  # its later rows are skipped too
                return self.report.bad("outside the dataset", where, outside)
        path, caption = self.paths[name], caption.strip()
        if path is None:
            return  # the missing image was reported on its first row
        if spans := _spans_lines(line, caption):  # says which lines, so before the shared rule
            return self.report.bad("multi-line caption", where, f"caption {spans}")
        if fault := caption_fault(caption):
            kind, message = fault
            return self.report.bad(kind, where, f"{message} for {name!r}" if kind == "empty caption" else message)
        if number is not None:
            if (path, number) in self.numbers:
                return self.report.bad("duplicate row", where,
                                       f"duplicate row: caption #{number} of {name!r} again")
            self.numbers.add((path, number))
        if (path, caption) in self.seen:
            if not self.allow_duplicates:
                return self.report.bad("duplicate row", where,
                                       f"duplicate row: {name!r} already has caption {caption!r}")
            # Published datasets repeat some captions verbatim (9 in Flickr8k): keep, but say so.
            self.report.note("identical caption kept", where, f"{name!r}: {caption!r}")
        self.seen.add((path, caption))
        if path not in self.records:
            self.records[path] = Record(path, [], split, line, extra or {})
        self.records[path].captions.append(caption)

    def result(self, source: Path) -> list[Record]:  # records in file order
        if not self.records:
            raise DataError(f"{source}: no usable rows")
        return list(self.records.values())


def _file_resolver(folder: Path):  # name (relative to folder, or absolute) -> file | None
    def resolve(name: str) -> Path | None:
        path = (folder / name).resolve()
        return path if path.is_file() else None
    return resolve


def _dir_resolver(folder: Path):  # the same for a flat folder, listed once (fast)
    names = set(os.listdir(folder)) if folder.is_dir() else set()
    folder = folder.resolve()
    return lambda name: folder / name if name in names else None


def read_caption_csv(root: str | Path, csv_name: str = "captions.csv",
                     image_column: str = "image", caption_column: str = "caption",
                     split_column: str = "split", image_dir: str = "", *,
                     allow_duplicates: bool = False, skip_bad: bool = False,
                     report: LoadReport | None = None) -> list[Record]:
    """Read a folder with a CSV of `image,caption` rows (`root` may also be the CSV file;
    a folder without `csv_name` but with exactly one *.csv uses that); captions are grouped
    by image, other columns go to `Record.extra`. Image paths are relative to the CSV's
    folder joined with `image_dir` (which may be absolute), or absolute; either way inside one of
    those folders (`DatasetFolders`: no path or link leading out of them). An image with the
    same caption twice is bad input unless `allow_duplicates` (then kept and noted)."""
    report = report or LoadReport(skip_bad)
    root = Path(root)
    root, csv_name = (root.parent, root.name) if root.is_file() else (root, csv_name)
    csv_path, others = root / csv_name, sorted(root.glob("*.csv"))
    if not csv_path.is_file() and csv_name == "captions.csv" and len(others) == 1:
        csv_path = others[0]
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: caption file not found")
    text, dirty = _read_text(csv_path)
    rows = _csv_rows(text)
    _, header = next(rows, (1, []))
    header = [h.strip() for h in header]
    # a repeated name would silently keep its last column; blank ones are spreadsheet padding
    repeated = [h for h, n in Counter(header).items() if n > 1 and h]
    if repeated:
        raise DataError(f"{csv_path}:1: repeated column(s) {repeated} in header {header}")
    missing = {image_column, caption_column} - set(header)
    if missing:
        raise DataError(f"{csv_path}:1: missing column(s) {sorted(missing)}; found {header}")
    grouper = _Grouper(report, _file_resolver(csv_path.parent / image_dir),
                       DatasetFolders(csv_path.parent, csv_path.parent / image_dir), allow_duplicates)
    for line, row in rows:
        if not _row_ok(report, line, f"{csv_path}:{line}", row, header, dirty):
            continue
        values = dict(zip(header, row))
        split = values.get(split_column, "").strip() or None
        extra = {k: v for k, v in values.items()
                 if k not in (image_column, caption_column, split_column)}
        grouper.add(f"{csv_path}:{line}", line, values[image_column].strip(),
                    values[caption_column], SPLIT_ALIASES.get(split.lower(), split) if split
                    else None, extra)
    return grouper.result(csv_path)


def read_flickr30k(root: str | Path, *, allow_duplicates: bool = True, skip_bad: bool = False,
                   report: LoadReport | None = None) -> list[Record]:
    """Kaggle hsankesara/flickr-image-dataset: pipe-delimited results.csv beside the
    flickr30k_images/ image folder. ROOT may be the outer or the inner flickr30k_images.
    A repeated (image, comment_number) is a bad row; the same text under two numbers is
    kept (and noted) unless `allow_duplicates=False`."""
    report = report or LoadReport(skip_bad)
    root = Path(root)
    csv_path = next((p for p in (root / "flickr30k_images" / "results.csv",
                                 root / "results.csv") if p.is_file()), None)
    if csv_path is None:
        raise DataError(f"{root}: no results.csv (expected {LAYOUTS['flickr30k']})")
    image_dir = csv_path.parent / "flickr30k_images"
    image_dir = image_dir if image_dir.is_dir() else csv_path.parent
    grouper = _Grouper(report, _dir_resolver(image_dir), DatasetFolders(root, image_dir), allow_duplicates)
    text, dirty = _read_text(csv_path)
    for line, raw in enumerate(io.StringIO(text, newline=""), start=1):
        where, raw = f"{csv_path}:{line}", raw.rstrip("\r\n")
        fields = [f.strip() for f in raw.split("|")]
        if line == 1 and fields and fields[0] == "image_name":
            continue
        if not raw.strip():
            continue
        if dirty and (bad := _not_utf8(fields)):
            report.bad("not utf-8", where, f"bytes that are not UTF-8: {bad!r}")
            continue
        if len(fields) == 2 and (m := re.fullmatch(r"(\d+)\s+(.*)", fields[1])):
            # The Kaggle file has a row with the pipe between number and comment missing.
            report.note("repaired row", where, "missing '|' after comment_number, split it")
            fields = [fields[0], m[1], m[2]]
        if len(fields) != 3 or not fields[1].isdigit():
            report.bad("wrong field count", where,
                       "expected 'image_name| comment_number| comment', got " + repr(raw[:80]))
            continue
        grouper.add(where, line, fields[0], fields[2], number=fields[1])
    return grouper.result(csv_path)


def _flickr8k_splits(root: Path, report: LoadReport) -> dict[str, tuple[str, str]]:
    # official split lists -> {image name: (split, "file:line")}; {} when none shipped
    found = {}
    for split, names in (("train", ("splits/train.txt", "Flickr_8k.trainImages.txt")),
                         ("val", ("splits/dev.txt", "splits/val.txt", "Flickr_8k.devImages.txt")),
                         ("test", ("splits/test.txt", "Flickr_8k.testImages.txt"))):
        for name in names:
            for path in (root / name, root / "Flickr8k_text" / name):
                if not path.is_file():
                    continue
                text, _ = _read_text(path)
                for line, image in enumerate(text.splitlines(), start=1):
                    image, where = image.strip(), f"{path}:{line}"
                    if not image:
                        continue
                    if image in found:
                        report.bad("duplicate row", where, f"{image} already listed at "
                                   f"{found[image][1]} ({found[image][0]})")
                        continue
                    found[image] = (split, where)
    return found


def read_flickr8k(root: str | Path, *, allow_duplicates: bool = True, skip_bad: bool = False,
                  report: LoadReport | None = None) -> list[Record]:
    """Flickr8k: Kaggle adityajn105/flickr8k (captions.txt + Images/) or the original files
    (Flickr8k.token.txt + Flicker8k_Dataset/). Split lists, when present, set Record.split;
    then images named in captions but in no list and absent on disk are dropped (noted).
    Repeated captions of an image are kept and noted (the published data has 9) unless
    `allow_duplicates=False`; a repeated name.jpg#N is always a bad row."""
    report = report or LoadReport(skip_bad)
    root = Path(root)
    image_dir = next((root / d for d in ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset")
                      if (root / d).is_dir()), root / "Images")
    on_disk = _dir_resolver(image_dir)
    splits = _flickr8k_splits(root, report)
    grouper, dropped = _Grouper(report, on_disk, DatasetFolders(root, image_dir), allow_duplicates), set()
    caption_path = next((p for p in (root / "captions.txt", root / "Flickr8k.token.txt",
                                     root / "Flickr8k_text" / "Flickr8k.token.txt")
                         if p.is_file()), None)
    if caption_path is None:
        raise DataError(f"{root}: no captions.txt or Flickr8k.token.txt "
                        f"(expected {LAYOUTS['flickr8k']})")
    text, dirty = _read_text(caption_path)
    token_format = caption_path.name.endswith("token.txt")
    if token_format:  # name.jpg#N<TAB>caption, no header
        rows = ((i, r.rstrip("\r\n").split("\t", 1))
                for i, r in enumerate(io.StringIO(text, newline=""), start=1) if r.strip())
    else:
        rows = _csv_rows(text)
        header = next(rows, (1, []))[1]
        if [h.strip() for h in header] != ["image", "caption"]:
            raise DataError(f"{caption_path}:1: expected header 'image,caption', got {header}")
    for line, row in rows:
        where = f"{caption_path}:{line}"
        if not _row_ok(report, line, where, row, ["image#N", "caption"] if token_format
                       else ["image", "caption"], dirty):
            continue
        name, number = row[0].strip(), None
        if token_format and "#" in name:
            name, number = name.rsplit("#", 1)
        if splits and name not in splits and on_disk(name) is None:
            # e.g. the shared copy ships train+dev images only: no test images, no test list
            if name not in dropped:
                dropped.add(name)
                report.note("dropped, not on disk nor in a split list", where, name)
            continue
        grouper.add(where, line, name, row[1], splits.get(name, (None,))[0], number=number)
    records = grouper.records
    for name, (split, where) in splits.items():
        if name not in grouper.paths:
            report.bad("no captions", where, f"{name} is in the {split} list but has no "
                       f"caption rows in {caption_path.name}")
    for rec in records.values():
        if splits and rec.image.name not in splits:
            report.note("kept with split=None, in no split list", f"{caption_path}:{rec.line}",
                        rec.image.name)
    return grouper.result(caption_path)


def _class_roots(root: Path) -> list[tuple[str | None, Path]]:
    # [(split, folder of class folders)]: ROOT itself, or ROOT/train, ROOT/test, ...
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if subdirs and all(d.name.lower() in SPLIT_ALIASES for d in subdirs):
        return [(SPLIT_ALIASES[d.name.lower()], d) for d in subdirs]
    return [(None, root)]


def read_class_folders(root: str | Path, templates=DEFAULT_TEMPLATES, *,
                       report: LoadReport | None = None) -> tuple[list[Record], list[str]]:
    """Labelled class folders (ROOT/<class>/*.jpg, optionally ROOT/train/<class>/...) ->
    (records, sorted class names). Captions are the templates filled with the class name
    (`_` -> space); `Record.extra["label"]` is the folder name."""
    report = report or LoadReport()
    root = Path(root)
    records, classes = [], set()
    for split, folder in _class_roots(root):
        for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            folders = DatasetFolders(root, folder, d)  # a class folder may be a link; its images may not lead out
            images = []
            for p in image_files(d):
                if outside := folders.outside(p, p.name):
                    report.bad("outside the dataset", str(p), outside)
                else:
                    images.append(p)
            if not images:
                report.note("class folder with no images", str(d), "ignored")
                continue
            classes.add(d.name)
            prompt = d.name.replace("_", " ")
            records += [Record(p.resolve(), [t.format(prompt) for t in templates], split, None,
                               {"label": d.name}) for p in images]
    if not records:
        raise DataError(f"{root}: no class folders with images (expected {LAYOUTS['classes']})")
    return records, sorted(classes)


def _is_hf(path: Path) -> bool:
    return (path.suffix == ".parquet" or (path / "dataset_info.json").is_file()
            or (path / "dataset_dict.json").is_file() or any(path.glob("*.parquet"))
            or any(path.glob("data/*.parquet")))


def detect_layout(path: str | Path) -> str:
    """Name the layout of a dataset folder (see LAYOUTS), or raise DataError listing them."""
    if str(path).startswith("hf:"):
        return "hf"
    path = Path(path)
    if find_karpathy_file(path):  # a split file beside a Kaggle copy gives it the standard split
        return "karpathy"
    if path.is_file():
        if path.suffix == ".parquet":
            return "hf"
        if path.suffix == ".csv":
            return "csv"
    elif path.is_dir():
        if coco_caption_files(path):
            return "coco"
        if (path / "flickr30k_images" / "results.csv").is_file() or (
                (path / "results.csv").is_file() and (path / "flickr30k_images").is_dir()):
            return "flickr30k"
        if any((path / n).is_file() for n in ("captions.txt", "Flickr8k.token.txt",
                                               "Flickr8k_text/Flickr8k.token.txt")):
            return "flickr8k"
        if (path / "captions.csv").is_file() or len(list(path.glob("*.csv"))) == 1:
            return "csv"
        if _is_hf(path):
            return "hf"
        if any(image_files(d) for _, f in _class_roots(path) for d in f.iterdir() if d.is_dir()):
            return "classes"
    else:
        raise DataError(f"{path}: dataset folder not found")
    expected = "\n".join(f"  {name}: {what}" for name, what in LAYOUTS.items())
    raise DataError(f"{path}: no known dataset layout; expected one of:\n{expected}")


READERS = {"csv": read_caption_csv, "flickr30k": read_flickr30k, "flickr8k": read_flickr8k,
           "classes": read_class_folders, "karpathy": read_karpathy, "coco": read_coco}


def load_records_with_report(path: str | Path, layout: str = "auto", *, skip_bad: bool = False,
                             **options) -> tuple[list[Record], LoadReport]:
    """Like `load_records`, but returns the `LoadReport` instead of warning with it."""
    layout = detect_layout(path) if layout == "auto" else layout
    report = LoadReport(skip_bad, layout)
    if layout == "hf":
        from clip_foundation.data.hf import read_hf  # imports the optional `datasets` lazily
        return read_hf(path, report=report, **options), report
    if layout not in READERS:
        raise DataError(f"unknown layout {layout!r}; known: auto, {', '.join(LAYOUTS)}")
    if not Path(path).exists():
        raise DataError(f"{path}: dataset folder not found")
    records = READERS[layout](path, report=report, **options)
    return (records[0] if layout == "classes" else records), report


def load_records(path: str | Path, layout: str = "auto", **options) -> list[Record]:
    """Read any supported dataset (see LAYOUTS) into records; `layout="auto"` detects it.
    Bad input raises DataError (file:line); with `skip_bad=True` it is skipped and one
    DataWarning summarizes the counts. Repairs and rule-based drops are warned about too."""
    records, report = load_records_with_report(path, layout, **options)
    if summary := report.summary():
        warnings.warn(f"{path} ({report.layout}): {summary}", DataWarning, stacklevel=2)
    return records


