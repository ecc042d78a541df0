"""Gallery embedding index: one row per image (or caption), exact or FAISS top-k, saved as files.

An index is three files sharing a stem, the same whether it is the cache in CHECKPOINT/index/
or a folder written by `python search.py --build-index` (stems `images` and `captions`):

    <stem>.safetensors  {"embeddings": (N, D) float16, L2-normalised}
    <stem>.json         version, kind ("images" | "captions"), identity, checkpoint, model
                        (sha256 of its model.safetensors), paths (the image of each row),
                        captions (caption indexes only), faiss (type, nlist, nprobe, recall),
                        sha256 (of the .safetensors and .faiss files, checked on every load)
    <stem>.faiss        optional: a FAISS inner-product index over the same rows

Each file is written to a temporary name and renamed, the JSON last, so a killed build is never
read. Search is exact by default (matrix product + top-k, see `exact_topk`); with
`faiss` installed a large gallery also gets a FAISS index (`IndexFlatIP`, or `IndexIVFFlat`
whose nprobe is tuned at build time until its recall against exact search is high enough).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clip_foundation.common.files import atomic_write, file_digest
# the definitions a query from the shell checks a cached index by, without torch (quick.py)
from clip_foundation.search.cached import (AUTO_FAISS_MIN_SIZE, INDEX_VERSION, NON_FINITE_SCORES,  # noqa: F401
                                           BadIndexError, check_digest, index_meta)

EXACT_CHUNK = 65_536  # gallery rows scored at once for a batch of 64 queries (16 MB of float32 scores)
SCORE_BUDGET = 64 * EXACT_CHUNK  # scores held at once: fewer queries scan more rows per pass (1 query: 4M)
HALF_MAX_QUERIES = 4  # up to this many queries score a float16 gallery in float16 (memory-bound: ~1.7x
#                       faster on a CPU); more queries are compute-bound, where CPU float16 GEMMs are slow
HALF_MARGIN = 32  # float16 first pass keeps k + this many candidates, re-scored exactly
IVF_MIN_SIZE = AUTO_FAISS_MIN_SIZE  # from here exact search costs ~30 ms a query on 2 CPU cores, IVF ~1 ms
#                                    ("auto" never builds IndexFlatIP: 2x slower than torch's matmul here)
TARGET_RECALL = 0.95  # IVF nprobe is doubled until recall@k vs exact reaches this
RECALL_QUERIES, RECALL_K = 200, 10  # sample used to measure IVF recall at build time
MIN_POINTS_PER_CELL = 39  # FAISS's own minimum of training points per IVF centroid
TRAIN_PER_CELL = 64  # k-means training sample per centroid (FAISS advises 30 to 256)


@dataclass
class GalleryIndex:
    """An `Index` (kinds.py) held in memory: float16 rows, searched exactly or by its FAISS index."""
    embeddings: torch.Tensor  # (N, D) float16, L2-normalised
    paths: list[str]  # the image of each row
    identity: str  # hash of the model weights + gallery; a mismatch means rebuild
    captions: list[str] | None = None  # caption galleries: the text of each row
    meta: dict = field(default_factory=dict)  # kind, checkpoint, model, faiss info
    faiss_index: object = None  # a faiss.Index over the same rows, when built or loaded
    _scoring: torch.Tensor | None = field(default=None, repr=False)  # float32 copy for exact search

    def __len__(self) -> int:
        return len(self.embeddings)

    def search(self, queries: torch.Tensor, k: int, backend: str = "auto",
               chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-`k` rows for each of the (Q, D) normalised `queries` -> (scores, indices), (Q, k)
        each, best first, on the CPU. `backend`: "exact", "faiss" (needs a FAISS index) or
        "auto" (FAISS when this index has one, else exact). `chunk`: see `exact_topk`."""
        k = min(k, len(self))
        if backend == "faiss" and self.faiss_index is None:
            raise BadIndexError("this index has no FAISS index: build it with --backend faiss")
        if backend != "exact" and self.faiss_index is not None:
            return _finite(*faiss_search(self.faiss_index, queries, k))
        if len(queries) <= HALF_MAX_QUERIES:  # a page's or a command's query: the float16 rows as they are
            gallery = self.embeddings
        else:
            if self._scoring is None or self._scoring.device != self.embeddings.device:
                # float32 once for batches: CPU half-precision GEMMs are slow when compute-bound
                self._scoring = self.embeddings.float().contiguous()
            gallery = self._scoring
        scores, indices = exact_topk(queries.to(gallery.device), gallery, k, chunk)
        return _finite(scores.cpu(), indices.cpu())

    def prepare(self, backend: str = "auto", folder=None, device=None) -> None:
        """Ready it for `backend`: its FAISS index when `backend` wants one (`ensure_faiss`: built
        now if missing, and saved beside its files in the prebuilt `folder` when given), and its
        rows on `device` when that is a GPU, where exact search then runs."""
        ensure_faiss(self, backend, folder and Path(folder) / self.meta.get("kind", "images"))
        if device is not None and torch.device(device).type == "cuda":
            self.embeddings = self.embeddings.to(device)

    def mark_missing(self, folder, missing: list[str]) -> None:
        """Record in the prebuilt `folder`'s JSON of this index that these gallery images no
        longer exist (best effort), so later searches warn that the index is stale."""
        path = Path(folder) / f"{self.meta.get('kind', 'images')}.json"
        try:
            meta = json.loads(path.read_text())
            meta["missing"] = sorted(set(meta.get("missing", [])) | set(missing))
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(meta)))
        except (OSError, ValueError):
            pass


def _finite(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # NaN sorts anywhere: a ranking with it is arbitrary, and "NaN" is not JSON. (FAISS pads
    # missing rows, index -1, with -inf or -FLT_MAX: those are left for the caller to drop.)
    if not torch.isfinite(scores[indices >= 0]).all():
        raise BadIndexError(NON_FINITE_SCORES)
    return scores, indices


def exact_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int,
               chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-`k` of (Q, D) `queries` in the (N, D) `gallery` -> (scores,
    indices) (Q, k), float32 scores. One matrix product + top-k per pass of `chunk` rows
    (default: as many as keep Q x rows within SCORE_BUDGET, so one pass for a single query up
    to 4M rows); no (Q, N) matrix beyond that is ever held.

    A float16 `gallery` with at most HALF_MAX_QUERIES queries is scored in float16 (half the
    memory traffic of float32: the whole cost of a single query), keeping the best k +
    HALF_MARGIN rows, which are then re-scored (in float64, rounded to float32) and ranked: the same
    rows as float32 search unless more than HALF_MARGIN rows tie with the k-th within float16
    rounding (~5e-4)."""
    k = min(k, len(gallery))
    half = gallery.dtype == torch.float16 and len(queries) <= HALF_MAX_QUERIES
    pick = min(len(gallery), k + HALF_MARGIN) if half else k
    q = queries.to(torch.float16 if half else torch.float32)
    chunk = chunk or max(EXACT_CHUNK, SCORE_BUDGET // max(1, len(queries)))
    best = None
    for s in range(0, len(gallery), chunk):
        rows = gallery[s:s + chunk]
        scores = q @ (rows if half else rows.float()).T  # (Q, c)
        top = scores.topk(min(pick, scores.shape[1]), dim=1)
        best = merge_topk(best, top.values, top.indices + s, pick)
    if best is None:  # an empty gallery
        return queries.new_empty(len(queries), 0).float(), torch.empty(len(queries), 0, dtype=torch.long)
    best_s, best_i = best
    if not half:
        return best_s, best_i
    # float64: each product of a float16 row and a float32 query is exact and the sum is off by ~1e-13, so
    # rounded to float32 it is the same score in any order of summing (quick.py's numpy's too) unless it
    # falls within that of a rounding boundary
    exact = torch.bmm(gallery[best_i].double(), queries.double()[:, :, None])[:, :, 0]  # (Q, pick)
    keep = exact.topk(k, dim=1)
    return keep.values.float(), best_i.gather(1, keep.indices)


def merge_topk(best, scores: torch.Tensor, indices: torch.Tensor, k: int):
    """A running top-`k` (scores, indices) — None before the first chunk — with a chunk's
    (Q, c) `scores` and their gallery `indices` -> the new running (scores, indices) (Q, <= k)."""
    if best is None:
        return scores, indices
    cand_s = torch.cat([best[0], scores], 1)  # (Q, <= 2k): running best + this chunk's
    cand_i = torch.cat([best[1], indices], 1)
    keep = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
    return keep.values, cand_i.gather(1, keep.indices)


class RunningTopK:
    """The exact top-`k` rows of each of the (Q, D) `queries` over a gallery seen chunk by chunk."""

    def __init__(self, queries: torch.Tensor, k: int):
        self.queries, self.k = queries.float(), k
        self.scores = self.indices = None  # (Q, <= k) each, once a chunk was added

    def add(self, rows: torch.Tensor, first: int) -> None:
        """Score the (c, D) `rows`, gallery rows first .. first + c - 1."""
        scores, found = exact_topk(self.queries, rows.float(), self.k)
        best = None if self.scores is None else (self.scores, self.indices)
        self.scores, self.indices = merge_topk(best, scores, found + first, self.k)


# ---------------------------------------------------------------- FAISS (optional)

def faiss_module(required: bool = False):
    """The `faiss` module, imported lazily; None when not installed (or raise if `required`)."""
    try:
        import faiss
    except ImportError:
        if required:
            raise BadIndexError('--backend faiss needs FAISS: pip install "clip-foundation[faiss]"') from None
        return None
    return faiss


def wants_faiss(backend: str, n: int) -> bool:
    """Whether a gallery of `n` rows gets a FAISS index under `backend`."""
    if backend == "faiss":
        faiss_module(required=True)
        return True
    return backend == "auto" and n >= AUTO_FAISS_MIN_SIZE and faiss_module() is not None


def faiss_search(faiss_index, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores, indices = faiss_index.search(queries.detach().float().cpu().contiguous().numpy(), k)
    return torch.from_numpy(scores), torch.from_numpy(indices)  # IVF may leave -1 (no row) when few cells are probed


def build_faiss(embeddings: torch.Tensor, kind: str = "auto", queries: torch.Tensor | None = None,
                seed: int = 0, verbose: bool = True):
    """A FAISS inner-product index over the (N, D) `embeddings` -> (index, info dict).

    `kind`: "flat" (exact, IndexFlatIP), "ivf" (IndexIVFFlat, nlist ~ 4 sqrt(N)) or "auto"
    (ivf from IVF_MIN_SIZE rows). For IVF, nprobe doubles until recall@RECALL_K against exact
    search reaches TARGET_RECALL on `queries` (default: RECALL_QUERIES random gallery rows,
    each query's own row left out); `info` records nlist, nprobe and the recall measured.
    """
    faiss = faiss_module(required=True)
    x = embeddings.detach().float().cpu().contiguous().numpy()  # (N, D) float32
    n, dim = x.shape
    kind = ("ivf" if n >= IVF_MIN_SIZE else "flat") if kind == "auto" else kind
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        return index, {"type": "IndexFlatIP", "rows": n}
    nlist = max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CELL))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    train_rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:TRAIN_PER_CELL * nlist]
    index.train(x[train_rows.sort().values.numpy()])  # k-means on a sample: minutes saved at 1M rows
    index.add(x)
    gen = torch.Generator().manual_seed(seed)
    self_rows = None
    if queries is None:  # gallery rows as queries; their own row is not a neighbour to find
        self_rows = torch.randperm(n, generator=gen)[:RECALL_QUERIES]
        queries = embeddings[self_rows].float()
    queries = queries[:RECALL_QUERIES].float().cpu()
    k = min(RECALL_K, n - 1)
    extra = int(self_rows is not None)
    _, exact = exact_topk(queries, embeddings.float(), k + extra)
    nprobe, recall = 1, 0.0
    for nprobe in _doubling(min(8, nlist), nlist):
        index.nprobe = nprobe
        _, approx = faiss_search(index, queries, k + extra)
        recall = recall_at_k(approx, exact, k, self_rows)
        if recall >= TARGET_RECALL:
            break
    info = {"type": "IndexIVFFlat", "rows": n, "nlist": nlist, "nprobe": nprobe,
            f"recall@{k}": round(recall, 4), "recall_queries": len(queries),
            "recall_query_source": "gallery rows" if self_rows is not None else "given queries"}
    if verbose:
        print(f"faiss IndexIVFFlat: {n} rows, nlist {nlist}, nprobe {nprobe}: recall@{k} "
              f"{recall:.3f} vs exact on {len(queries)} queries", file=sys.stderr)
    return index, info


def _doubling(start: int, stop: int):
    v = start
    while v < stop:
        yield v
        v *= 2
    yield stop


def recall_at_k(approx: torch.Tensor, exact: torch.Tensor, k: int, self_rows=None) -> float:
    """Mean fraction of each query's exact top-`k` found in its approximate top-`k`
    (with `self_rows`, query q's own gallery row is dropped from both lists first)."""
    found = 0
    for q in range(len(exact)):
        drop = {int(self_rows[q])} if self_rows is not None else set()
        truth = [i for i in exact[q].tolist() if i not in drop][:k]
        got = {i for i in approx[q].tolist() if i not in drop and i >= 0}
        found += len(got.intersection(truth)) / max(1, len(truth))
    return found / max(1, len(exact))


def ensure_faiss(index: GalleryIndex, backend: str, stem=None, queries=None,
                 verbose: bool = True) -> GalleryIndex:
    """Give `index` the FAISS index `backend` asks for (built now if missing; saved beside
    `stem` when given). `queries`: None or a callable -> (Q, D) recall queries."""
    if index.faiss_index is not None or not wants_faiss(backend, len(index)):
        return index
    index.faiss_index, index.meta["faiss"] = build_faiss(
        index.embeddings, queries=queries() if queries else None, verbose=verbose)
    if stem is not None:
        faiss = faiss_module(required=True)
        stem = Path(stem)
        atomic_write(stem.with_suffix(".faiss"), lambda tmp: faiss.write_index(index.faiss_index, str(tmp)))
        _write_meta(index, stem)
    return index


# ---------------------------------------------------------------- files

def _write_meta(index: GalleryIndex, stem: Path) -> None:
    # last, once the other files are in place: their digests are checked on every load
    files = [stem.with_suffix(".safetensors")] + [stem.with_suffix(".faiss")] * (index.faiss_index is not None)
    meta = {"version": INDEX_VERSION, **index.meta, "identity": index.identity,
            "rows": len(index), "dim": index.embeddings.shape[1], "paths": index.paths,
            "sha256": {f.suffix[1:]: file_digest(f) for f in files}}
    if index.captions is not None:
        meta["captions"] = index.captions
    atomic_write(stem.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta)))


def save_index(index: GalleryIndex, stem) -> Path:
    """Write `index` as <stem>.safetensors (+ <stem>.faiss) + <stem>.json (last)."""
    from safetensors.torch import save_file
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").unlink(missing_ok=True)  # first: a half-replaced index never reads as complete
    emb = index.embeddings.half().cpu().contiguous()
    atomic_write(stem.with_suffix(".safetensors"), lambda tmp: save_file({"embeddings": emb}, str(tmp)))
    faiss_file = stem.with_suffix(".faiss")
    if index.faiss_index is not None:
        faiss = faiss_module(required=True)
        atomic_write(faiss_file, lambda tmp: faiss.write_index(index.faiss_index, str(tmp)))
    else:
        faiss_file.unlink(missing_ok=True)
        index.meta.pop("faiss", None)
    _write_meta(index, stem)
    return stem


def load_index(stem, identity: str | None = None, strict: bool = False) -> GalleryIndex | None:
    """The index saved at `stem`; None when incomplete, unreadable, damaged or (given `identity`)
    stale, so that a cache is rebuilt. Its FAISS index is loaded too when it was saved and faiss
    is installed; a damaged .faiss alone is dropped (exact search still works, `ensure_faiss`
    rebuilds it). With `strict` (a prebuilt index, whose images may not be at hand to embed
    again) each of these is a BadIndexError naming the file and the fault instead.

    A file whose sha256 differs from the one <stem>.json recorded when it was written (truncated,
    overwritten, edited: a file that still parses can hold other vectors) counts as damaged."""
    try:
        index = _read_rows(Path(stem), identity)
    except BadIndexError:
        if strict:
            raise
        return None
    try:
        index.faiss_index = _read_faiss(Path(stem), index)
    except BadIndexError:
        if strict:
            raise
        index.faiss_index = None
    if index.faiss_index is None:
        index.meta.pop("faiss", None)  # describes no index at hand
    index.meta.pop("sha256", None)
    return index


def _read_rows(stem: Path, identity: str | None) -> GalleryIndex:
    # <stem>.json and <stem>.safetensors -> the index (no FAISS), or BadIndexError naming the fault
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    meta_file, rows_file = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    meta = index_meta(stem, identity)  # its version, identity and rows' sha256
    try:
        embeddings = load_file(rows_file)["embeddings"]
        index = GalleryIndex(embeddings, meta.pop("paths"), meta.pop("identity"), meta.pop("captions", None))
    except (KeyError, TypeError, SafetensorError) as e:
        raise BadIndexError(f"{rows_file}: incomplete index ({e})") from None
    if len(embeddings) != len(index.paths):
        raise BadIndexError(f"{rows_file}: {len(embeddings)} rows for the {len(index.paths)} paths in {meta_file}")
    for key in ("version", "rows", "dim"):
        meta.pop(key, None)
    index.meta = meta
    return index


def _read_faiss(stem: Path, index: GalleryIndex):
    # <stem>.faiss -> its FAISS index (None when none was saved or faiss is not installed)
    if "faiss" not in index.meta or (faiss := faiss_module()) is None:  # faiss imported only for a saved one
        return None
    faiss_file = stem.with_suffix(".faiss")
    check_digest(faiss_file, index.meta, stem.with_suffix(".json"))
    try:
        faiss_index = faiss.read_index(str(faiss_file))
    except RuntimeError as e:
        raise BadIndexError(f"{faiss_file}: unreadable ({e})") from None
    if faiss_index.ntotal != len(index):
        raise BadIndexError(f"{faiss_file}: {faiss_index.ntotal} rows, not the index's {len(index)}")
    if "nprobe" in index.meta["faiss"]:
        faiss_index.nprobe = index.meta["faiss"]["nprobe"]
    return faiss_index

