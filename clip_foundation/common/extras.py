"""Optional parts of the library: imported only where used, with the pip extra that installs each."""
from __future__ import annotations

import importlib


def optional(module: str, extra: str, feature: str):
    """`module` imported, or ImportError naming the extra that installs it, e.g.
    `optional("gradio", "app", "the search page")`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if e.name and e.name.split(".")[0] != top:
            raise  # the package is there but broken (it lacks a module of its own): say that, not this
        raise ImportError(f"{feature} needs the optional package {top}: "
                          f'pip install "clip-foundation[{extra}]"') from None
