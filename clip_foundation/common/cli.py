"""`--key=value` overrides for (nested) dataclass configs; unknown keys are rejected.

Keys are dotted paths (`--model.image.kind=timm`); any unique tail of a path may be used
instead (`--image.kind=timm`, `--epochs=3`). `--key value` and bare `--flag` (for
booleans) work too. Each field's help text is the `# comment` on its line in the source (or in
a base class's), or its metadata's "help".
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import sys
import warnings

from clipModel import ConfigError  # one error type for bad values, from the model floor up


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
            raise ConfigError(f"expected true/false, got {text!r}")
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
        raise ConfigError(f"--{key} is ambiguous: use one of " + ", ".join(f"--{m}" for m in matches))
    raise ConfigError(f"unknown option --{key} (see --help)")


def _split_at_end_of_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """`argv` -> (the arguments before a `--`, the bare arguments after it)."""
    end = argv.index("--") if "--" in argv else len(argv)
    return argv[:end], argv[end + 1:]


def apply_overrides(cfg, argv: list[str], aliases: dict[str, str] | None = None):
    """Apply `--key=value` arguments to the dataclass `cfg` in place; return it. A `--` ends the
    options; this takes no bare argument after it (`parse` gives them to positional fields)."""
    argv, after = _split_at_end_of_options(argv)
    if after:
        raise ConfigError(f"unexpected argument {after[0]!r}: this command takes no bare arguments")
    paths = leaves(cfg)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --key=value")
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
                raise ConfigError(f"--{key} needs a value")
        try:
            setattr(owner, f.name, parse_value(text, current))
        except ValueError as e:
            raise ConfigError(f"--{path}: {e}") from None
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
    argv, after = _split_at_end_of_options(argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(cfg, usage))
        raise SystemExit(0)
    options, bare, i = [], [], 0
    try:
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
            raise ConfigError(f"unexpected argument {bare[len(positional)]!r}")
        return apply_overrides(cfg, [f"--{k}={v}" for k, v in zip(positional, bare)] + options, aliases)
    except ConfigError as e:
        usage_error(str(e), usage)


def usage_error(message: str, usage: str):
    """Exit as command lines do on a usage mistake: the message and the usage on stderr, status 2."""
    print(f"error: {message}\n{usage}", file=sys.stderr)
    raise SystemExit(2)


def field_comments(cls) -> dict[str, str]:
    """The trailing `# comment` of each field line in a dataclass's source and its bases' (a field
    inherited from a shared options class keeps its help; a subclass's own comment wins)."""
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
def reported_warnings(category=UserWarning):
    """Print warnings of `category` as one plain line each (no source line) and collect them,
    so an entry point can list them again in its final summary."""
    seen, original = [], warnings.showwarning

    def show(message, cat, *args, **kwargs):
        if issubclass(cat, category):
            print(f"warning: {message}", file=sys.stderr)
            seen.append(str(message))
        else:
            original(message, cat, *args, **kwargs)

    warnings.showwarning = show
    try:
        yield seen
    finally:
        warnings.showwarning = original
