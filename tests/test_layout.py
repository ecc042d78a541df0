"""The project's shape: scripts at the root over one library package, imports pointing one way,
no cycles, a small public API, and `eval_mode` restoring every module's own mode."""
import ast
import functools
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "clip_foundation"
SCRIPTS = {"train", "evaluate", "search", "download", "app"}  # entry points
MODEL = {"clipModel", "hf_towers", "timm_towers", "scratch_towers"}  # the model file, and its tower kinds


@functools.cache
def modules() -> dict[str, Path]:
    """Every project module by dotted name: the root's scripts and model, and the package tree (a
    subpackage's `__init__.py` is the subpackage itself)."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    for p in (ROOT / PACKAGE).rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `name` imports anywhere in its file (lazy imports included)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package, up `level - 1` packages
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known}
    out.discard(name)
    return out


@functools.cache
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def subpackage(name: str) -> str | None:
    """clip_foundation.data.records -> "data"; None for the package's own top-level modules."""
    parts = name.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    return parts[1] if (ROOT / PACKAGE / parts[1]).is_dir() else None


def test_only_scripts_at_the_root():
    root = {p.stem for p in ROOT.glob("*.py")}
    assert root <= SCRIPTS | MODEL, f"library modules belong in {PACKAGE}/: {root - SCRIPTS - MODEL}"


def test_library_never_imports_a_script():
    for name, targets in graph().items():
        if name.startswith(PACKAGE) or name in MODEL:
            assert not targets & SCRIPTS, f"{name} imports the script(s) {targets & SCRIPTS}"


def first_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A path a -> ... -> a through `edges` (node -> the nodes it imports), or None."""
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_no_import_cycles():
    cycle = first_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycles_between_subpackages():
    # data -> search -> data would tie two rooms into one: a subpackage may lean on another only one way
    edges: dict[str, set[str]] = {}
    for name, targets in graph().items():
        here = subpackage(name)
        if here:
            edges.setdefault(here, set()).update(t for t in map(subpackage, targets) if t and t != here)
    cycle = first_cycle(edges)
    assert cycle is None, "subpackages import each other: " + " -> ".join(cycle)


def test_the_package_is_rooms_of_readable_size():
    # at most ~12 modules in any one folder of the package, none over 450 lines; each subpackage says
    # in its __init__ docstring what lives there
    folders: dict[Path, list[Path]] = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        folders.setdefault(path.parent, []).append(path)
        lines = len(path.read_text().splitlines())
        assert lines <= 450, f"{path.relative_to(ROOT)} has {lines} lines"
    for folder, files in folders.items():
        assert len([f for f in files if f.name not in ("__init__.py", "__main__.py")]) <= 12, folder
        if folder != ROOT / PACKAGE:
            assert ast.get_docstring(ast.parse((folder / "__init__.py").read_text())), f"{folder} has no docstring"


def test_clip_model_exports_a_small_api():
    import clipModel
    assert "torch" not in clipModel.__all__ and "json" not in clipModel.__all__
    assert len(clipModel.__all__) <= 20
    for name in clipModel.__all__:
        assert getattr(clipModel, name).__doc__, f"clipModel.{name} has no docstring"


@pytest.mark.parametrize("start_training", [True, False])
def test_eval_mode_restores_every_module_even_after_an_exception(start_training):
    from clip_foundation.evaluate.metrics import eval_mode
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(2))
    model.train(start_training)
    model[2].eval()  # a frozen part kept in eval mode inside a training model
    before = [m.training for m in model.modules()]
    with pytest.raises(KeyboardInterrupt):
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise KeyboardInterrupt  # a notebook user interrupting an embedding cell
    assert [m.training for m in model.modules()] == before


def test_the_library_uses_only_the_models_public_names():
    # the model file's private parts (its registries, loaders, readers) stay free to change
    import clipModel
    for name, path in modules().items():
        if name.startswith(PACKAGE) or name in SCRIPTS:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module == "clipModel":
                    private = {a.name for a in node.names} - set(clipModel.__all__)
                    assert not private, f"{name} imports clipModel's non-public {sorted(private)}"


def test_the_model_floor_imports_nothing_of_the_library():
    for name in MODEL:
        assert not {t for t in graph()[name] if t.startswith(PACKAGE)}, f"{name}.py must stand without the library"
    assert len((ROOT / "clipModel.py").read_text().splitlines()) <= 700, "clipModel.py is the file a learner opens"


def test_root_scripts_are_command_lines_over_their_library_module():
    # each runs its library module's main the one way every command runs: commands.run (its
    # warnings and exit status as the installed clip-* command's)
    for script in SCRIPTS:
        path = ROOT / f"{script}.py"
        imports = imports_of(script, path, set(modules()))
        assert imports == {f"{PACKAGE}.commands"}, f"{script}.py imports {imports}"
        assert f'run("{script}")' in path.read_text(), f"{script}.py does not run its own command"


def _imported_modules(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add((node.module or "").split(".")[0])
    return found


def test_readme_and_notebook_import_no_script():
    import json
    import re
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    cells = ["".join(c["source"]) for c in json.loads((ROOT / "build_model.ipynb").read_text())["cells"]
             if c["cell_type"] == "code"]
    for code in blocks + cells:
        # IPython's %magic and !shell lines are not Python: a `pass` keeps their blocks valid
        code = "\n".join(line[:len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!"))
                         else line for line in code.splitlines())
        tree_imports = _imported_modules(code)
        assert not tree_imports & SCRIPTS, f"imports a script: {tree_imports & SCRIPTS}\n{code[:200]}"


def test_no_sys_path_edits_outside_tests():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if "tests" not in p.relative_to(ROOT).parts and not p.relative_to(ROOT).parts[0].startswith((".", "build"))
                 and "sys.path" in p.read_text()]
    notebook = (ROOT / "build_model.ipynb").read_text()
    assert not offenders and "sys.path" not in notebook, offenders


def test_tower_kinds_are_told_apart_only_by_their_adapters():
    # a new tower kind is one adapter class in clipModel.py: nobody switches on `kind`; the model
    # looks an adapter up by it in one place (clipModel._adapter)
    for name, path in modules().items():
        source = path.read_text()
        switches = re.findall(r"^.*\.kind\s*(?:==|!=|in\b).*$", source, flags=re.M)
        allowed = ['    check(cfg.kind in kinds, f"{tower}.kind", cfg.kind, "one of " + ", ".join(kinds))']
        assert [s for s in switches if s not in allowed] == [], f"{name} switches on a tower's kind"


@pytest.mark.parametrize("command", ["train", "evaluate", "search", "app", "download", "hub", "embed"])
def test_an_installed_command_exits_0_when_its_main_returns_results(command, monkeypatch):
    # a console script passes its function's return value to sys.exit: a metrics dict would exit 1
    import importlib
    from clip_foundation import commands
    monkeypatch.setattr(importlib.import_module(commands.MODULES[command]), "main", lambda: {"R@1": 50.0})
    assert getattr(commands, command)() == 0


@pytest.mark.slow  # a fresh interpreter
def test_the_public_api_is_the_readmes_and_each_name_is_documented():
    # what a notebook writes: `from clip_foundation import Gallery`; the README's API section lists it
    import subprocess
    import sys

    import clip_foundation
    api = (ROOT / "README.md").read_text().split("## API", 1)[1].split("\n## ", 1)[0]
    for name in clip_foundation.__all__:
        assert re.search(rf"\b{name}\b", api), f"{name} is missing from the README's API section"
        assert getattr(clip_foundation, name).__doc__, f"clip_foundation.{name} has no docstring"
    # importing the package imports no training, search or page code: each name is loaded on first use
    loaded = subprocess.run([sys.executable, "-c", "import sys, clip_foundation; print(' '.join(sys.modules))"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert not [m for m in loaded if m.startswith(("clip_foundation.training", "clip_foundation.search",
                                                   "clip_foundation.app", "gradio"))]


def test_training_imports_search_only_in_the_step_its_command_composes():
    # train() ends at the tested run folder; indexing and query grids are the command's next step
    for name, targets in graph().items():
        if subpackage(name) == "training" and name != f"{PACKAGE}.training.command":
            assert not [t for t in targets if subpackage(t) == "search"], f"{name} imports search"
