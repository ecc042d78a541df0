"""Hugging Face `datasets` -> `Record`s, for `load_records("hf:NAME")`, a `save_to_disk`
folder, or parquet files. Records need image *files*, so images are written once to
`<cache_dir>/images/` and the records to `<cache_dir>/records.json`; a later load with the
same options reads that manifest back. `datasets` is optional and imported lazily.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from pathlib import Path

from clip_foundation.common.files import atomic_write
from clip_foundation.data.records import SPLIT_ALIASES, DataError, DatasetFolders, LoadReport, Record, Source

CAPTION_COLUMNS = ("caption", "captions", "text", "sentences")
MANIFEST = "records.json"
HF_LAYOUT = "'hf:NAME' (Hugging Face hub), a datasets save_to_disk folder, or *.parquet files"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading Hugging Face datasets needs the optional `datasets` "
                        'package: pip install "clip-foundation[hf]"') from None
    return datasets


def default_cache_dir(source: str | Path, split: str | None = None) -> Path:
    """data/hf/<sanitized name> in the repository root; local sources get a hash of their path."""
    source = str(source)
    if source.startswith("hf:"):
        name = source[3:]
    else:
        path = Path(source).resolve()
        name = f"{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name + (f"-{split}" if split else "")).strip("_.")
    return Path(__file__).resolve().parents[2] / "data" / "hf" / name  # the repository root


def _split_of(file: Path) -> str:
    """Split named by a parquet file (train-00000-of-00002.parquet) or its folder (test/)."""
    m = re.match(r"(train|training|validation|valid|val|dev|test)(?=[-_.]|$)", file.stem)
    if m:
        return m[1]
    return file.parent.name if file.parent.name.lower() in SPLIT_ALIASES else "unsplit"


def _load(source: str, split: str | None, config: str | None, arrow_cache: Path) -> dict:
    """Load the source -> {split name: Dataset}."""
    ds = _datasets()
    if source.startswith("hf:"):
        try:
            loaded = ds.load_dataset(source[3:], config, split=split)
        except Exception as e:  # offline, unknown name, gated...: one clear line, not a trace
            raise DataError(f"{source}: cannot load from the Hugging Face hub "
                            f"({type(e).__name__}: {e})") from e
    else:
        path = Path(source)
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = ds.load_from_disk(str(path))
        else:
            files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
            if not files:
                raise DataError(f"{path}: no save_to_disk dataset and no *.parquet files")
            by_split: dict[str, list[str]] = {}
            for f in files:
                by_split.setdefault(_split_of(f), []).append(str(f))
            loaded = ds.load_dataset("parquet", data_files=by_split, cache_dir=str(arrow_cache))
    if isinstance(loaded, ds.Dataset):
        return {split or "unsplit": loaded}
    if split is not None:
        if split not in loaded:
            raise DataError(f"{source}: no split {split!r}; found {list(loaded)}")
        return {split: loaded[split]}
    return dict(loaded)


def _pick_columns(source: str, d, image_column: str | None, caption_column: str | None):
    ds = _datasets()
    features = d.features
    if image_column is None:
        image_column = next((c for c, f in features.items() if isinstance(f, ds.Image)), None)
    if caption_column is None:
        caption_column = next((c for c in CAPTION_COLUMNS if c in features), None)
    for role, column in (("image", image_column), ("caption", caption_column)):
        if column is None or column not in features:
            raise DataError(f"{source}: no {role} column "
                            f"{'found' if column is None else repr(column)}; columns: "
                            f"{dict(features)}; pass {role}_column=")
    return image_column, caption_column


def _write_image(image: dict | None, stem: Path, where: str, report: LoadReport,
                 folders: DatasetFolders) -> Path | None:
    """Write one image ({"bytes", "path"}) as a file; JPEG/PNG bytes are kept as is. A row with
    only a path is copied when the path lies in `folders` (the dataset's own, or the datasets cache)."""
    data, src = (image or {}).get("bytes"), (image or {}).get("path")
    if data:
        ext = (".jpg" if data[:3] == b"\xff\xd8\xff" else
               ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else None)
        if ext is None:  # other formats: re-encode losslessly as PNG
            from clip_foundation.data.records import open_rgb
            try:
                out = stem.with_suffix(".png")
                open_rgb(io.BytesIO(data)).save(out)
                return out
            except DataError as e:
                report.bad("cannot decode image", where, str(e).split(": ", 1)[-1])
                return None
        out = stem.with_suffix(ext)
        out.write_bytes(data)
        return out
    if src and (outside := folders.outside(src, src)):
        report.bad("outside the dataset", where, outside)
        return None
    if src and Path(src).is_file():
        out = stem.with_suffix(Path(src).suffix or ".jpg")
        shutil.copyfile(src, out)
        return out
    report.bad("missing image", where, f"no image bytes and no image file {src!r}")
    return None


class _Recorder:
    """Forwards to the report and remembers the issues, so a cached load can replay them."""

    def __init__(self, report: LoadReport):
        self.report, self.issues = report, []

    def bad(self, kind, where, msg):
        self.report.bad(kind, where, msg)
        self.issues.append(("bad", kind, where, msg))

    def note(self, kind, where, msg):
        self.report.note(kind, where, msg)
        self.issues.append(("note", kind, where, msg))


def read_hf(source: str | Path, *, image_column: str | None = None,
            caption_column: str | None = None, split: str | None = None,
            config: str | None = None, cache_dir: str | Path | None = None,
            skip_bad: bool = False, report: LoadReport | None = None) -> list[Record]:
    """Hugging Face dataset -> records, images materialized under `cache_dir` (default
    data/hf/<name>). Columns default to the first Image feature and a caption/captions/
    text column; a column of caption lists gives several captions per image."""
    report = report or LoadReport(skip_bad)
    source = str(source)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(source, split)
    key = {"source": source if source.startswith("hf:") else str(Path(source).resolve()),
           "image_column": image_column, "caption_column": caption_column,
           "split": split, "config": config}
    if not source.startswith("hf:"):  # a local source saved again must be read again
        path = Path(source)
        key["mtime"] = max(p.stat().st_mtime_ns for p in [path, *path.rglob("*")])
    manifest = cache_dir / MANIFEST
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        if saved["key"] == key and all(Path(r["image"]).is_file() for r in saved["records"]):
            for how, kind, where, msg in saved["issues"]:
                getattr(report, how)(kind, where, msg)
            return [Record(Path(r["image"]), r["captions"], r["split"], r["line"], r["extra"])
                    for r in saved["records"]]
    recorder, records = _Recorder(report), []
    # rows with a path and no bytes: files in the dataset's folder, or ones `datasets` extracted itself
    folders = DatasetFolders(_datasets().config.HF_DATASETS_CACHE if source.startswith("hf:")
                             else Path(source) if Path(source).is_dir() else Path(source).parent)
    images = cache_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for split_name, d in _load(source, split, config, cache_dir / "arrow").items():
        image_col, caption_col = _pick_columns(source, d, image_column, caption_column)
        d = d.select_columns([image_col, caption_col]).cast_column(
            image_col, _datasets().Image(decode=False))  # raw bytes: no decode + re-encode
        record_split = None if split_name == "unsplit" else SPLIT_ALIASES.get(
            split_name.lower(), split_name)
        for i, row in enumerate(d):
            where = f"{source}[{split_name}]:row {i}"
            raw = row[caption_col]
            raw = [raw] if isinstance(raw, str) or raw is None else list(raw)
            captions = []
            for caption in raw:
                caption = "" if caption is None else str(caption).strip()
                if not caption:
                    recorder.bad("empty caption", where, f"empty caption in {caption_col!r}")
                elif caption in captions:
                    recorder.bad("duplicate row", where, f"duplicate caption {caption!r}")
                else:
                    captions.append(caption)
            if not raw:
                recorder.bad("no captions", where, f"no captions in {caption_col!r}")
            if not captions:
                continue
            path = _write_image(row[image_col], images / f"{split_name}-{i:06d}", where,
                                recorder, folders)
            if path is not None:
                records.append(Record(path.resolve(), captions, record_split, i,
                                      {"hf_split": split_name, "hf_index": i}))
    if not records:
        raise DataError(f"{source}: no usable rows")
    text = json.dumps({"key": key, "issues": recorder.issues, "records": [
        {"image": str(r.image), "captions": r.captions, "split": r.split, "line": r.line,
         "extra": r.extra} for r in records]})
    atomic_write(manifest, lambda tmp: tmp.write_text(text))  # written last: a crash leaves no manifest
    return records


def is_hf(path: str | Path) -> bool:
    """Whether `path` names a Hugging Face dataset: `hf:NAME`, a .parquet file, or a folder holding a
    `save_to_disk` dataset or parquet files (in it or in data/)."""
    if str(path).startswith("hf:"):
        return True
    path = Path(path)
    if path.is_file():
        return path.suffix == ".parquet"
    return path.is_dir() and (path.suffix == ".parquet" or (path / "dataset_info.json").is_file()
                              or (path / "dataset_dict.json").is_file() or any(path.glob("*.parquet"))
                              or any(path.glob("data/*.parquet")))


HF = Source("hf", HF_LAYOUT, is_hf, read_hf, options=("image_column", "caption_column"))  # registered by sources.py
