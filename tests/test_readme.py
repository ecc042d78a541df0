"""Every command the README and docs show is one the scripts accept as written: its options exist
and parse (nothing is run). Benchmark and tool scripts, which are not on the shared CLI, are
checked to exist."""
import re
import shlex
from pathlib import Path

import pytest

from clip_foundation.app import command as app
from clip_foundation.data import download
from clip_foundation.evaluate import command as evaluate
from clip_foundation.search import command as search
from clip_foundation import training as train
from clip_foundation.common import cli
from clip_foundation.training.presets import PRESETS
from clip_foundation.data.synthetic import SyntheticCommand

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands():
    """(page, command) for every `python ...` / `torchrun ...` line of a ```bash block."""
    found = []
    for page in PAGES:
        if not page.is_file():
            continue
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.split(r"\s#\s", line)[0].strip()
                for part in line.split("&&"):
                    part = part.strip()
                    if part.startswith(("python ", "torchrun ")) and not part.startswith(
                            ("python -m pytest", "python -m pip", "python -m venv", "python3 -m venv")):
                        found.append((page.name, part))
    return found


COMMANDS = shown_commands()


def test_the_pages_show_commands():
    scripts = {shlex.split(c)[1] for _, c in COMMANDS if c.startswith("python ")}
    assert {"train.py", "evaluate.py", "search.py", "download.py"} <= scripts


def check(args: list[str]):
    """Parse the arguments of one shown command with the real command line of its script."""
    script, args = args[0], args[1:]
    if script == "train.py":
        preset = [a for a in args if a.startswith("--preset")]
        for a in preset:
            assert a.split("=", 1)[1] in PRESETS
        rest = [a for a in args if not a.startswith(("--preset", "--resume"))]
        cli.apply_overrides(train.RunConfig(), rest, aliases=train.ALIASES)
    elif script == "evaluate.py":
        cli.parse(evaluate.EvalConfig(), args, evaluate.USAGE)
    elif script == "search.py":
        cli.parse(search.SearchConfig(), args, search.USAGE, positional=("query",))
    elif script == "app.py":
        cli.parse(app.AppConfig(), args, app.USAGE)
    elif script == "download.py":
        assert cli.parse(download.DownloadConfig(), args, download.USAGE, positional=("name",)).name in download.DATASETS
    elif script == "clip_foundation.synthetic":
        cli.parse(SyntheticCommand(), args, "")
    elif script == "clip_foundation.shards":
        from clip_foundation.data.shards import ShardsConfig
        assert cli.parse(ShardsConfig(), args, "", positional=("src", "out")).out
    elif script == "clip_foundation.export":
        from clip_foundation.engines.command import ExportConfig, USAGE
        cli.parse(ExportConfig(), args, USAGE, positional=("checkpoint",)).validate()
    elif script == "clip_foundation.embed":
        from clip_foundation.embed.writer import USAGE, EmbedConfig
        cli.parse(EmbedConfig(), args, USAGE).validate()
    elif script == "clip_foundation.hub":
        from clip_foundation.hub import USAGE, HubConfig
        assert cli.parse(HubConfig(), args, USAGE, positional=("action", "run_dir", "repo_id")).action in ("push", "card")
    elif script.startswith("benchmarks."):  # python -m benchmarks.NAME: it imports its sibling benchmarks
        assert (ROOT / (script.replace(".", "/") + ".py")).is_file(), f"{script} does not exist"
    else:
        assert (ROOT / script).is_file(), f"{script} does not exist"


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_shown_command_parses(page, command):
    words = shlex.split(command)
    if words[0] == "torchrun":  # its options, then the script (or -m module) and the script's
        words = words[next(i for i, w in enumerate(words) if w.endswith(".py") or w == "-m"):]
        words = words[1:] if words[0] == "-m" else words
    else:
        words = words[1:]
        if words[0] == "-m":
            words = words[1:]
    check(words)
