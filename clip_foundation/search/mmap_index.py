"""A gallery of millions: a FAISS index built from an embedding folder under a memory budget,
saved as a folder, and searched memory-mapped.

    python search.py --build_index --embeddings=EMB --index=DIR --max_index_memory=2G
    python search.py "a dog on a beach" --index=DIR

The folder holds

    index.faiss      the FAISS index `budget.choose_index` picked for the budget (never larger)
    metadata.arrow   image_path, caption, key of each row (Arrow IPC, read memory-mapped by row)
    index.json       written last: rows, dim, checkpoint and model (from embed.json), the factory
                     string, the search parameters chosen, the recall@10 measured with them, the
                     budget, the estimate and each file's size and sha256 (checked on every open)

A folder that holds anything else is refused before anything is written: only a new or empty one,
or an index built there, is (re)written. The old index stays whole until the new one is built;
index.json is then replaced by a placeholder marking a build under way, which opening refuses.

The build reads the embedding shards memory-mapped (`embfolder`), trains on a random sample,
adds the rows in chunks, and meanwhile keeps the exact top-k of RECALL_QUERIES gallery rows
(each query's own row is left out of both lists). It then tries search parameters (nprobe,
and for a refined index k_factor_rf, the candidates re-ranked per result) from cheap to
costly, and keeps the fastest whose recall@10 reaches TARGET_RECALL (or, where the index
cannot, comes within RECALL_SLACK of the best it reached).
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clipModel import ConfigError

from clip_foundation.search.budget import choose_index, format_size
from clip_foundation.embed.folder import EmbeddingFolder
from clip_foundation.common.files import atomic_write, folder_to_write, unlisted
from clip_foundation.search.index import (MIN_POINTS_PER_CELL, TARGET_RECALL, TRAIN_PER_CELL, BadIndexError, RunningTopK,
                                          faiss_module, recall_at_k)
from clip_foundation.common.files import changed_file, file_entries
from clip_foundation.data.records import DataError

BIG_VERSION = 1  # bump when the folder's format changes
INDEX_FILE, METADATA_FILE, INFO_FILE = "index.faiss", "metadata.arrow", "index.json"
OWNER = {"version": BIG_VERSION, "kind": "images"}  # what index.json begins with: the folder is an index's
RECALL_QUERIES, RECALL_K = 300, 10  # gallery rows whose neighbours measure recall at build time
RECALL_SLACK = 0.005  # an index that cannot reach TARGET_RECALL gets the fastest setting this close to its best (0.01 kept IVF-SQ6 at 10M one nprobe short: 0.897)
TIMED_QUERIES = 30  # single queries timed per setting (1 thread), to rank settings that reach the recall
ADD_CHUNK = 131_072  # rows made float32 and added at once (128 MB at 256-d)
MIN_TRAIN = 16 * 256  # training rows at least: 16 PQ centroids per sub-quantizer, 256 points each
MAX_TRAIN = 131_072  # k-means rows at most (TRAIN_PER_CELL a list until then), unless lists need 39 each
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)  # inverted lists probed, tried in this order
K_FACTORS = (8, 16, 32, 64, 128, 256)  # refine: candidates per result re-ranked on the finer codes
SETTING = re.compile(r"(nprobe|k_factor_rf)=([1-9][0-9]*)")  # one search parameter `tune` sets
REBUILD = "rebuild it: python search.py --build_index --embeddings=EMB --index={folder}"


# ---------------------------------------------------------------- building

def build_big_index(embeddings, out, budget: int, budget_text: str | None = None, *,
                    queries: int = RECALL_QUERIES, seed: int = 0, progress: bool = True) -> "BigIndex":
    """Index the embedding folder `embeddings` into the folder `out` within `budget` bytes ->
    the index, opened. ConfigError (one line) for a budget no index fits; DataError for a
    folder that is not a complete embedding folder."""
    faiss = faiss_module(required=True)
    out = Path(out)
    _check_own(out)  # before anything is read: nothing of the user's is overwritten
    emb = EmbeddingFolder.open(embeddings)
    plan = choose_index(emb.rows, emb.dim, budget, budget_text)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    say(f"{emb.rows:,} rows x {emb.dim} -> {plan.factory} (about {format_size(plan.estimate)}, "
        f"budget {format_size(budget)})")
    start, rng = time.perf_counter(), np.random.default_rng(seed)
    query_rows = np.sort(rng.choice(emb.rows, min(queries, emb.rows), replace=False))
    index = faiss.index_factory(emb.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        wanted = max(MIN_TRAIN, min(TRAIN_PER_CELL * plan.nlist, MAX_TRAIN), MIN_POINTS_PER_CELL * plan.nlist)
        sample = rng.choice(emb.rows, min(emb.rows, wanted), replace=False)
        index.train(emb.take(np.sort(sample)))
        say(f"trained on {len(sample):,} rows in {time.perf_counter() - start:.0f} s")
    exact = RunningTopK(torch.from_numpy(emb.take(query_rows)), RECALL_K + 1)  # + 1: the query's own row
    for i, (first, x) in enumerate(emb.chunks(ADD_CHUNK)):
        index.add(x)
        exact.add(torch.from_numpy(x), first)
        if i % 8 == 7:
            say(f"  {first + len(x):,} / {emb.rows:,} rows added ({time.perf_counter() - start:.0f} s)")
    setting, recall, tried = tune(index, plan.kind, plan.nlist, emb.take(query_rows), exact.indices, query_rows)
    built_s = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    # first: a half-replaced index never reads as complete, and the folder stays this build's
    atomic_write(out / INFO_FILE, lambda tmp: tmp.write_text(json.dumps({**OWNER, "building": True})))
    atomic_write(out / INDEX_FILE, lambda tmp, built=index: faiss.write_index(built, str(tmp)))  # before the del below
    size = (out / INDEX_FILE).stat().st_size
    if size > budget:  # the estimates are upper bounds: this would be a bug in them, never a silent overrun
        (out / INDEX_FILE).unlink()
        raise ConfigError(f"--max_index_memory={budget_text or format_size(budget)}: the index came to "
                          f"{format_size(size)}; give at least that")
    del index
    _write_metadata(emb, out / METADATA_FILE)
    info = {**OWNER, "rows": emb.rows, "dim": emb.dim,
            "checkpoint": emb.info.get("checkpoint"), "model": emb.info.get("model"),
            "embeddings": str(Path(embeddings).resolve()),
            "faiss": {"type": plan.factory, "choice": plan.kind, **search_numbers(setting), "search": setting,
                      f"recall@{RECALL_K}": round(recall, 4), "recall_queries": len(query_rows),
                      "recall_query_source": "gallery rows, each query's own row left out"},
            "budget": {"max_index_memory": budget, "estimate": plan.estimate, "file_size": size},
            "build_s": round(built_s, 1), "tried": tried, "recall_rows": query_rows.tolist(),
            "files": file_entries(out, (INDEX_FILE, METADATA_FILE), stamped=True)}
    atomic_write(out / INFO_FILE, lambda tmp: tmp.write_text(json.dumps(info, indent=1)))
    say(f"{plan.factory}: {format_size(size)} (budget {format_size(budget)}), search {setting or 'exact'}: "
        f"recall@{RECALL_K} {recall:.3f} on {len(query_rows)} gallery rows; built in {built_s:.0f} s")
    return BigIndex.open(out)


def tune(index, kind: str, nlist: int, queries: np.ndarray, exact: torch.Tensor, self_rows,
         k: int = RECALL_K) -> tuple[str, float, list]:
    """Try search settings from cheap to costly on `queries` (gallery rows `self_rows`, whose
    exact top k + 1 are `exact`) -> (the chosen setting, its recall@k, every [setting, recall,
    ms a query] tried). The fastest setting reaching TARGET_RECALL wins; failing that, the
    fastest within RECALL_SLACK of the best recall reached."""
    faiss = faiss_module(required=True)
    space, threads, tried = faiss.ParameterSpace(), faiss.omp_get_max_threads(), []

    def measure(setting: str) -> float:
        space.set_index_parameters(index, setting)
        found = torch.from_numpy(index.search(queries, k + 1)[1])
        recall = recall_at_k(found, exact, k, self_rows)
        start, timed = time.perf_counter(), min(TIMED_QUERIES, len(queries))
        for i in range(timed):  # one at a time, as a page asks
            index.search(queries[i:i + 1], k)
        tried.append([setting, round(recall, 4), round(1000 * (time.perf_counter() - start) / timed, 3)])
        return recall

    faiss.omp_set_num_threads(1)
    try:
        if kind == "exact":
            measure("")
        extra = 1  # once the target is reached, one more nprobe: fewer candidates there may be faster
        for nprobe in sorted({min(p, nlist) for p in NPROBES}) if nlist else []:
            best = max((r for _, r, _ in tried), default=0.0)
            factors = [f",k_factor_rf={f}" for f in K_FACTORS] if kind.endswith("+refine") else [""]
            for factor in factors:
                reached = measure(f"nprobe={nprobe}{factor}")
                if reached >= TARGET_RECALL:
                    break  # more candidates cost more and cannot do better than reached
            top = max(r for _, r, _ in tried)
            extra -= top >= TARGET_RECALL
            if extra < 0 or top < best + 0.002:
                break  # more lists probed no longer pays
    finally:
        faiss.omp_set_num_threads(threads)
    target = min(TARGET_RECALL, max(r for _, r, _ in tried) - RECALL_SLACK)
    setting, recall, _ = min((t for t in tried if t[1] >= target), key=lambda t: t[2])
    return setting, recall, tried


def search_numbers(setting) -> dict | None:
    """A search setting as `tune` writes it, "nprobe=4,k_factor_rf=128" -> {"nprobe": 4,
    "k_factor_rf": 128} ("" -> {}); None for anything else (what index.json may hold)."""
    if not isinstance(setting, str):
        return None
    found = [SETTING.fullmatch(p) for p in setting.split(",")] if setting else []
    return {m[1]: int(m[2]) for m in found} if all(found) else None


def _check_own(out: Path) -> None:
    # `out` is new, empty, or an index built there (its files, and their temporary names): the
    # build overwrites nothing it did not write (as the shard converter)
    if not folder_to_write(out, "index").is_dir():
        return
    try:
        ours = bool(read_info(out))
    except BadIndexError:
        ours = False
    foreign = unlisted(out, {INFO_FILE, INDEX_FILE, METADATA_FILE} if ours else ())
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise DataError(f"{out}: holds {foreign[0].name}{more}, which the index build did not write: give a "
                        "new or empty folder as --index")


def _write_metadata(emb: EmbeddingFolder, path: Path) -> None:
    import pyarrow as pa
    from clip_foundation.embed.folder import COLUMNS

    def write(tmp):
        schema = pa.schema([(c, pa.string()) for c in COLUMNS])
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for table in emb.metadata_tables():  # one shard's at a time
                writer.write_table(table)
    atomic_write(path, write)


# ---------------------------------------------------------------- serving

class Column:
    """One metadata column as a read-only sequence (`paths[i]`), read from the memory-mapped
    record batches row by row: nothing is turned into Python strings until asked for."""

    def __init__(self, index: "BigIndex", name: str):
        self.index, self.name = index, name

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> str:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.index.rows([i % len(self)])[0][self.name]


@dataclass
class BigIndex:
    """A folder written by `build_big_index`, opened: the FAISS index (memory-mapped where FAISS
    can) and the metadata table (memory-mapped): an `Index` (kinds.py), as GalleryIndex is."""
    folder: Path
    faiss_index: object
    table: object  # pyarrow.Table over metadata.arrow
    meta: dict  # index.json
    captions: None = None  # an image index: its rows are images, not captions
    _mapped: object = field(default=None, repr=False)  # the memory map the table lives in
    _batches: list = field(default_factory=list, repr=False)  # the table's record batches (zero-copy)
    _starts: np.ndarray = field(default=None, repr=False)  # the gallery row of each batch's first row

    @classmethod
    def open(cls, folder, verify: bool = False) -> "BigIndex":
        """Open the index folder `folder`; with `verify` each file's sha256 is checked too (a
        read of the whole index), else its size. BadIndexError, one line, for a missing,
        incomplete, damaged or tampered folder."""
        import pyarrow as pa
        faiss, folder = faiss_module(required=True), Path(folder)
        meta = read_info(folder)
        _check_info(meta, folder)
        if changed := changed_file(folder, meta["files"], verify):
            raise BadIndexError(f"{folder / changed}: missing, or its contents differ from those recorded in "
                                f"{INFO_FILE} when it was built; {REBUILD.format(folder=folder)}")
        try:
            index = faiss.read_index(str(folder / INDEX_FILE), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
            mapped = pa.memory_map(str(folder / METADATA_FILE))
            table = pa.ipc.open_file(mapped).read_all()  # zero-copy: rows are read from the map when asked for
        except (RuntimeError, pa.ArrowException) as e:
            raise BadIndexError(f"{folder}: unreadable index ({e})") from None
        if index.ntotal != meta["rows"] or len(table) != meta["rows"]:
            raise BadIndexError(f"{folder}: {index.ntotal} indexed rows and {len(table)} metadata rows, "
                                f"not the {meta['rows']} of {INFO_FILE}")
        if meta["faiss"]["search"]:
            faiss.ParameterSpace().set_index_parameters(index, meta["faiss"]["search"])
        batches = table.to_batches()
        starts = np.cumsum([0] + [b.num_rows for b in batches])[:-1]
        return cls(folder, index, table, meta, _mapped=mapped, _batches=batches, _starts=starts)

    def __len__(self) -> int:
        return self.meta["rows"]

    @property
    def paths(self) -> Column:
        """The image path or URL of each row."""
        return Column(self, "image_path")

    def locate(self, row: int) -> tuple[object, int]:
        """Gallery row -> (its record batch, its row in it): a binary search, no copy (a Table's
        own `take` costs tens of ms at 10M rows)."""
        b = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self._batches[b], row - int(self._starts[b])

    def rows(self, indices) -> list[dict]:
        """Metadata {image_path, caption, key} of the gallery rows `indices` (-1: none, skipped)."""
        out = []
        for i in indices:
            if i >= 0:
                batch, row = self.locate(int(i))
                out.append(batch.slice(row, 1).to_pylist()[0])
        return out

    def search(self, queries: torch.Tensor, k: int, backend: str = "auto",
               chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-`k` rows for each of the (Q, D) normalised `queries` -> (scores, indices), (Q, k)
        each, best first (-1: fewer rows found). `backend` "exact" is exact only for a Flat
        index: the others keep compressed rows, not the embeddings."""
        if backend == "exact" and self.meta["faiss"]["choice"] != "exact":
            raise BadIndexError(f"{self.folder} holds compressed rows ({self.meta['faiss']['type']}): "
                                "exact search needs the embeddings; use --backend=auto")
        k = min(k, len(self))
        scores, indices = self.faiss_index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        return torch.from_numpy(scores), torch.from_numpy(indices)

    def prepare(self, backend: str = "auto", folder=None, device=None) -> None:
        """Nothing to ready: the FAISS index is searched on the CPU as opened (memory-mapped)."""

    def mark_missing(self, folder, missing: list[str]) -> None:
        """Nothing is recorded: index.json is the build's own record (search.py names the images
        gone on each search)."""


def read_info(folder) -> dict:
    """`folder`'s index.json, as a build wrote it (version and kind; what else it holds is
    `_check_info`'s); BadIndexError, one line, when it is missing, unreadable or another file."""
    path = Path(folder) / INFO_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadIndexError(f"{path}: missing or unreadable ({getattr(e, 'strerror', None) or e}); build the "
                            f"index with search.py --build_index --embeddings=EMB --index={folder}") from None
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in OWNER.items()):
        raise BadIndexError(f"{path}: not a large-gallery index of format v{BIG_VERSION}")
    return meta


def _check_info(meta: dict, folder: Path) -> None:
    # every value open and search read, of the type the build writes: a tampered or hand-edited
    # index.json is one line naming the key, never a KeyError or a FAISS error
    path = folder / INFO_FILE
    if meta.get("building"):
        raise BadIndexError(f"{path}: its build did not finish; {REBUILD.format(folder=folder)}")
    faiss = meta.get("faiss") if isinstance(meta.get("faiss"), dict) else {}
    rules = {"rows": (lambda v: type(v) is int and v >= 0, "a number of rows"),
             "dim": (lambda v: type(v) is int and v > 0, "a number of dimensions"),
             "files": (lambda v: isinstance(v, dict) and set(v) == {INDEX_FILE, METADATA_FILE},
                       f"the size and sha256 of {INDEX_FILE} and {METADATA_FILE}"),
             "faiss": (lambda v: all(isinstance(faiss.get(k), str) for k in ("type", "choice", "search")),
                       "the index's type, choice and search setting"),
             "faiss.search": (lambda v: search_numbers(v) is not None,
                              "a search setting such as nprobe=16,k_factor_rf=64 (whole numbers >= 1)")}
    for key, (ok, wanted) in rules.items():
        value = faiss.get("search") if key == "faiss.search" else meta.get(key)
        if not ok(value):
            raise BadIndexError(f"{path}: {key} is {value!r}, not {wanted}; {REBUILD.format(folder=folder)}")


def is_big_index(folder) -> bool:
    """Whether `folder` is (or was being written as) a large-gallery index folder."""
    return any((Path(folder) / name).is_file() for name in (INDEX_FILE, INFO_FILE, METADATA_FILE))

