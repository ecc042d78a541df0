"""What every reader produces and what every part of the project shares about input data:
`Record` (one image and all its captions), the `DataError`/`DataWarning` of bad input, the
`LoadReport` of what a load skipped, the `Source` each dataset layout is declared as (registered in
sources.SOURCES), the image files of a folder, the `DatasetFolders` its entries may name images in,
the `RowGrouper` that turns the line-based readers' caption rows into records, and `open_rgb`, the one safe image decode (EXIF rotation, alpha, 16-bit and
float grey, size cap).
"""
from __future__ import annotations

import math
import os
import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile, ImageOps


class DataError(ValueError):
    """Bad input data: the message names the file (and line) at fault."""


class SkippableError(DataError):
    """Bad input that `skip_bad` skips instead (a row, a caption, an image file): the only kind
    of DataError for which an error message may suggest --skip_bad."""


class DataWarning(UserWarning):
    """Data problems that were skipped (skip_bad=True) or repaired while loading."""


# Flickr8k's longest caption is 199 characters and the text model reads 64 tokens: a caption
# ten times that long is rows run together (a stray quote) or a pasted document, not a description.
MAX_CAPTION_CHARS = 1000


def has_visible(text: str) -> bool:
    """Whether `text` shows anything: zero-width spaces, joiners and BOMs (format characters,
    category Cf) and white space do not."""
    return any(not c.isspace() and unicodedata.category(c) != "Cf" for c in text)


def caption_fault(caption: str) -> tuple[str, str] | None:
    """The one rule every caption and text query follows, wherever it comes from (a reader's
    file, a shard, a search box): None when `caption` (already stripped) is fine, else
    (kind, message) for `LoadReport.bad` or an error line."""
    if not has_visible(caption):
        return "empty caption", "empty caption"
    if re.search(r"[\r\n]", caption):
        return "multi-line caption", "caption has a line break"
    if len(caption) > MAX_CAPTION_CHARS:
        return "caption too long", (f"caption is {len(caption)} characters, more than the "
                                    f"{MAX_CAPTION_CHARS} a caption may have (records.MAX_CAPTION_CHARS)")
    return None


@dataclass
class Record:
    image: Path                  # absolute path of the image file
    captions: list[str]          # every caption of this image, in file order
    split: str | None = None     # "train"/"val"/"test" when the dataset ships a split
    line: int | None = None      # first line of the source file that named this image
    extra: dict = field(default_factory=dict)  # other CSV columns (e.g. synthetic attributes)


@dataclass
class LoadReport:
    """What one load skipped or repaired. `skipped`/`notes` count by kind; `first` keeps
    the first "file:line: message" of each kind. Bad input raises unless `skip_bad`."""
    skip_bad: bool = False
    layout: str | None = None
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    first: dict = field(default_factory=dict)

    def bad(self, kind: str, where: str, msg: str) -> None:
        """Bad input: raise DataError, or (skip_bad) count it so the caller skips it."""
        if not self.skip_bad:
            raise SkippableError(f"{where}: {msg}")
        self.skipped[kind] += 1
        self.first.setdefault(kind, f"{where}: {msg}")

    def note(self, kind: str, where: str, msg: str) -> None:
        """Something repaired or dropped by rule (never an error): always counted."""
        self.notes[kind] += 1
        self.first.setdefault(kind, f"{where}: {msg}")

    def summary(self) -> str:
        """One line for the log; empty when nothing was skipped or noted."""
        parts = []
        for title, counts in (("skipped", self.skipped), ("noted", self.notes)):
            if counts:
                kinds = ", ".join(f"{n} {k}" for k, n in counts.items())
                firsts = "; ".join(self.first[k] for k in counts)
                parts.append(f"{title} {sum(counts.values())}: {kinds} (first: {firsts})")
        return "; ".join(parts)


@dataclass(frozen=True)
class Source:
    """One dataset layout: how to recognise it and how to read it. Declared beside its reader (here
    so that standard.py, hf.py and stream.py need not import sources.py, which imports them) and
    registered in `sources.SOURCES` (`sources.register_source`), whose order is the detection order."""
    name: str  # what --layout names it
    description: str  # one line on its files, for --layout's errors and the undetected folder's
    detect: Callable[[str | Path], bool]  # whether a --data path is in this layout (False when it does not exist)
    read: Callable[..., list[Record]] | None = None  # read(path, report=LoadReport, **options) -> records; None if streamed
    options: tuple[str, ...] = ()  # the data config's keys `read` takes as keywords (image_column, restval, ...)
    streams: bool = False  # training streams it (WebDataset shards) instead of reading it into records


SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}
# The largest photos people caption are ~50 MP, and every decode thread holds one full image:
# refuse more (from the header, before decoding), well below PIL's ~89 MP bomb warning.
MAX_IMAGE_PIXELS = 64_000_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The image files in `folder` (and below it with `recursive`), sorted; hidden ones skipped."""
    folder = Path(folder)
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


class DatasetFolders:
    """The folders a dataset's entries may name images in: the dataset folder and the image folders
    its layout reads, each with its links resolved (so a dataset folder, or an Images/ beside its
    caption file, that is a link to a shared copy still reads). Every reader asks `outside` of each
    image it found: an entry may not make evaluate, search, embed or the page read a file elsewhere."""

    def __init__(self, root, *image_folders):
        self.root = Path(root)
        self.real = {os.path.realpath(f) for f in (root, *image_folders)}
        self.parents: dict[str, str] = {}  # folder -> its real path: one lookup per folder, not per image

    def outside(self, path, name: str) -> str | None:
        """None when `path` (found for the entry `name`) lies, links resolved, in one of the folders;
        else the message that refuses it."""
        path = str(path)
        parent, base = os.path.split(path)
        if parent not in self.parents:
            self.parents[parent] = os.path.realpath(parent)
        real = (os.path.realpath(path) if base in ("", ".", "..") or os.path.islink(path)
                else os.path.join(self.parents[parent], base))
        if any(real == f or real.startswith(f.rstrip(os.sep) + os.sep) for f in self.real):
            return None
        return (f"image {name!r} leads outside the dataset folder {self.root} (to {real}): "
                "only images inside it are read")


def spans_lines(line: int, text: str) -> str:
    """"spans lines A-B: an unclosed quote?" when `text`, read from line `line`, has line breaks; else "".
    (csv lets a quoted field run over line ends: one stray quote eats the rows after it.)"""
    breaks = len(re.findall(r"\r\n|\r|\n", text.rstrip()))  # a trailing one ends the file
    return f"spans lines {line}-{line + breaks}: an unclosed quote?" if breaks else ""


class RowGrouper:
    """Collects the caption rows of a line-based reader (csv, flickr30k, flickr8k) into records, one
    per image file, reporting every kind of bad row the same way (`LoadReport.bad`)."""

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
        """One row: image `name`'s `caption` (caption #`number` where the file numbers them), or its fault reported."""
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
        if spans := spans_lines(line, caption):  # says which lines, so before the shared rule
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

    def result(self, source: Path) -> list[Record]:
        """The records, in file order; DataError when `source` gave none."""
        if not self.records:
            raise DataError(f"{source}: no usable rows")
        return list(self.records.values())


def file_resolver(folder: Path):
    """name (relative to `folder`, or absolute) -> its file, or None when there is none."""
    def resolve(name: str) -> Path | None:
        path = (folder / name).resolve()
        return path if path.is_file() else None
    return resolve


def dir_resolver(folder: Path):
    """name -> its file in the flat `folder`, or None: the folder is listed once (fast on 30k images)."""
    names = set(os.listdir(folder)) if folder.is_dir() else set()
    folder = folder.resolve()
    return lambda name: folder / name if name in names else None


def _to_8bit(im: Image.Image) -> float:
    # factor onto 0-255 for 16-bit or float grey (convert("L") then clips what is outside)
    if im.mode != "F":
        return 1 / 257  # 16-bit: 0-65535
    low, high = im.getextrema()
    return 255 if 0 <= low and high <= 1 else 1  # floats of scientific images: 0-1, or 0-255


def open_rgb(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB (EXIF rotation applied, alpha composited on
    white, 16-bit and float grey scaled to 8 bits); corrupt or truncated files, and images
    over MAX_IMAGE_PIXELS, raise DataError naming the file."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncation must fail here, not decode as grey
    _quiet_pil_bomb_warning()
    try:
        with Image.open(path) as im:  # reads the header only
            if (pixels := im.width * im.height) > MAX_IMAGE_PIXELS:
                raise SkippableError(f"{path}: image is {im.width}x{im.height} "
                                f"({math.ceil(pixels / 1e6)} MP), more than the "
                                f"{MAX_IMAGE_PIXELS // 10**6} MP this loader decodes")
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit or float grey
                scale = _to_8bit(im)
                im = im.point(lambda v: v * scale).convert("L")
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            return im.convert("RGB")
    except DataError:
        raise  # already says what is wrong (a ValueError, which the next line would wrap)
    except Image.DecompressionBombError as e:  # PIL's own refusal, from the header, over ~179 MP
        raise SkippableError(f"{path}: image is more than the {MAX_IMAGE_PIXELS // 10**6} MP this "
                             f"loader decodes ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SkippableError(f"{path}: cannot decode image ({e})") from None


_QUIET_BOMB = ("ignore", None, Image.DecompressionBombWarning, None, 0)  # a warnings.filters entry


def _quiet_pil_bomb_warning() -> None:
    # PIL's Image.open warns (DecompressionBombWarning) on images of ~89 to ~179 MP, each of which
    # open_rgb then refuses in its own line, as over MAX_IMAGE_PIXELS: the warning only repeats that,
    # raw. warnings.catch_warnings cannot scope it to one call (it swaps process-wide state under the
    # decode threads), so this filter is added once, last: any filter of the user's still wins.
    if _QUIET_BOMB not in warnings.filters:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, append=True)
