"""Query latency of exact top-k vs FAISS (flat and IVF), and IVF recall, on a random gallery.

    python benchmarks/search_latency.py --rows 100000 --dim 256 [--queries 200] [--json OUT]
    python benchmarks/search_latency.py --app --rows 10000,100000,1000000 [--text minilm]

The gallery is `--rows` unit vectors around `--clusters` random centres (noise of norm
`--spread`; the shape of real embedding galleries), stored float16 like search.py's index. Queries are fresh points around
the same centres. Reports build time, ms per single query and per batch of 64 queries, and
IVF recall@10 against exact search (as measured at build time and on the fresh queries).

`--app` instead times the search page's own handler (`SearchPage.on_query`: one text-tower forward,
the index lookup as `load_or_build_index` sets it up, thumbnails of the hits) from query typed to
results returned, p50/p95 over `--queries` queries, beside the text tower's forward alone, with the
scratch model's text tower (random weights: the time does not depend on them) or all-MiniLM-L6-v2.
The gallery rows are the synthetic embeddings above, pointing at a few real small images.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_foundation.index import (GalleryIndex, build_faiss, ensure_faiss, exact_topk,  # noqa: E402
                                   faiss_module, recall_at_k)


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


def percentiles(times_s: list[float]) -> dict:
    ms = sorted(1000 * t for t in times_s)
    return {"p50_ms": round(ms[len(ms) // 2], 3), "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 3)}


def app_latency(rows_list: list[int], dim: int, text: str, n_queries: int, clusters: int, spread: float) -> dict:
    """p50/p95 of the page's query handler at each gallery size, and of the text tower alone."""
    import tempfile

    from PIL import Image

    from clip_foundation.gallery import Gallery
    from clip_foundation.records import Record
    from clip_foundation.synthetic import COLORS, SHAPES
    from clip_foundation.webapp import SearchPage
    from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig
    words = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    if text == "minilm":
        from clip_foundation.pretrained import text_model_folder
        tower = TextEncoderConfig(kind="hf", name=text_model_folder(), pooling="mean")
    else:
        tower = TextEncoderConfig(kind="scratch", pooling="mean")
    model = CLIPModel(CLIPConfig(image=ImageEncoderConfig(kind="scratch"), text=tower, projection_dim=dim),
                      captions=words).eval()
    queries = [f"{w} on the left" if i % 2 else w for i, w in enumerate(words * (n_queries // len(words) + 1))]
    queries = queries[:n_queries]
    folder = Path(tempfile.mkdtemp(prefix="latency-"))
    files = []
    for i, colour in enumerate(COLORS.values()):  # a few real images for the thumbnails
        files.append(folder / f"{i}.png")
        Image.new("RGB", (64, 64), tuple(colour)).save(files[-1])
    with torch.no_grad():
        for q in queries[:5]:
            model.encode_text([q])
        forward = []
        for q in queries:
            start = time.perf_counter()
            model.encode_text([q])
            forward.append(time.perf_counter() - start)
    result = {"text_tower": text, "threads": torch.get_num_threads(), "text_forward": percentiles(forward)}
    print(f"text tower {text}: forward alone p50 {result['text_forward']['p50_ms']:.2f} ms, "
          f"p95 {result['text_forward']['p95_ms']:.2f} ms ({torch.get_num_threads()} threads)")
    for rows in rows_list:
        gallery = clustered(rows, dim, clusters, spread, seed=0).half()
        paths = [str(files[i % len(files)]) for i in range(rows)]
        start = time.perf_counter()
        index = ensure_faiss(GalleryIndex(gallery, paths, ""), "auto", verbose=False)  # as the app's index
        built = time.perf_counter() - start
        page = SearchPage(Gallery(model, index, [Record(Path(p), []) for p in paths[:1]], str(folder)), None, {})
        for q in queries[:5]:
            page.on_query(q, 9)  # warm-up: thumbnails made once, float32 copy for exact search
        times = []
        for q in queries:
            start = time.perf_counter()
            page.on_query(q, 9)
            times.append(time.perf_counter() - start)
        kind = index.meta.get("faiss", {}).get("type", "exact")
        result[str(rows)] = {"index": kind, "index_build_s": round(built, 1), **percentiles(times)}
        print(f"{rows:>9} images, {kind:13}: query -> results p50 {result[str(rows)]['p50_ms']:.2f} ms, "
              f"p95 {result[str(rows)]['p95_ms']:.2f} ms (index built in {built:.1f} s)")
        del page, index, gallery
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--app", action="store_true", help="time the search page's query handler instead")
    p.add_argument("--text", default="scratch", choices=("scratch", "minilm"), help="--app: the text tower")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--rows", default="100000", help="gallery size (--app: comma-separated sizes)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.7, help="noise norm around each centre (1 = as far as the centre)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(r) for r in args.rows.split(",")]
    if args.app:
        result = app_latency(sizes, args.dim, args.text, args.queries, args.clusters, args.spread)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return result
    args.rows = sizes[0]
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
