"""The one way every command runs, however it is started: `python search.py`, the installed
`clip-search` (pyproject.toml's [project.scripts]) and `python -m clip_foundation.search.command` all call
`run`, so each reports warnings and exits the same way. The `main`s return their results (model,
metrics) for Python callers and tests; `run` turns that into the exit status. A command with a QUICK module
answers its common case there first, before anything imports torch (this module imports none)."""
from __future__ import annotations

import atexit
import gc
import importlib
import sys

from clip_foundation.common import cli


MODULES = {  # each command -> the module whose `main` it runs
    "train": "clip_foundation.training.command", "evaluate": "clip_foundation.evaluate.command",
    "search": "clip_foundation.search.command", "app": "clip_foundation.app.command",
    "download": "clip_foundation.data.download", "hub": "clip_foundation.hub", "embed": "clip_foundation.embed.writer",
    "export": "clip_foundation.engines.command", "shards": "clip_foundation.data.shards",
    "synthetic": "clip_foundation.data.synthetic",
}
QUICK = {  # a command -> the module whose `answer(argv)` serves its common case without torch: an exit status,
    "search": "clip_foundation.search.quick",  # or None (nothing said yet) for `main` to run
}


def run(command: str, main=None) -> int:
    """Run the `main` of `command`'s module (MODULES), or `main` when that module runs as __main__,
    with its warnings (data, page, engine: every UserWarning) printed as one plain line each -> the
    exit status: a `main` returning an int (download) exits with it, one returning results exits 0.
    A failure inside `main` is a SystemExit already (one error line, status 1; usage mistakes 2). Started as
    a command (no `main` given), its QUICK module is asked first."""
    # At exit the interpreter searches every object left for cycles to collect: after torch is imported that
    # took 0.6 s of a query's 3.4 s (shared cores). What is left at exit is freed with the process; frozen, it
    # is not searched (Python never promised __del__ for objects alive at exit). Registered here, it runs only
    # when the process ends, after the atexit work registered later (temporary folders, the page's uploads).
    atexit.register(gc.freeze)
    if main is None and command in QUICK:
        if (status := importlib.import_module(QUICK[command]).answer(sys.argv[1:])) is not None:
            return status
    main = main or importlib.import_module(MODULES[command]).main
    with cli.reported_warnings():
        result = main()
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def train() -> int:
    return run("train")


def evaluate() -> int:
    return run("evaluate")


def search() -> int:
    return run("search")


def app() -> int:
    return run("app")


def download() -> int:
    return run("download")


def hub() -> int:
    return run("hub")


def embed() -> int:
    return run("embed")
