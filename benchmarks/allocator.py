"""Does another memory allocator, or a glibc setting, remove the kernel time of torch on a CPU?

    python -m benchmarks.allocator                       # every allocator found, both workloads
    python -m benchmarks.allocator --workloads=train --repeats=3

Torch's CPU allocator is the C library's malloc. glibc serves blocks above its mmap threshold
with fresh `mmap` calls and returns them on `free`, so a network whose activations are megabytes
each faults every page of every activation in again on every forward: minor page faults and
system time. PyTorch's CPU performance guide suggests jemalloc or tcmalloc (`LD_PRELOAD`); glibc
can also be told to keep such blocks (`GLIBC_TUNABLES`, a fixed mmap threshold and trim threshold).

Each workload runs in a child process per allocator (so `LD_PRELOAD` applies from its start), and
the child's own wall time, user and system CPU seconds and minor page faults are printed:
- `encode`: frozen-tower features on torch, EfficientNet-Lite at its size (the preset's image
  tower when engines are not installed), batches of 32 images, no gradients;
- `train`: fine-tuning the same tower (forward + backward + AdamW) on batches of 32, the
  torch path every training run takes when a tower trains.
Weights are random (the time does not depend on them), so it runs with the core install only.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib")
ALLOCATORS = {  # name -> (file to LD_PRELOAD or None, extra environment)
    "glibc": (None, {}),
    # keep freed blocks up to 1 GiB in the heap instead of unmapping them (no dynamic threshold)
    "glibc-tuned": (None, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1073741824:"
                                             "glibc.malloc.trim_threshold=1073741824"}),
    "jemalloc": ("libjemalloc.so.2", {"MALLOC_CONF": "oversize_threshold:1,background_thread:true,"
                                                     "metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
    "tcmalloc": ("libtcmalloc_minimal.so.4", {}),
}


def find_library(name: str) -> str | None:
    """The path of a shared library in the usual folders, or None."""
    return next((str(Path(d) / name) for d in LIBRARY_DIRS if (Path(d) / name).is_file()), None)


def workload(name: str, model_name: str, batches: int) -> None:
    """Run one workload in this process (the child)."""
    import timm
    import torch
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=0)
    size = model.pretrained_cfg["input_size"][-1]
    model = model.to(memory_format=torch.channels_last)
    images = torch.randn(32, 3, size, size).contiguous(memory_format=torch.channels_last)
    if name == "encode":
        model.eval()
        with torch.no_grad():
            for _ in range(batches + 1):  # the first: warm-up
                model(images)
        return
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for _ in range(batches + 1):
        loss = model(images).square().mean()  # any scalar: the time is in the backward, not the loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def measure(allocator: str, workload_name: str, args) -> dict | None:
    """Run the workload in a child under `allocator` -> its times and faults (None: not installed)."""
    library, extra = ALLOCATORS[allocator]
    env = {**os.environ, **extra}
    if library:
        path = find_library(library)
        if path is None:
            return None
        env["LD_PRELOAD"] = path
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.allocator", f"--child={workload_name}",
                              f"--model={args.model}", f"--batches={args.batches}"], env=env)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"{allocator} {workload_name}: the child failed (status {status})")
    return {"wall": time.perf_counter() - start, "user": usage.ru_utime, "sys": usage.ru_stime,
            "faults": usage.ru_minflt, "rss_mb": usage.ru_maxrss / 1024}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="encode,train", help="encode, train or both")
    p.add_argument("--allocators", default=",".join(ALLOCATORS), help="those to compare (missing ones are skipped)")
    p.add_argument("--model", default="tf_efficientnet_lite2", help="timm image tower")
    p.add_argument("--batches", type=int, default=4, help="timed batches of 32 per child, after one warm-up")
    p.add_argument("--repeats", type=int, default=1, help="children per allocator; the fastest wall is shown")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        workload(args.child, args.model, args.batches)
        return {}
    results = {}
    for name in args.workloads.split(","):
        print(f"{name}: {args.model}, {args.batches + 1} batches of 32 (one warm-up), per child process")
        print(f"  {'allocator':12s}{'wall s':>8s}{'user s':>8s}{'sys s':>8s}{'faults':>10s}{'max RSS MB':>12s}")
        for allocator in args.allocators.split(","):
            runs = [measure(allocator, name, args) for _ in range(args.repeats)]
            if runs[0] is None:
                print(f"  {allocator:12s}not installed ({ALLOCATORS[allocator][0]})")
                continue
            best = min(runs, key=lambda r: r["wall"])
            results[(name, allocator)] = best
            print(f"  {allocator:12s}{best['wall']:8.1f}{best['user']:8.1f}{best['sys']:8.1f}"
                  f"{best['faults']:10d}{best['rss_mb']:12.0f}")
    return results


if __name__ == "__main__":
    main()
