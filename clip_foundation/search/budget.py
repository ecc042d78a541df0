"""Which FAISS index a gallery of N embeddings of D dimensions gets under a memory budget.

The choice follows autofaiss's (`get_optimal_index_keys_v2`): estimate each index type's size
from N and D, and take the most accurate one that fits. Best first:

    Flat                                   exact search, N x D float32 (galleries under 200,000)
    IVF<4 sqrt N>,Flat                     inverted lists of float32 rows (from 200,000)
    IVF<sqrt N / 3>,PQ<D/4>x4fs,Refine(SQfp16)   4-bit fast-scan PQ codes pick candidates, re-ranked
    IVF<sqrt N / 3>,PQ<D/8>x4fs,Refine(SQ8)      on rows stored as float16 (2 B a dimension) or 8-bit
    IVF<sqrt N>,SQ6 / SQ4                  inverted lists of 6- or 4-bit scalar-quantised rows
    IVF<sqrt N / 3>,PQ<M>x4fs              the PQ codes alone (M = D/4, D/8, D/16): the smallest, least accurate

Unlike autofaiss, no HNSW (its graph is not memory-mappable and slow to build on few cores) and
no OPQ; the compressed recipe is the one `benchmarks/search_latency.py --ann` measured at 10M
rows (few large lists: fast-scan codes are cheap to scan, and fewer lists hold recall up).
Sizes count what `faiss.write_index` writes, so the index file, and the memory it takes when
loaded, stays within the budget (the build checks the file it wrote too).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from clipModel import check

from clip_foundation.search.index import IVF_MIN_SIZE, MIN_POINTS_PER_CELL

UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
SIZE = re.compile(r"(\d+(?:\.\d+)?)([KMGT]?)", re.IGNORECASE)
SIZE_RULE = "a size like 2G, 500M or 64K (K/M/G/T = 2^10/2^20/2^30/2^40 bytes), or auto"
ID_BYTES = 8  # each inverted-list entry stores its row number as int64
BLOCK = 32  # fast-scan codes are stored in blocks of 32 rows: a list wastes up to 31 rows' codes
HEADER_BYTES = 64 * 2**10  # headers, list sizes, quantizer tables: counted once, generously
REFINED = (("SQfp16", 16, 4), ("SQ8", 8, 8))  # (refine codec, its bits a dimension, PQ sub-vector size)
SQ_BITS = (6, 4)  # IVF scalar-quantised rows, most accurate first
PQ_SHARES = (4, 8, 16)  # PQ sub-vectors of 4, 8, 16 dimensions (4 bits each): 1, 1/2, 1/4 bit a dimension
MIN_COMPRESSED_ROWS = 1000  # fewer rows cannot train 16 PQ centroids per sub-quantizer (FAISS wants 39 x 16)


@dataclass(frozen=True)
class IndexPlan:
    factory: str  # faiss.index_factory string, e.g. "IVF1054,PQ64x4fs,Refine(SQfp16)"
    kind: str  # exact | ivf-flat | ivf-pq+refine | ivf-sq | ivf-pq: what it is (a refine step is tuned too)
    nlist: int  # inverted lists (0 for flat)
    estimate: int  # bytes of the written index, an upper bound


def parse_size(text: str, key: str = "max_index_memory") -> int:
    """"2G" -> 2147483648 (K/M/G/T are powers of 1024; a bare number is bytes; "auto" is half
    this machine's memory); ConfigError `--key=text: must be ...` for anything else."""
    if text == "auto":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    m = SIZE.fullmatch(text or "")
    check(m is not None, key, text, SIZE_RULE)
    size = int(float(m.group(1)) * UNITS[m.group(2).upper()])
    check(size > 0, key, text, "more than 0 bytes")
    return size


def format_size(size: float, up: bool = False) -> str:
    """Bytes as a short string: 2147483648 -> "2.0G", 312000 -> "305K"; `up` rounds up, not to the
    nearest (149700 -> "147K", not "146K"), so the figure given back as a size is at least `size`."""
    for unit in ("T", "G", "M", "K"):
        if size >= UNITS[unit]:
            value = size / UNITS[unit]
            digits = 1 if value < 100 else 0
            if up:
                value = math.ceil(value * 10**digits) / 10**digits
            return f"{value:.{digits}f}{unit}"
    return f"{int(size)}B"


def plans(n: int, dim: int) -> list[IndexPlan]:
    """Every index this module builds for `n` rows of `dim`, most accurate (and largest) first."""
    floats, many = n * dim * 4, _nlist(n, 4 * math.sqrt(n))  # many small lists: each scanned row costs
    if n < IVF_MIN_SIZE:
        out = [IndexPlan("Flat", "exact", 0, floats + HEADER_BYTES)]
    else:
        out = [IndexPlan(f"IVF{many},Flat", "ivf-flat", many, floats + _ivf_bytes(n, dim, many))]
    if n < MIN_COMPRESSED_ROWS:
        return out
    few = _nlist(n, math.sqrt(n) / 3)  # few large lists: fast-scan codes are cheap to scan
    some = _nlist(n, math.sqrt(n))  # scalar-quantised rows cost more to scan, lists cost more to train
    for codec, bits, share in REFINED:
        m = pq_subquantizers(dim, share)
        refine = n * math.ceil(dim * bits / 8) + 2 * dim * 4  # codes + the quantizer's ranges
        out.append(IndexPlan(f"IVF{few},PQ{m}x4fs,Refine({codec})", "ivf-pq+refine", few,
                             _fast_scan_bytes(n, dim, few, m) + refine))
    for bits in SQ_BITS:
        out.append(IndexPlan(f"IVF{some},SQ{bits}", "ivf-sq", some,
                             n * math.ceil(dim * bits / 8) + 2 * dim * 4 + _ivf_bytes(n, dim, some)))
    for share in PQ_SHARES:
        m = pq_subquantizers(dim, share)
        out.append(IndexPlan(f"IVF{few},PQ{m}x4fs", "ivf-pq", few, _fast_scan_bytes(n, dim, few, m)))
    return out


def choose_index(n: int, dim: int, budget: int, text: str | None = None) -> IndexPlan:
    """The most accurate plan whose estimate fits `budget` bytes; ConfigError, one line, when
    none does (`text`: the budget as the user wrote it, for the message)."""
    options = plans(n, dim)
    fitting = [p for p in options if p.estimate <= budget]
    smallest = min(options, key=lambda p: p.estimate)
    check(bool(fitting), "max_index_memory", text or format_size(budget),
          f"at least {format_size(smallest.estimate, up=True)} for {n:,} rows x {dim} "
          f"(the smallest index, {smallest.factory})")
    return fitting[0]


def pq_subquantizers(dim: int, share: int) -> int:
    """PQ sub-quantizers for sub-vectors of about `share` dimensions: a divisor of `dim`, even
    (fast-scan packs two 4-bit codes a byte), at least 2."""
    m = max(2, dim // share)
    while m > 2 and (dim % m or m % 2):
        m -= 1
    return m


def _nlist(n: int, wanted: float) -> int:
    return max(1, min(round(wanted), n // MIN_POINTS_PER_CELL))


def _ivf_bytes(n: int, dim: int, nlist: int) -> int:
    return n * ID_BYTES + nlist * dim * 4 + HEADER_BYTES  # row numbers + coarse centroids + headers


def _fast_scan_bytes(n: int, dim: int, nlist: int, m: int) -> int:
    codes = (n + nlist * (BLOCK - 1)) * m // 2  # 4-bit codes, each list padded to whole blocks
    return codes + 16 * dim * 4 + _ivf_bytes(n, dim, nlist)  # + 16 PQ centroids per sub-quantizer
