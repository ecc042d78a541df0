"""An embedding folder: a gallery's image embeddings in shards, with their metadata (the
clip-retrieval layout), read without holding it in memory. `embed/format.py` writes it; this
reads a folder in the layout whose embed.json vouches for its parts (clip-retrieval's own output
has none: `embed_format.vouch` records a part's files).

    EMB/img_emb/img_emb_{i}.npy          float16 (rows, D), L2-normalised rows
    EMB/metadata/metadata_{i}.parquet    the same rows: image_path (a path or URL), caption, key
    EMB/embed.json                       {"version": 2, "dim": D, "checkpoint": ..., "model": sha256
                                          of its model.safetensors, "shards": n, "complete": bool,
                                          "parts": [{"rows", "files": {name: {"bytes", "sha256"}}}], ...}

Shards are ordered by the number at the end of their names (however it is padded); row r of the
gallery is row r - start of the shard that holds it. Opening checks each shard against the part
embed.json lists for it (rows, sizes and sha256 of both files: a part swapped for another of the
same length is refused), before anything is built from it. Shards are read memory-mapped, one at
a time, so reading 10M rows never holds more than one chunk as float32; a row that is not finite
(NaN or inf) is an error naming its shard and row.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clip_foundation.embed.format import COLUMNS, INFO, VERSION as EMBED_VERSION, parquet  # the writer's side of the format
from clip_foundation.common.files import changed_file
from clip_foundation.data.records import DataError


@dataclass
class Shard:
    embeddings: Path  # img_emb/img_emb_{i}.npy
    metadata: Path  # metadata/metadata_{i}.parquet
    start: int  # gallery row of its first row
    rows: int


@dataclass
class EmbeddingFolder:
    folder: Path
    info: dict  # embed.json
    shards: list[Shard]
    dim: int
    rows: int = field(init=False)

    def __post_init__(self):
        self.rows = sum(s.rows for s in self.shards)

    @classmethod
    def open(cls, folder) -> "EmbeddingFolder":
        """Check the folder (embed.json complete, shards paired, float16 of its dim, each the part
        embed.json lists: rows, metadata columns, sizes and sha256) -> its shards; DataError, one
        line naming the file, for anything else. Reads every shard once (the digests)."""
        folder = Path(folder)
        info_file = folder / INFO
        try:
            info = json.loads(info_file.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{info_file}: missing or unreadable ({getattr(e, 'strerror', None) or e}); "
                            "an embedding folder has embed.json, img_emb/ and metadata/") from None
        if not isinstance(info, dict) or info.get("version") != EMBED_VERSION or not isinstance(info.get("dim"), int):
            raise DataError(f"{info_file}: not an embedding folder description of version {EMBED_VERSION} with a dim")
        if info.get("complete") is not True:
            raise DataError(f"{folder} is incomplete (embed.json says complete: {info.get('complete')}): "
                            "finish embedding it first")
        embeddings, metadata = _numbered(folder / "img_emb", ".npy"), _numbered(folder / "metadata", ".parquet")
        if not embeddings:
            raise DataError(f"{folder / 'img_emb'}: no .npy shards")
        if embeddings.keys() != metadata.keys():
            odd = sorted(embeddings.keys() ^ metadata.keys())[0]
            raise DataError(f"{folder}: shard {odd} has embeddings or metadata but not both")
        if info.get("shards") not in (None, len(embeddings)):
            raise DataError(f"{info_file} lists {info['shards']} shards; {len(embeddings)} are in {folder}")
        parts = info.get("parts")
        if not isinstance(parts, list) or len(parts) != len(embeddings):
            raise DataError(f"{info_file} lists {len(parts) if isinstance(parts, list) else 'no'} parts for the "
                            f"{len(embeddings)} shards in {folder}: embed the folder again "
                            "(python -m clip_foundation.embed), which records each part's files")
        shards, start = [], 0
        for number, part in zip(sorted(embeddings), parts):
            shard = Shard(embeddings[number], metadata[number], start, _shard_rows(embeddings[number], info["dim"]))
            _check_part(folder, shard, part, info_file)
            shards.append(shard)
            start += shard.rows
        return cls(folder, info, shards, info["dim"])

    def chunks(self, chunk: int):
        """(first row, float32 (c, D) array) over the whole gallery in order, `chunk` rows at a time."""
        for shard in self.shards:
            array = np.load(shard.embeddings, mmap_mode="r")  # unmapped when dropped, after its shard
            for s in range(0, shard.rows, chunk):
                rows = np.asarray(array[s:s + chunk], dtype=np.float32)
                yield shard.start + s, _finite(rows, shard, range(s, s + len(rows)))
            del array

    def take(self, rows) -> np.ndarray:
        """The gallery rows `rows` (any order) as float32 (len(rows), D)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for shard in self.shards:
            mine = np.nonzero((rows >= shard.start) & (rows < shard.start + shard.rows))[0]
            if len(mine):
                array = np.load(shard.embeddings, mmap_mode="r")
                order = np.argsort(rows[mine])  # reading in file order
                wanted = rows[mine][order] - shard.start
                out[mine[order]] = _finite(np.asarray(array[wanted], dtype=np.float32), shard, wanted)
                del array
        return out

    def metadata_tables(self):
        """Each shard's metadata as a pyarrow Table of COLUMNS (strings; caption and key "" when
        absent); `open` checked its rows and its image_path column."""
        pq = parquet()  # ImportError naming the extra when pyarrow is missing
        import pyarrow as pa
        import pyarrow.compute as pc
        for shard in self.shards:
            try:
                table = pq.read_table(shard.metadata)
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{shard.metadata}: unreadable ({e})") from None
            columns = [pc.fill_null(table[c].cast(pa.string()), "") if c in table.column_names
                       else pa.array([""] * len(table), pa.string()) for c in COLUMNS]
            yield pa.table(columns, names=list(COLUMNS))


def _numbered(folder: Path, suffix: str) -> dict[int, Path]:
    # {trailing number: file}: img_emb_000012.npy and img_emb_12.npy are both shard 12
    found = {}
    for path in folder.glob(f"*{suffix}") if folder.is_dir() else ():
        m = re.search(r"(\d+)$", path.name[:-len(suffix)])
        if m is None:
            continue
        if int(m.group(1)) in found:
            raise DataError(f"{folder}: two files for shard {int(m.group(1))} "
                            f"({found[int(m.group(1))].name}, {path.name})")
        found[int(m.group(1))] = path
    return found


def _check_part(folder: Path, shard: Shard, part, info_file: Path) -> None:
    # the shard is the part embed.json lists for it, as written: the cheap checks first (rows,
    # columns, from the parquet footer), then every byte (a swapped part of the same length)
    try:
        meta = parquet().read_metadata(shard.metadata)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{shard.metadata}: unreadable ({e})") from None
    if "image_path" not in meta.schema.names:
        raise DataError(f"{shard.metadata}: no image_path column (it has {', '.join(meta.schema.names)})")
    if meta.num_rows != shard.rows:
        raise DataError(f"{shard.metadata}: {meta.num_rows} rows for the {shard.rows} of {shard.embeddings.name}")
    names = {p.relative_to(folder).as_posix() for p in (shard.embeddings, shard.metadata)}
    files = part.get("files") if isinstance(part, dict) else None
    if not isinstance(files, dict) or set(files) != names or part.get("rows") != shard.rows:
        raise DataError(f"{info_file}: its part for {shard.embeddings.name} lists other files or rows; "
                        "embed the folder again")
    if changed := changed_file(folder, files):
        raise DataError(f"{folder / changed}: differs from the file {info_file.name} recorded when it was "
                        "embedded (changed, swapped or damaged since): embed the folder again")


def _finite(rows: np.ndarray, shard: Shard, numbers) -> np.ndarray:
    # rows (c, D) float32 of `shard`, its rows `numbers`: NaN or inf would be indexed as the best
    # (or an arbitrary) match of every query, or stop FAISS's training with a traceback
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        first = int(np.asarray(numbers)[np.argmax(bad)])
        raise DataError(f"{shard.embeddings}: row {first} is not finite (NaN or inf): the part was damaged, "
                        "or embedded by a model that outputs NaN; embed it again")
    return rows


def _shard_rows(path: Path, dim: int) -> int:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a .npy array ({e})") from None
    if array.ndim != 2 or array.shape[1] != dim or array.dtype != np.float16:
        raise DataError(f"{path}: {array.dtype} {array.shape}, expected float16 (rows, {dim})")
    return array.shape[0]
