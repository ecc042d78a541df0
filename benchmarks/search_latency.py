"""Query latency of exact top-k vs FAISS (flat and IVF), and IVF recall, on a random gallery.

    python benchmarks/search_latency.py --rows 100000 --dim 256 [--queries 200] [--json OUT]
    python benchmarks/search_latency.py --app --rows 10000,100000,1000000 --text scratch,minilm
    python benchmarks/search_latency.py --ann --rows 10000000 --queries 300

The gallery is `--rows` unit vectors around `--clusters` random centres (noise of norm
`--spread`; the shape of real embedding galleries), stored float16 like search.py's index. Queries are fresh points around
the same centres. Reports build time, ms per single query and per batch of 64 queries, and
IVF recall@10 against exact search (as measured at build time and on the fresh queries).

`--app` instead times the search page's own handler (`SearchPage.on_query`: one text-tower forward,
the index lookup as `load_or_build_index` sets it up, the result grid from cached thumbnails) from
query typed to results returned, p50/p95 over `--queries` queries, beside its parts timed alone
(tokenizer, text forward, index lookup), at the page's thread count (1; the forward is also timed
at 2 threads, the reason for 1), with the scratch model's text tower (random weights: the time
does not depend on them) and/or all-MiniLM-L6-v2. The gallery rows are the synthetic embeddings
above, pointing at a few real small images; an IVF row also gives its recall@10 against exact
search on fresh gallery-like queries.

`--ann` builds a compressed FAISS index (`--factory`, default IVF + 4-bit fast-scan PQ codes +
a float16 refine step) over `--rows` synthetic embeddings made in chunks (`Mixture`: topics,
clusters of uneven size, low-rank spread; see its docstring), never all held as float32, and
times the lookup alone (1 query at a time, 1 thread) at each nprobe, with recall@10 against
exact search on `--queries` fresh queries.
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


from clip_foundation.engines.registry import engine_help, resolve  # noqa: E402
from clip_foundation.search.index import (GalleryIndex, RunningTopK, build_faiss, ensure_faiss, exact_topk,  # noqa: E402
                                   faiss_module, recall_at_k)
from clip_foundation.evaluate.metrics import embed_texts  # noqa: E402


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


def timed(fn, items, warmup: int = 5) -> dict:
    """p50/p95 of `fn(item)` over `items` (after `warmup` untimed calls)."""
    for item in items[:warmup]:
        fn(item)
    times = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return percentiles(times)


def text_model(text: str, dim: int, words: list[str], engine: str = "torch"):
    """The page's model with a `text` tower (random heads), its queries encoded by `engine` as
    `app.py --engine=ENGINE` sets it up."""
    from clip_foundation.engines.registry import use_engine
    from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig
    if text == "minilm":
        from clip_foundation.pretrained import text_model_folder
        tower = TextEncoderConfig(kind="hf", name=text_model_folder(), pooling="mean")
    else:
        tower = TextEncoderConfig(kind="scratch", pooling="mean")
    model = CLIPModel(CLIPConfig(image=ImageEncoderConfig(kind="scratch"), text=tower, projection_dim=dim),
                      captions=words).eval()
    use_engine(model, engine)  # graphs (if any) in a temporary folder, exported on the first query
    return model


def app_latency(rows_list: list[int], dim: int, texts: list[str], n_queries: int, clusters: int,
                spread: float, threads: int = 1, engine: str = "torch") -> dict:
    """p50/p95 of the page's query handler at each gallery size and text tower, beside its parts."""
    import tempfile

    from PIL import Image

    from clip_foundation.search.gallery import Gallery
    from clip_foundation.data.records import Record
    from clip_foundation.data.synthetic import COLORS, SHAPES
    from clip_foundation.app.page import SearchPage
    words = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    queries = [f"{w} on the left" if i % 2 else w for i, w in enumerate(words * (n_queries // len(words) + 1))]
    queries = queries[:n_queries]
    folder = Path(tempfile.mkdtemp(prefix="latency-"))
    files = []
    for i, colour in enumerate(COLORS.values()):  # a few real images for the thumbnails
        files.append(folder / f"{i}.png")
        Image.new("RGB", (64, 64), tuple(colour)).save(files[-1])
    models = {text: text_model(text, dim, words, engine) for text in texts}
    result = {"threads": threads, "engine": engine, "towers": {}, "galleries": {}}
    for text, model in models.items():  # torch's forward alone, at 1 and 2 threads: why the page uses 1
        with torch.no_grad():
            tokens = [model.tokenize([q]) for q in queries]
            part = {"tokenize": timed(model.tokenize, queries)}
            for n in sorted({1, 2, threads}):
                torch.set_num_threads(n)
                part[f"forward_{n}_threads"] = timed(lambda t: model.encode_text(t["input_ids"], t["attention_mask"]),
                                                     tokens)
            torch.set_num_threads(threads)
            part["text_forward"] = timed(lambda q: embed_texts(model, [q]), queries)  # tokenizer + engine forward
        result["towers"][text] = part
        print(f"text tower {text} ({engine}): tokenizer + forward p50 {part['text_forward']['p50_ms']:.2f} ms, "
              f"p95 {part['text_forward']['p95_ms']:.2f} ms at {threads} thread(s); torch's forward alone at 1 / 2 "
              f"threads p50 {part['forward_1_threads']['p50_ms']:.2f} / {part['forward_2_threads']['p50_ms']:.2f} ms, "
              f"p95 {part['forward_1_threads']['p95_ms']:.2f} / {part['forward_2_threads']['p95_ms']:.2f} ms; "
              f"tokenizer alone p50 {part['tokenize']['p50_ms']:.2f} ms")
    fresh = clustered(max(200, n_queries), dim, clusters, spread, seed=1)  # gallery-like queries, for recall
    for rows in rows_list:
        gallery = clustered(rows, dim, clusters, spread, seed=0).half()
        paths = [str(files[i % len(files)]) for i in range(rows)]
        start = time.perf_counter()
        index = ensure_faiss(GalleryIndex(gallery, paths, ""), "auto", verbose=False)  # as the app's index
        built = time.perf_counter() - start
        faiss_info = index.meta.get("faiss", {})
        row = {"index": faiss_info.get("type", "exact"), "index_build_s": round(built, 1)}
        if index.faiss_index is not None:
            _, truth = exact_topk(fresh, gallery, 10)
            row.update(nlist=faiss_info.get("nlist"), nprobe=faiss_info.get("nprobe"),
                       recall_at_10=round(recall_at_k(index.search(fresh, 10)[1], truth, 10), 4))
        result["galleries"][str(rows)] = row
        for text, model in models.items():
            page = SearchPage(Gallery(model, index, [Record(Path(p), []) for p in paths[:1]], str(folder)), None, {})
            page.use_query_threads()
            with torch.no_grad():
                embedded = [model.encode_text([q]).float() for q in queries]
            lookup = timed(lambda e: index.search(e, 9), embedded)
            handler = timed(lambda q: page.on_query(q, 9), queries)  # warm-up makes the thumbnails
            row[text] = {"lookup": lookup, "handler": handler}
            print(f"{rows:>9} images, {row['index']:13} {text:8}: query -> results p50 {handler['p50_ms']:.2f} ms, "
                  f"p95 {handler['p95_ms']:.2f} ms (index lookup alone p50 {lookup['p50_ms']:.3f}, "
                  f"p95 {lookup['p95_ms']:.3f} ms)")
            del page
        extra = f", nlist {row['nlist']}, nprobe {row['nprobe']}, recall@10 vs exact {row['recall_at_10']:.3f} " \
                "on fresh queries" if "recall_at_10" in row else ""
        print(f"{rows:>9} images: {row['index']} built in {built:.1f} s{extra}")
        del index, gallery
    return result


class Mixture:
    """Synthetic embeddings shaped like a real gallery's, made in reproducible chunks: `topics`
    random directions; `clusters` cluster centres around them (a topic's clusters share its
    direction); cluster sizes uneven (Zipf-like, weight 1 / (rank + 10)); each point its cluster
    centre plus noise in a `rank`-dimensional subspace of its topic (spread 0.3 to 0.8 by
    cluster) and a little isotropic noise (0.05), then normalised. Low intrinsic dimension and
    uneven density, as in real embeddings; unlike i.i.d. Gaussian vectors, where every point is
    about as far from every other and no index beats a full scan."""

    def __init__(self, dim: int, topics: int = 100, clusters: int = 10_000, rank: int = 16, seed: int = 123):
        g = torch.Generator().manual_seed(seed)
        centres = F.normalize(torch.randn(topics, dim, generator=g), dim=1)
        self.topic = torch.randint(topics, (clusters,), generator=g)
        self.centres = F.normalize(centres[self.topic] + 0.8 * F.normalize(torch.randn(clusters, dim, generator=g), dim=1), dim=1)
        self.bases = torch.linalg.qr(torch.randn(topics, dim, rank, generator=g)).Q  # (topics, dim, rank)
        self.spread = 0.3 + 0.5 * torch.rand(clusters, generator=g)
        self.weights = 1.0 / (torch.randperm(clusters, generator=g).float() + 10)
        self.dim, self.rank = dim, rank

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """`n` normalised float32 points (n, dim), the same for the same `seed`."""
        g = torch.Generator().manual_seed(seed)
        cluster = torch.multinomial(self.weights, n, replacement=True, generator=g)
        z = torch.randn(n, self.rank, generator=g) * (self.spread[cluster] / self.rank ** 0.5)[:, None]
        x = self.centres[cluster] + 0.05 / self.dim ** 0.5 * torch.randn(n, self.dim, generator=g)
        topic = self.topic[cluster]
        for t in topic.unique().tolist():
            rows = (topic == t).nonzero()[:, 0]
            x[rows] += z[rows] @ self.bases[t].T
        return F.normalize(x, dim=1)


def ann_large(rows: int, dim: int, n_queries: int, factory: str, nprobes: list[int], k_factors: list[float],
              chunk: int = 250_000, k: int = 10) -> dict:
    """Build `factory` over `rows` Mixture points chunk by chunk, keeping the exact top-`k` of
    `n_queries` fresh queries as it goes -> latency of the lookup alone and recall@k per nprobe."""
    faiss = faiss_module(required=True)
    mix = Mixture(dim)
    queries = mix.sample(n_queries, seed=10 ** 9)
    owner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)  # owns the index: kept alive
    index = faiss.downcast_index(owner)  # its own class, for k_factor
    result = {"rows": rows, "dim": dim, "factory": factory, "queries": n_queries,
              "data": "Mixture (benchmarks/search_latency.py)"}
    start = time.perf_counter()
    nlist = faiss.extract_index_ivf(index).nlist
    train = mix.sample(min(rows, 64 * nlist), seed=10 ** 9 + 1)
    index.train(train.numpy())
    result["train_s"] = round(time.perf_counter() - start, 1)
    print(f"{factory}: trained on {len(train)} points in {result['train_s']} s", flush=True)
    del train
    exact = RunningTopK(queries, k)
    add_s = 0.0
    for s in range(0, rows, chunk):
        x = mix.sample(min(chunk, rows - s), seed=s)
        t = time.perf_counter()
        index.add(x.numpy())
        add_s += time.perf_counter() - t
        exact.add(x, s)
        if (s // chunk) % 8 == 7:
            print(f"  {s + len(x):,} rows added ({add_s:.0f} s adding)", flush=True)
    result["add_s"], result["build_s"] = round(add_s, 1), round(result["train_s"] + add_s, 1)
    q = queries.numpy()
    space, threads = faiss.ParameterSpace(), faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one query at a time, as a page serves them
    result["nprobe"] = {}
    for kf in k_factors if hasattr(index, "k_factor") else [None]:
        if kf is not None:
            index.k_factor = kf  # IndexRefine: re-rank k x k_factor candidates
        for nprobe in nprobes:
            space.set_index_parameter(index, "nprobe", nprobe)
            found = torch.from_numpy(index.search(q, k)[1])
            recall = recall_at_k(found, exact.indices, k)
            lat = timed(lambda i: index.search(q[i:i + 1], k), list(range(n_queries)))
            key = f"{nprobe}" if kf is None else f"{nprobe},k_factor={kf:g}"
            result["nprobe"][key] = {"nprobe": nprobe, "k_factor": kf, "recall_at_10": round(recall, 4), **lat}
            print(f"  nprobe {nprobe:4}{'' if kf is None else f', k_factor {kf:g}'}: lookup p50 {lat['p50_ms']:.3f} ms, "
                  f"p95 {lat['p95_ms']:.3f} ms, recall@{k} {recall:.3f} vs exact", flush=True)
    faiss.omp_set_num_threads(threads)
    ok = [(r["p95_ms"], key) for key, r in result["nprobe"].items() if r["recall_at_10"] >= 0.95]
    result["chosen"] = min(ok)[1] if ok else None
    print(f"{rows:,} rows, {factory}: built in {result['build_s']} s (train {result['train_s']} s, add "
          f"{result['add_s']} s); lowest p95 with recall@10 >= 0.95: {result['chosen']}")
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--app", action="store_true", help="time the search page's query handler instead")
    p.add_argument("--ann", action="store_true", help="a compressed FAISS index over a large gallery")
    p.add_argument("--text", default="scratch", help="--app: text towers, comma-separated: scratch, minilm")
    p.add_argument("--engine", default="auto", help=engine_help("--app: encodes the queries"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default; --app: 1)")
    p.add_argument("--rows", default="100000", help="gallery size (--app: comma-separated sizes)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.7, help="noise norm around each centre (1 = as far as the centre)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--factory", default="", help="--ann: FAISS index_factory string "
                   "(default IVF<sqrt(rows)/3>,PQ<dim/4>x4fs,Refine(SQfp16))")
    p.add_argument("--nprobe", default="1,2,4,8,16,32,64", help="--ann: nprobe values to measure")
    p.add_argument("--k_factor", default="32,64,128", help="--ann: refine step re-ranks k x this many candidates "
                   "(comma-separated values to measure)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads or args.app:
        torch.set_num_threads(args.threads or 1)
    sizes = [int(r) for r in args.rows.split(",")]
    if args.app or args.ann:
        if args.app:
            texts = [t.strip() for t in args.text.split(",")]
            if not set(texts) <= {"scratch", "minilm"}:
                p.error("--text: scratch and/or minilm")
            result = app_latency(sizes, args.dim, texts, args.queries, args.clusters, args.spread,
                                 torch.get_num_threads(), resolve(args.engine, "cpu"))
        else:
            factory = args.factory or f"IVF{max(1, round(sizes[0] ** 0.5 / 3))},PQ{args.dim // 4}x4fs,Refine(SQfp16)"
            result = ann_large(sizes[0], args.dim, args.queries, factory, [int(n) for n in args.nprobe.split(",")],
                               [float(f) for f in args.k_factor.split(",")], chunk=min(250_000, sizes[0]))
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
