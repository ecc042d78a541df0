"""The installed `clip-*` commands (pyproject.toml's [project.scripts]). Each runs a library
module's `main` and exits 0 when it returns: those `main`s return their results (model, metrics)
for Python callers and tests, which a console script would hand to `sys.exit` as an error."""
from __future__ import annotations

import importlib


def _run(module: str) -> int:
    importlib.import_module(f"clip_foundation.{module}").main()
    return 0


def train() -> int:
    return _run("train")


def evaluate() -> int:
    return _run("evaluate")


def search() -> int:
    return _run("search")


def app() -> int:
    return _run("app")


def download() -> int:
    return _run("download")


def hub() -> int:
    return _run("hub")


def embed() -> int:
    return _run("embed")
