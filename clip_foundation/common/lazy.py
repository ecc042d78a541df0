"""Public names served from the modules that define them, imported on first use (PEP 562): a package's
face lists its API without importing torch, training or search code before anyone asks for it."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, where: dict[str, str]):
    """-> (__getattr__, __dir__) for `package`'s __init__: `where` maps each public name to the module
    (relative to the package, e.g. ".loop") that defines it."""
    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value  # looked up once
        return value

    def __dir__():
        return sorted(where)

    return __getattr__, __dir__
