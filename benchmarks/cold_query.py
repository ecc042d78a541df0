"""The first answer from a shell: `python search.py "a dog" --checkpoint=RUN -n 9`, a fresh process each
time, timed from start to exit, against a run whose index and engine graphs are already made.

    python -m benchmarks.cold_query --checkpoint=runs/NAME              # e.g. the preset's run (Lite2 + MiniLM)
    python -m benchmarks.cold_query                                      # trains a small synthetic run first
    python -m benchmarks.cold_query --checkpoint=runs/NAME --repeats=9 --query="a dog on a beach"

One untimed query first makes what a query reuses (the gallery's index, the text tower's engine graph and
its check against the run's weights, the split's records memo); then `--repeats` fresh queries are timed, and
the median printed with each try, and whether such a query imported torch (none does when the quick path,
clip_foundation/search/quick.py, answers it). Beside them the import time of `import clip_foundation`,
`import clipModel`, the quick path's module and the search command's module, each in a fresh interpreter (the median of `--repeats`, measured inside it), the
interpreter's own start (`python -c pass`, start to exit), the CPU (lscpu's model name and its avx2 /
avx512 / bf16 / vnni / amx flags) and the load average before and after: on a machine other jobs share,
the figures are that machine's, not an idle one's. Returns the figures as a dict.
"""
import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = ("clip_foundation", "clipModel", "clip_foundation.search.quick",  # what answers a plain text query
           "clip_foundation.search.command")  # the search command's module (every other query)
FLAGS = re.compile(r"^(avx2|avx512\w*|\w*bf16\w*|\w*vnni\w*|amx\w*)$")


def cpu() -> dict:
    """lscpu's model name and the vector flags that decide a CPU's inference speed (Linux /proc/cpuinfo)."""
    name, flags = platform.processor() or platform.machine(), []
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        flags = next(line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return {"model": name, "flags": sorted(f for f in flags if FLAGS.match(f)), "cores": os.cpu_count()}


def load() -> float | None:
    """The 1-minute load average: how many other jobs ran beside the figures."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def search_command(query: str, checkpoint, n: int, extra: list[str]) -> list[str]:
    """`python search.py ...` in a checkout; where the library is installed alone, its module (the same main)."""
    start = [sys.executable, str(ROOT / "search.py")] if here() else [sys.executable, "-m", "clip_foundation.search.command"]
    return [*start, query, f"--checkpoint={checkpoint}", "-n", str(n), *extra]


def here() -> Path | None:
    """The checkout these benchmarks sit in (its modules are the ones measured), or None for an installed library."""
    return ROOT if (ROOT / "search.py").is_file() else None


def timed(command: list[str]) -> float:
    """Seconds from starting `command` to its exit; a failure is an error naming its output."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=here())
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds


def imports_torch(command: list[str]) -> bool:
    """Whether `command` imports torch (`python -X importtime` names each module it imports)."""
    done = subprocess.run([command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True, cwd=here())
    return re.search(r"\|\s*torch$", done.stderr, re.M) is not None


def import_seconds(statement: str) -> float:
    """The time `statement` takes in a fresh interpreter, measured inside it."""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=here())
    return float(done.stdout.strip().splitlines()[-1])


def small_run(folder: Path) -> Path:
    """A small CLIP trained on a small synthetic set (a minute or two on a CPU): what to search without a run."""
    from clip_foundation import training
    from clip_foundation.data.synthetic import SyntheticConfig, generate
    data = generate(folder / "synthetic", SyntheticConfig(n_train=400, n_val=40, n_test=100), progress=False)
    _, run, _ = training.main([f"--data={data}", f"--out_dir={folder / 'runs'}", "--run_name=cold", "--epochs=2",
                               "--batch_size=50", "--progress=false", f"--cache_dir={folder / 'cache'}"])
    return Path(run)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="", help="a run folder (train.py's); default: train a small one")
    p.add_argument("--query", default="a dog", help="the text searched for")
    p.add_argument("-n", type=int, default=9, help="results per query")
    p.add_argument("--repeats", type=int, default=5, help="timed queries (and imports of each module)")
    p.add_argument("--engine", default="auto", help="search.py's --engine")
    p.add_argument("--scratch", default="", help="where the small run is trained (default: a temporary folder)")
    args = p.parse_args(argv)
    scratch = None
    if not args.checkpoint:
        scratch = Path(args.scratch or tempfile.mkdtemp(prefix="cold-query-"))
        args.checkpoint = str(small_run(scratch))
    if Path(args.checkpoint).is_dir():  # the queries run from the checkout
        args.checkpoint = str(Path(args.checkpoint).resolve())
    command = search_command(args.query, args.checkpoint, args.n, [f"--engine={args.engine}"])
    result = {"cpu": cpu(), "command": " ".join(command[1:]), "load_before": load()}
    try:
        result["first_query_s"] = timed(command)  # untimed in the median: it makes the index and graphs
        graphs = sorted(Path(args.checkpoint).glob("engines/*/*.checked.json"))
        result["checked_graphs"] = [g.name.removesuffix(".checked.json") for g in graphs]
        result["query_s"] = [timed(command) for _ in range(args.repeats)]
        result["imports_torch"] = imports_torch(command)
        result["python_start_s"] = statistics.median(timed([sys.executable, "-c", "pass"]) for _ in range(args.repeats))
        result["imports_s"] = {f"import {module}": statistics.median(import_seconds(f"import {module}")
                                                                     for _ in range(args.repeats)) for module in IMPORTS}
    finally:
        if scratch is not None and not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    result["query_median_s"] = statistics.median(result["query_s"])
    result["load_after"] = load()
    report(result)
    return result


def report(result: dict) -> None:
    c = result["cpu"]
    print(f"CPU: {c['model']}, {c['cores']} cores; flags: {' '.join(c['flags']) or 'none of avx2/avx512/bf16/vnni/amx'}")
    print(f"load average (1 min): {result['load_before']} before, {result['load_after']} after "
          f"(other jobs on these {c['cores']} cores slow every figure below)")
    print(f"command: python {result['command']}")
    print(f"engine graphs checked against the run's weights: {', '.join(result['checked_graphs']) or 'none (torch)'}")
    print(f"first query (makes the index and graphs): {result['first_query_s']:.2f} s")
    print(f"query, fresh process, start to exit: median {result['query_median_s']:.2f} s of "
          f"{len(result['query_s'])} ({', '.join(f'{s:.2f}' for s in result['query_s'])}); "
          f"{'imports torch (the full path)' if result['imports_torch'] else 'no torch imported (the quick path)'}")
    print(f"python -c pass (the interpreter's start, to exit): {result['python_start_s']:.3f} s")
    for name, seconds in result["imports_s"].items():
        print(f"{name} (in a fresh interpreter): {seconds:.3f} s")
    print(json.dumps({k: v for k, v in result.items() if k != "command"}))


if __name__ == "__main__":
    main()
