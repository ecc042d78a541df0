"""Dataset layouts on disk -> a list of `Record`s (one per image, all its captions).

Every reader returns the same record type, so everything downstream (splits, the image
cache, training, evaluation, search) is layout-agnostic. Each layout is one `Source` in
`SOURCES`, the one registry `detect_layout`, `load_records` and the layouts' error text read:
WebDataset shards (stream.py; streamed, never read here), Karpathy's standard split files and the
MS-COCO captions (standard.py), Flickr30k and Flickr8k (Kaggle and original files), a caption CSV of
your own photos, Hugging Face `datasets` (hf.py) and labelled class folders. A new layout is one
`register_source(Source(...))`. Bad input raises `DataError` naming file:line, or with
`skip_bad=True` is skipped, counted in a `LoadReport` and warned about once.
"""
from __future__ import annotations

import csv
import io
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from clip_foundation.data.hf import HF
from clip_foundation.data.records import (MAX_CAPTION_CHARS, SPLIT_ALIASES, DataError, DataWarning, DatasetFolders,  # noqa: F401
                                          LoadReport, Record, RowGrouper, Source, dir_resolver, file_resolver,
                                          image_files, spans_lines)
from clip_foundation.data.standard import COCO, KARPATHY
from clip_foundation.data.stream import SHARDS

DEFAULT_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of a {}.",
                     "a photo of the small {}.", "a photo of the large {}.")
CSV_LAYOUT = ("captions.csv (or one *.csv) with image and caption columns; image paths "
              "relative to the CSV's folder, to image_dir, or absolute (inside those folders)")
FLICKR30K_LAYOUT = ("flickr30k_images/results.csv ('image_name| comment_number| comment') and "
                    "flickr30k_images/flickr30k_images/*.jpg (or ROOT = the inner flickr30k_images)")
FLICKR8K_LAYOUT = ("captions.txt (image,caption) or Flickr8k.token.txt (name.jpg#N<TAB>caption), "
                   "images in Images/ or Flicker8k_Dataset/, optional splits/{train,dev,test}.txt "
                   "or Flickr_8k.{train,dev,test}Images.txt")
CLASSES_LAYOUT = "one folder of images per class (<class>/*.jpg|png), optionally under train/, val/, test/"


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


def _row_ok(report: LoadReport, line: int, where: str, row: list[str], expected: list[str],
            dirty: bool) -> bool:
    if len(row) != len(expected):
        spans = spans_lines(line, ",".join(row))
        report.bad("wrong field count", where, f"expected {len(expected)} fields {expected}, "
                   f"got {len(row)}" + (f"; the row {spans}" if spans else ""))
    elif dirty and (bad := _not_utf8(row)):
        report.bad("not utf-8", where, f"bytes that are not UTF-8: {bad!r}")
    else:
        return True
    return False


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
    grouper = RowGrouper(report, file_resolver(csv_path.parent / image_dir),
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
        raise DataError(f"{root}: no results.csv (expected {FLICKR30K_LAYOUT})")
    image_dir = csv_path.parent / "flickr30k_images"
    image_dir = image_dir if image_dir.is_dir() else csv_path.parent
    grouper = RowGrouper(report, dir_resolver(image_dir), DatasetFolders(root, image_dir), allow_duplicates)
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
    on_disk = dir_resolver(image_dir)
    splits = _flickr8k_splits(root, report)
    grouper, dropped = RowGrouper(report, on_disk, DatasetFolders(root, image_dir), allow_duplicates), set()
    caption_path = next((p for p in (root / "captions.txt", root / "Flickr8k.token.txt",
                                     root / "Flickr8k_text" / "Flickr8k.token.txt")
                         if p.is_file()), None)
    if caption_path is None:
        raise DataError(f"{root}: no captions.txt or Flickr8k.token.txt "
                        f"(expected {FLICKR8K_LAYOUT})")
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
        raise DataError(f"{root}: no class folders with images (expected {CLASSES_LAYOUT})")
    return records, sorted(classes)


def _is_flickr30k(path) -> bool:
    path = Path(path)
    return (path / "flickr30k_images" / "results.csv").is_file() or (
        (path / "results.csv").is_file() and (path / "flickr30k_images").is_dir())


def _is_flickr8k(path) -> bool:
    return any((Path(path) / n).is_file() for n in ("captions.txt", "Flickr8k.token.txt",
                                                     "Flickr8k_text/Flickr8k.token.txt"))


def _is_csv(path) -> bool:
    path = Path(path)
    if path.is_file():
        return path.suffix == ".csv"
    return (path / "captions.csv").is_file() or len(list(path.glob("*.csv"))) == 1


def _is_classes(path) -> bool:
    path = Path(path)
    return path.is_dir() and any(image_files(d) for _, f in _class_roots(path) for d in f.iterdir() if d.is_dir())


FLICKR30K = Source("flickr30k", FLICKR30K_LAYOUT, _is_flickr30k, read_flickr30k)
FLICKR8K = Source("flickr8k", FLICKR8K_LAYOUT, _is_flickr8k, read_flickr8k)
CSV = Source("csv", CSV_LAYOUT, _is_csv, read_caption_csv, options=("image_column", "caption_column"))
CLASSES = Source("classes", CLASSES_LAYOUT, _is_classes, lambda path, **options: read_class_folders(path, **options)[0])

# name -> Source, in detection order: the first whose `detect` holds names a path's layout
SOURCES: dict[str, Source] = {}


def register_source(source: Source, before: str | None = None) -> Source:
    """Add (or move) `source` in `SOURCES`: detected just before the layout named `before`, or after
    every other; `load_records`, `detect_layout`, --layout and their errors know it from then on."""
    entries = [(name, s) for name, s in SOURCES.items() if name != source.name]
    at = len(entries) if before is None else [name for name, _ in entries].index(before)  # ValueError: unknown
    entries.insert(at, (source.name, source))
    SOURCES.clear()
    SOURCES.update(entries)
    return source


# shards first (training streams a folder of .tar files whatever else it holds); then the standard split
# file, which wins over the Kaggle copy it sits beside; classes last, as any folder of folders looks like it
for _source in (SHARDS, KARPATHY, COCO, FLICKR30K, FLICKR8K, CSV, HF, CLASSES):
    register_source(_source)


def layout_names(taking: str | None = None) -> tuple[str, ...]:
    """The registered layouts' names, in detection order (what --layout takes besides auto); with
    `taking`, only those whose reader takes that option of the data config."""
    return tuple(name for name, source in SOURCES.items() if taking is None or taking in source.options)


def source_of(path: str | Path, layout: str = "auto") -> Source:
    """The source that reads `path`: the one named `layout`, or with "auto" the first whose `detect`
    holds. DataError for an unknown name, a missing path or a folder no layout detects (listing them)."""
    if layout != "auto":
        if layout not in SOURCES:
            raise DataError(f"unknown layout {layout!r}; known: auto, {', '.join(SOURCES)}")
        return SOURCES[layout]
    found = next((source for source in SOURCES.values() if source.detect(path)), None)
    if found is not None:
        return found
    if not Path(path).exists():
        raise DataError(f"{path}: dataset folder not found")
    expected = "\n".join(f"  {source.name}: {source.description}" for source in SOURCES.values())
    raise DataError(f"{path}: no known dataset layout; expected one of:\n{expected}")


def detect_layout(path: str | Path) -> str:
    """Name the layout of a dataset folder (see SOURCES), or raise DataError listing them."""
    return source_of(path).name


def load_records_with_report(path: str | Path, layout: str = "auto", *, skip_bad: bool = False,
                             **options) -> tuple[list[Record], LoadReport]:
    """Like `load_records`, but returns the `LoadReport` instead of warning with it."""
    source = source_of(path, layout)
    if source.streams:
        raise DataError(f"{path}: {source.name} are streamed while training, never read into records: "
                        "pass a dataset folder")
    if not Path(path).exists() and not source.detect(path):  # a name the source resolves itself (hf:NAME) passes
        raise DataError(f"{path}: dataset folder not found")
    report = LoadReport(skip_bad, source.name)
    return source.read(path, report=report, **options), report


def load_records(path: str | Path, layout: str = "auto", **options) -> list[Record]:
    """Read any supported dataset (see SOURCES) into records; `layout="auto"` detects it.
    Bad input raises DataError (file:line); with `skip_bad=True` it is skipped and one
    DataWarning summarizes the counts. Repairs and rule-based drops are warned about too."""
    records, report = load_records_with_report(path, layout, **options)
    if summary := report.summary():
        warnings.warn(f"{path} ({report.layout}): {summary}", DataWarning, stacklevel=2)
    return records


