"""The search page under load: many clients querying its HTTP API at once, and whether the
server's memory stays flat (the page's question, not a speed record).

    python -m benchmarks.app_load --checkpoint=runs/NAME [--data=DIR] [--queries=5000] [--clients=16]

Starts the page (`SearchPage.launch`, as app.py does) in this process and runs `--clients` threads,
each calling `/gradio_api/call/search` as any HTTP client does (no gradio_client), with queries
"a {colour} {shape}" and a number of results cycling, so the tokenizer and thumbnails see many
inputs. After `--warmup` queries (thumbnails made, caches filled, and more sessions than the
`SearchPage.sessions` Gradio keeps, since every API call is a session) it reads the process's
resident memory, runs `--queries` more in chunks of 1,000, collecting garbage and reading it after
each. Prints one JSON object: queries/s, latency p50/p95, errors and "queue full" refusals, RSS
before, after each chunk, and the growth per 1,000 queries. The clients live in the same process;
their memory does not grow with the number of queries.
"""
import argparse
import gc
import itertools
import json
import threading
import time
import warnings
from pathlib import Path

import httpx

from clip_foundation.data.synthetic import COLORS, SHAPES
from clip_foundation.app.page import SearchPage


def rss_mb() -> float:
    """This process's resident memory now (Linux /proc), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmRSS in /proc/self/status (this benchmark reads Linux's /proc)")


def search(client: httpx.Client, url: str, query: str, n: int) -> str:
    """One query as an HTTP client makes it -> "ok", "busy" (queue full) or "error"."""
    response = client.post(f"{url}gradio_api/call/search", json={"data": [query, n]})
    if response.status_code == 503:
        return "busy"
    if response.status_code != 200:
        return "error"
    events = client.get(f"{url}gradio_api/call/search/{response.json()['event_id']}").text
    return "ok" if "event: complete" in events else ("busy" if "queue is full" in events.lower() else "error")


def run(url: str, count: int, clients: int) -> dict:
    """`count` queries from `clients` threads -> {seconds, latencies, outcome counts}."""
    queries = itertools.cycle((f"a {c} {s}", n) for c in COLORS for s in SHAPES for n in (3, 9))
    lock, latencies, outcomes = threading.Lock(), [], {"ok": 0, "busy": 0, "error": 0}
    left = [count]

    def client_loop():
        with httpx.Client(timeout=120) as client:
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                    query, n = next(queries)
                start = time.perf_counter()
                outcome = search(client, url, query, n)
                with lock:
                    latencies.append(time.perf_counter() - start)
                    outcomes[outcome] += 1
    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"seconds": time.perf_counter() - start, "latencies": latencies, **outcomes}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a run folder (train.py's)")
    p.add_argument("--data", default=None, help="the gallery's dataset folder (default: the run's)")
    p.add_argument("--split", default="test")
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=1500, help="queries before measuring (more than the sessions kept)")
    p.add_argument("--clients", type=int, default=16)
    args = p.parse_args(argv)
    page = SearchPage.from_run(args.checkpoint, args.data, args.split)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        url = page.launch(prevent_thread_lock=True, quiet=True).local_url
    try:
        run(url, args.warmup, args.clients)
        gc.collect()
        rss, chunks = [rss_mb()], []
        for done in range(0, args.queries, 1000):
            chunks.append(run(url, min(1000, args.queries - done), args.clients))
            gc.collect()
            rss.append(rss_mb())
    finally:
        page.close()
    measured = {key: sum(c[key] for c in chunks) for key in ("seconds", "ok", "busy", "error")}
    ms = sorted(1000 * t for c in chunks for t in c["latencies"])
    result = {"queries": args.queries, "clients": args.clients, "gallery": len(page.gallery),
              "queries_per_s": round(args.queries / measured["seconds"], 2),
              "p50_ms": round(ms[len(ms) // 2], 1), "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 1),
              "ok": measured["ok"], "busy": measured["busy"], "errors": measured["error"],
              "rss_before_mb": round(rss[0], 1), "rss_after_mb": round(rss[-1], 1),
              "rss_mb_per_chunk": [round(r, 1) for r in rss],
              "rss_growth_mb_per_1000": round(1000 * (rss[-1] - rss[0]) / max(1, args.queries), 2)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
