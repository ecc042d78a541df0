"""Query latency of exact top-k vs FAISS (flat and IVF), and IVF recall, on a random gallery.

    python benchmarks/search_latency.py --rows 100000 --dim 256 [--queries 200] [--json OUT]

The gallery is `--rows` unit vectors around `--clusters` random centres (noise of norm
`--spread`; the shape of real embedding galleries), stored float16 like search.py's index. Queries are fresh points around
the same centres. Reports build time, ms per single query and per batch of 64 queries, and
IVF recall@10 against exact search (as measured at build time and on the fresh queries).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_foundation.index import (GalleryIndex, build_faiss, exact_topk, faiss_module,  # noqa: E402
                                   recall_at_k)


def clustered(n: int, dim: int, clusters: int, spread: float, seed: int) -> torch.Tensor:
    centres = F.normalize(torch.randn(clusters, dim, generator=torch.Generator().manual_seed(123)), dim=1)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, dim, generator=g) * (spread / dim ** 0.5)  # (n, dim), norm ~ spread
    return F.normalize(centres[torch.randint(clusters, (n,), generator=g)] + noise, dim=1)


def ms_per_query(index: GalleryIndex, queries: torch.Tensor, backend: str, batch: int, k: int = 10) -> float:
    index.search(queries[:batch], k, backend)  # warm-up (the exact path makes its float32 copy)
    start, done = time.perf_counter(), 0
    for s in range(0, len(queries), batch):
        index.search(queries[s:s + batch], k, backend)
        done += len(queries[s:s + batch])
    return 1000 * (time.perf_counter() - start) / done


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.7, help="noise norm around each centre (1 = as far as the centre)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    gallery = clustered(args.rows, args.dim, args.clusters, args.spread, seed=0)
    queries = clustered(args.queries, args.dim, args.clusters, args.spread, seed=1)
    index = GalleryIndex(gallery.half(), [""] * args.rows, "")
    result = {"rows": args.rows, "dim": args.dim, "threads": torch.get_num_threads()}
    rows = [("exact (torch)", "exact", None)]
    if faiss_module() is None:
        print("faiss not installed: exact search only (pip install faiss-cpu)")
    else:
        rows += [("faiss IndexFlatIP", "faiss", "flat"), ("faiss IndexIVFFlat", "faiss", "ivf")]
    _, truth = exact_topk(queries, gallery, 10)
    print(f"{args.rows} rows x {args.dim}, {args.queries} queries, {torch.get_num_threads()} threads")
    print(f"{'search':20}{'build s':>9}{'ms/query':>10}{'ms/query (x64)':>16}{'recall@10':>11}")
    for name, backend, kind in rows:
        start = time.perf_counter()
        info = {}
        if kind:
            index.faiss_index, info = build_faiss(index.embeddings, kind, verbose=False)
        build = time.perf_counter() - start
        one, batched = (ms_per_query(index, queries, backend, b) for b in (1, 64))
        recall = recall_at_k(index.search(queries, 10, backend)[1], truth, 10)
        result[name] = {"build_s": round(build, 2), "ms_per_query": round(one, 3),
                        "ms_per_query_batch64": round(batched, 3), "recall@10": round(recall, 4),
                        **{k: v for k, v in info.items() if k in ("nlist", "nprobe", "recall@10")}}
        extra = f"  (nlist {info['nlist']}, nprobe {info['nprobe']}, build-time recall " \
                f"{info['recall@10']:.3f})" if "nlist" in info else ""
        print(f"{name:20}{build:9.2f}{one:10.3f}{batched:16.3f}{recall:11.3f}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
