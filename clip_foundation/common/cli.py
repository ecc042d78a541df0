"""`--key=value` overrides for (nested) dataclass configs; unknown keys are rejected.

Keys are dotted paths (`--model.image.kind=timm`); any unique tail of a path may be used
instead (`--image.kind=timm`, `--epochs=3`). `--key value` and bare `--flag` (for
booleans) work too. Each field's help text is the `# comment` on its line in the source (or in
a base class's), or its metadata's "help".
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import warnings


def _error(message: str) -> ValueError:
    """clipModel's ConfigError (one error type for bad values, from the model floor up), imported when one is made:
    clipModel imports torch, and a query from the shell reads its command line without it (search/quick.py)."""
    from clipModel import ConfigError
    return ConfigError(message)


def __getattr__(name: str):  # cli.ConfigError, as callers have always caught it
    if name == "ConfigError":
        return type(_error(""))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def leaves(cfg, prefix: str = "") -> dict[str, tuple[object, dataclasses.Field]]:
    """Every non-dataclass field of `cfg`, by dotted path -> (owner object, field)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(leaves(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (cfg, f)
    return out


def leaves_values(cfg) -> dict[str, object]:
    """Every leaf field's current value, by dotted path."""
    return {path: getattr(owner, f.name) for path, (owner, f) in leaves(cfg).items()}


BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def parse_value(text: str, current):
    if isinstance(current, bool):
        if text.lower() not in BOOLEANS:
            raise _error(f"expected true/false, got {text!r}")
        return BOOLEANS[text.lower()]
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, tuple):
        return tuple(parse_value(t.strip(), current[0]) if current else t.strip()
                     for t in text.split(",") if t.strip())
    return text


def resolve_key(cfg, key: str, aliases: dict[str, str] | None = None) -> str:
    key = (aliases or {}).get(key, key).replace("-", "_")
    paths = leaves(cfg)
    if key in paths:
        return key
    matches = [p for p in paths if p.endswith("." + key)]  # e.g. image.width -> model.image.width
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise _error(f"--{key} is ambiguous: use one of " + ", ".join(f"--{m}" for m in matches))
    raise _error(f"unknown option --{key} (see --help)")


def _split_at_end_of_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """`argv` -> (the arguments before a `--`, the bare arguments after it)."""
    end = argv.index("--") if "--" in argv else len(argv)
    return argv[:end], argv[end + 1:]


def apply_overrides(cfg, argv: list[str], aliases: dict[str, str] | None = None):
    """Apply `--key=value` arguments to the dataclass `cfg` in place; return it. A `--` ends the
    options; this takes no bare argument after it (`parse` gives them to positional fields)."""
    argv, after = _split_at_end_of_options(argv)
    if after:
        raise _error(f"unexpected argument {after[0]!r}: this command takes no bare arguments")
    paths = leaves(cfg)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise _error(f"unexpected argument {arg!r}: options look like --key=value")
        key, eq, text = arg[2:].partition("=")
        path = resolve_key(cfg, key, aliases)
        owner, f = paths[path]
        current = getattr(owner, f.name)
        if not eq:  # "--key value", or a bare boolean flag
            if isinstance(current, bool) and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                text = "true"
            elif i + 1 < len(argv):
                i, text = i + 1, argv[i + 1]
            else:
                raise _error(f"--{key} needs a value")
        try:
            setattr(owner, f.name, parse_value(text, current))
        except ValueError as e:
            raise _error(f"--{path}: {e}") from None
        i += 1
    return cfg


def parse(cfg, argv: list[str] | None, usage: str, positional: tuple[str, ...] = (),
          aliases: dict[str, str] | None = None):
    """A script's whole command line -> `cfg` (a dataclass, filled in place and returned).

    `--key=value` (or `--key value`, `-k value`, a bare `--flag`) sets any field; bare arguments
    fill the `positional` fields in order; after `--` every argument is bare (a query may start
    with "-"). `--help` prints every field with its comment and exits; a mistake exits with one
    line and the usage."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = _split_at_end_of_options(argv)[0]
    if "-h" in options or "--help" in options:
        print(help_text(cfg, usage))
        raise SystemExit(0)
    try:
        return read(cfg, argv, positional, aliases)
    except ValueError as e:  # ConfigError: one line
        usage_error(str(e), usage)


def read(cfg, argv: list[str], positional: tuple[str, ...] = (), aliases: dict[str, str] | None = None):
    """`parse`'s reading of `argv` into `cfg`, without --help or exiting: ConfigError for a mistake."""
    argv, after = _split_at_end_of_options(list(argv))
    options, bare, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if len(arg) > 1 and arg.startswith("-") and not arg.startswith("--") and not arg[1:2].isdigit():
            arg = "-" + arg  # -n 9 is --n 9
        if not arg.startswith("--"):
            bare.append(arg)
        elif "=" in arg or i + 1 == len(argv):
            options.append(arg)
        else:  # "--key value" unless the key is a boolean flag
            path = resolve_key(cfg, arg[2:], aliases)
            owner, f = leaves(cfg)[path]
            takes_value = not isinstance(getattr(owner, f.name), bool) or argv[i + 1].lower() in BOOLEANS
            options += [arg, argv[i + 1]] if takes_value else [arg]
            i += takes_value
        i += 1
    bare += after
    if len(bare) > len(positional):
        raise _error(f"unexpected argument {bare[len(positional)]!r}")
    return apply_overrides(cfg, [f"--{k}={v}" for k, v in zip(positional, bare)] + options, aliases)


def usage_error(message: str, usage: str):
    """Exit as command lines do on a usage mistake: the message and the usage on stderr, status 2."""
    print(f"error: {message}\n{usage}", file=sys.stderr)
    raise SystemExit(2)


def field_comments(cls) -> dict[str, str]:
    """The trailing `# comment` of each field line in a dataclass's source and its bases' (a field
    inherited from a shared options class keeps its help; a subclass's own comment wins)."""
    import inspect
    comments = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # object, builtins, classes made at run time
            continue
        comments.update({m.group(1): m.group(2).strip()
                         for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", source, re.MULTILINE)})
    return comments


def field_help(owner, f: dataclasses.Field) -> str:
    """A field's help: its metadata's "help" (a string, or a function called now: help that lists
    what is registered when --help is shown), else its `# comment`."""
    doc = f.metadata.get("help") or field_comments(type(owner)).get(f.name, "")
    return doc() if callable(doc) else doc


def help_text(cfg, usage: str) -> str:
    lines = [usage, "", "options (--key=value; a unique tail of a key is enough, e.g. --image.kind):"]
    for path, (owner, f) in leaves(cfg).items():
        doc = field_help(owner, f)
        lines.append(f"  --{path}={getattr(owner, f.name)!r}".ljust(46) + f"  {doc}")
    return "\n".join(lines)


@contextlib.contextmanager
def _each_warning_shown(then):
    # within the block, every warning about to be shown goes to then(message, category, show): `show` shows it
    original = warnings.showwarning

    def hook(message, category, *args, **kwargs):
        then(message, category, lambda: original(message, category, *args, **kwargs))
    warnings.showwarning = hook
    try:
        yield
    finally:
        warnings.showwarning = original


@contextlib.contextmanager
def reported_warnings(category=UserWarning):
    """Print warnings of `category` as one plain line each (no source line) and collect them,
    so an entry point can list them again in its final summary."""
    seen = []

    def show(message, cat, original):
        if issubclass(cat, category):
            print(f"warning: {message}", file=sys.stderr)
            seen.append(str(message))
        else:
            original()
    with _each_warning_shown(show):
        yield seen


@contextlib.contextmanager
def shown_warnings():
    """The messages of the warnings shown inside the block, in order, each shown as it would be: UserWarnings'
    (what `reported_warnings` prints as one line each, and so what a memo can show again), None for other kinds."""
    shown = []

    def keep(message, category, original):
        shown.append(str(message) if issubclass(category, UserWarning) else None)
        original()
    with _each_warning_shown(keep):
        yield shown
