"""The one way every command runs, however it is started: `python search.py`, the installed
`clip-search` (pyproject.toml's [project.scripts]) and `python -m clip_foundation.search` all call
`run`, so each reports warnings and exits the same way. The `main`s return their results (model,
metrics) for Python callers and tests; `run` turns that into the exit status."""
from __future__ import annotations

import importlib

from . import cli


def run(command: str, main=None) -> int:
    """Run `clip_foundation.<command>`'s `main` (or `main`, given by that module run as __main__)
    with its data and page warnings printed as one plain line each -> the exit status: a `main`
    returning an int (download) exits with it, one returning results exits 0. A failure inside
    `main` is a SystemExit already (one error line, status 1; usage mistakes 2)."""
    from .records import DataWarning
    from .webapp import PageWarning
    main = main or importlib.import_module(f"clip_foundation.{command}").main
    with cli.reported_warnings((DataWarning, PageWarning)):
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
