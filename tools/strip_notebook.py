"""Keep notebooks stored without outputs, so their diffs show only what people wrote.

    python tools/strip_notebook.py                 # strip build_model.ipynb in place
    python tools/strip_notebook.py --check         # exit 1 if it holds outputs (tests and CI run this)
    python tools/strip_notebook.py A.ipynb B.ipynb

Stripping empties every code cell's outputs and execution count, keeps only the "tags" of a
cell's metadata (tests use them) and only the kernel, language and Colab GPU settings of the
notebook's metadata, and writes the JSON the way Jupyter does (indent 1, sorted keys), so that
saving from Jupyter or Colab and stripping again gives the same bytes. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = [ROOT / "build_model.ipynb"]
CELL_METADATA = ("tags",)  # kept on cells; everything else (collapsed, scrolled, ExecuteTime, colab ids) goes
NOTEBOOK_METADATA = {  # kept on the notebook: key -> sub-keys kept (None: all of it)
    "kernelspec": None,
    "language_info": ("name",),
    "accelerator": None,  # Colab opens the notebook on a GPU runtime
    "colab": ("gpuType",),  # provenance, toc state, ... go
}


def strip(nb: dict) -> dict:
    """The notebook `nb` without outputs, execution counts or volatile metadata (a new dict)."""
    nb = json.loads(json.dumps(nb))
    for cell in nb.get("cells", []):
        cell["metadata"] = {k: v for k, v in cell.get("metadata", {}).items() if k in CELL_METADATA and v}
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        else:
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
            if cell.get("attachments") == {}:
                cell.pop("attachments")
    meta = nb.get("metadata", {})
    kept = {}
    for key, sub in NOTEBOOK_METADATA.items():
        if key in meta:
            value = meta[key]
            if sub is not None and isinstance(value, dict):
                value = {k: v for k, v in value.items() if k in sub}
            if value not in ({}, None):
                kept[key] = value
    nb["metadata"] = kept
    return nb


def dumps(nb: dict) -> str:
    """Jupyter's own on-disk format (nbformat.writes): indent 1, sorted keys, UTF-8, final newline."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False, separators=(",", ": ")) + "\n"


def problems(text: str) -> list[str]:
    """What stripping would change in a notebook's file text (empty: it is stored clean)."""
    nb = json.loads(text)
    found = []
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("outputs"):
            found.append(f"cell {i}: {len(cell['outputs'])} stored outputs")
        if cell.get("execution_count") is not None:
            found.append(f"cell {i}: execution count {cell['execution_count']}")
        extra = set(cell.get("metadata", {})) - set(CELL_METADATA)
        if extra:
            found.append(f"cell {i}: metadata {sorted(extra)}")
    if not found and dumps(strip(nb)) != text:
        found.append("notebook metadata or JSON layout differs from the stripped form")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Strip outputs from notebooks, or check that they are stripped.")
    p.add_argument("paths", nargs="*", type=Path, help="notebooks (default: build_model.ipynb)")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook is not stripped")
    args = p.parse_args(argv)
    status = 0
    for path in args.paths or DEFAULT:
        text = path.read_text(encoding="utf-8")
        if args.check:
            found = problems(text)
            if found:
                status = 1
                print(f"{path}: not stripped ({'; '.join(found[:5])}{'; ...' if len(found) > 5 else ''}); "
                      f"run: python tools/strip_notebook.py {path}", file=sys.stderr)
        else:
            clean = dumps(strip(json.loads(text)))
            if clean != text:
                path.write_text(clean, encoding="utf-8")
                print(f"stripped {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
