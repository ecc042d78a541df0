"""A gallery of millions under a memory budget: build time, index size, peak memory, lookup
latency and recall@10 of the index `search.py --build_index --embeddings=EMB` builds.

    python -m benchmarks.index_budget --rows=10000000 --budgets=2G,8G --scratch=/tmp/index_budget

Writes `--rows` synthetic embeddings (`Mixture` from benchmarks/search_latency.py: topics,
uneven clusters, low-rank spread) as an embedding folder in `--scratch` (float16 shards of
`--shard` rows, metadata parquet, embed.json), keeping the exact top-10 of `--queries` fresh
queries as it writes (chunk by chunk, never all rows at once). Then for each budget it runs the
product path, `python search.py --build_index --embeddings=EMB --index=DIR --max_index_memory=B`,
in a child process (wall time, and peak resident memory from `os.wait4`), and opens the index in
another child (`BigIndex.open`, memory-mapped) to time single queries at one thread (p50/p95 of
`BigIndex.search`, then of reading the ten results' metadata) and measure recall@10 against
exact search. The scratch folder is deleted at the end unless `--keep`.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def write_embeddings(folder: Path, rows: int, dim: int, shard: int, queries: torch.Tensor, chunk: int = 250_000):
    """Mixture rows as an embedding folder -> exact top-10 row numbers of `queries` (Q, 10)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.search_latency import Mixture
    from clip_foundation.embed.format import VERSION, embeddings_path, metadata_path, vouch
    from clip_foundation.search.index import RunningTopK
    mix, exact = Mixture(dim), RunningTopK(queries, 10)
    parts = []  # each part's record: the index build checks the files against it
    (folder / "img_emb").mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    start, shards = time.perf_counter(), 0
    for first in range(0, rows, shard):
        n = min(shard, rows - first)
        part = np.concatenate([mix.sample(min(chunk, n - s), seed=first + s).half().numpy()
                               for s in range(0, n, chunk)])  # (n, dim) float16
        exact.add(torch.from_numpy(part), first)  # the rows as the index reads them
        np.save(embeddings_path(folder, shards), part)
        names = [f"{first + i:09d}" for i in range(n)]
        pq.write_table(pa.table({"image_path": [f"images/{k}.jpg" for k in names], "caption": [""] * n,
                                 "key": names}), metadata_path(folder, shards))
        parts.append(vouch(folder, [embeddings_path(folder, shards), metadata_path(folder, shards)], n))
        shards += 1
        print(f"  {first + n:,} rows written ({time.perf_counter() - start:.0f} s)", flush=True)
    (folder / "embed.json").write_text(json.dumps({"version": VERSION, "dim": dim, "checkpoint": "", "model": "",
                                                   "shards": shards, "complete": True, "source": "Mixture",
                                                   "parts": parts}))
    return exact.indices, round(time.perf_counter() - start, 1)


def child(argv: list[str]) -> tuple[float, int, str]:
    """Run a command -> (wall seconds, its peak resident memory in bytes, its stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} exited with {proc.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024, out


def serve(folder: str, truth_file: str) -> dict:
    """In a fresh process: open the index, time single queries (1 thread), recall@10 vs exact."""
    import faiss

    from benchmarks.search_latency import percentiles
    from clip_foundation.search.mmap_index import BigIndex
    from clip_foundation.search.index import recall_at_k
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    saved = np.load(truth_file)
    queries, truth = torch.from_numpy(saved["queries"]), torch.from_numpy(saved["truth"])
    start = time.perf_counter()
    index = BigIndex.open(folder)
    opened_s = time.perf_counter() - start
    rss_open = _rss()
    found = index.search(queries, 10)[1]
    recall = recall_at_k(found, truth, 10)
    for i in range(10):  # warm-up
        index.search(queries[i:i + 1], 10)
    lookup, meta = [], []
    for i in range(len(queries)):
        t = time.perf_counter()
        _, rows = index.search(queries[i:i + 1], 10)
        lookup.append(time.perf_counter() - t)
        t = time.perf_counter()
        index.rows(rows[0].tolist())
        meta.append(time.perf_counter() - t)
    return {"open_s": round(opened_s, 2), "rss_after_open_mb": round(rss_open / 2**20), "recall_at_10": round(recall, 4),
            "lookup": percentiles(lookup), "metadata_of_10": percentiles(meta),
            "peak_rss_mb": round(_peak_rss() / 2**20)}


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--shard", type=int, default=1_000_000, help="rows per embedding shard")
    p.add_argument("--budgets", default="2G,8G", help="--max_index_memory values, comma-separated")
    p.add_argument("--queries", type=int, default=300, help="fresh queries for latency and recall")
    p.add_argument("--scratch", default="/tmp/index_budget", help="where the embeddings and indexes go (deleted after)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--serve", nargs=2, metavar=("INDEX", "TRUTH"), help=argparse.SUPPRESS)  # the child's part
    args = p.parse_args(argv)
    if args.serve:
        print(json.dumps(serve(*args.serve)))
        return {}
    from benchmarks.search_latency import Mixture
    scratch = Path(args.scratch)
    need = args.rows * args.dim * 2 * 2.2  # the embeddings, and an index of about as much at most
    free = shutil.disk_usage(scratch.parent if not scratch.exists() else scratch).free
    if free < need:
        raise SystemExit(f"{scratch}: {free / 2**30:.1f} GiB free, about {need / 2**30:.1f} GiB needed")
    result = {"rows": args.rows, "dim": args.dim, "queries": args.queries, "data": "Mixture (benchmarks/search_latency.py)"}
    try:
        queries = Mixture(args.dim).sample(args.queries, seed=10 ** 9)
        print(f"writing {args.rows:,} x {args.dim} float16 embeddings to {scratch / 'emb'}", flush=True)
        truth, result["write_s"] = write_embeddings(scratch / "emb", args.rows, args.dim, args.shard, queries)
        np.savez(scratch / "truth.npz", queries=queries.numpy(), truth=truth.numpy())
        for budget in args.budgets.split(","):
            out = scratch / f"index_{budget}"
            build_s, build_rss, _ = child([sys.executable, "search.py", "--build_index", f"--embeddings={scratch / 'emb'}",
                                           f"--index={out}", f"--max_index_memory={budget}"])
            info = json.loads((out / "index.json").read_text())
            _, serve_rss, text = child([sys.executable, "benchmarks/index_budget.py", "--serve", str(out),
                                        str(scratch / "truth.npz")])
            row = {"factory": info["faiss"]["type"], "search": info["faiss"]["search"],
                   "build_recall_at_10": info["faiss"]["recall@10"], "index_bytes": info["budget"]["file_size"],
                   "estimate_bytes": info["budget"]["estimate"], "metadata_bytes": info["files"]["metadata.arrow"]["bytes"],
                   "build_s": round(build_s, 1), "build_peak_rss_mb": round(build_rss / 2**20),
                   **json.loads(text.strip().splitlines()[-1])}
            result[budget] = row
            print(f"{budget}: {row['factory']} ({row['search']}), {row['index_bytes'] / 2**30:.2f} GiB, built in "
                  f"{row['build_s']} s (peak RSS {row['build_peak_rss_mb']} MB); lookup p50 {row['lookup']['p50_ms']} "
                  f"p95 {row['lookup']['p95_ms']} ms, recall@10 {row['recall_at_10']} on fresh queries "
                  f"(build-time {row['build_recall_at_10']} on gallery rows); metadata of 10 p50 "
                  f"{row['metadata_of_10']['p50_ms']} ms; opened in {row['open_s']} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
