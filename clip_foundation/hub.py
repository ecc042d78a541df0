"""Share a model on the Hugging Face Hub: publish a run folder with its model card.

    python -m clip_foundation.hub push runs/NAME user/repo [--private=true] [--token=...]
    python -m clip_foundation.hub card runs/NAME [--license=apache-2.0]   # (re)write RUN/README.md only

A push creates the repo if needed and uploads, in one commit, what a user of the model needs:
the weights, config.json (with no path of this machine), the tokenizer files, the HF towers'
configs, the querybank, the card (README.md: the one clip-foundation wrote is rewritten with the
repo id and the run's current metrics, one someone wrote or edited is sent as it is), metrics.json
and the figures; never last/ (the training state), index/, tensorboard/ or other caches. The run
folder is changed only once the push went through (its card then names the repo). The token
is --token, else HF_TOKEN, else the one `hf auth login` saved. Loading needs nothing from
here: `CLIPModel.from_pretrained("user/repo")` reads the repo through the Hub's cache.

Why not huggingface_hub's `ModelHubMixin` / `PyTorchModelHubMixin`: they would own
`save_pretrained` / `from_pretrained` and write the constructor's arguments as config.json,
while `CLIPModel` is built from a `CLIPConfig` dataclass plus a tokenizer object, its folder
holds a tokenizer and the HF towers' configs beside the weights, and a run's config.json nests
the model config beside the data and training configs. Their download fetches config.json and
model.safetensors one by one (the rest would need overriding anyway), their push uploads a
fresh save of the model, not a run folder with its metrics and figures, and as base classes they
would make clipModel.py import huggingface_hub when it loads. So `from_pretrained` calls
`snapshot_download`, and this module calls `HfApi().create_repo` + `upload_folder`.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from clipModel import CheckpointError, CLIPConfig, CLIPModel, public_path

from clip_foundation.common import cli
from clip_foundation.common.files import atomic_write
from clip_foundation.evaluate.modelcard import CARD, check_repo_id, published_name, write_model_card, written_here

UPLOAD = ["config.json", "model.safetensors", CARD, "metrics.json", "curves.png", "matches.png",
          "querybank.safetensors", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
          "merges.txt", "*.model", "image_encoder/*", "text_encoder/*"]  # upload_folder's allow_patterns
SKIP = ["last/*", "last.tmp/*", "index/*", "tensorboard/*", "cache/*", ".*", "*/.*"]  # its ignore_patterns
# (patterns match paths relative to the run folder, and * crosses folders: SKIP keeps last/ out)


class HubError(RuntimeError):
    """A push that could not happen (offline, no network, refused token, bad repo id): one line."""


@dataclass
class HubConfig:
    action: str = ""  # push (publish the run folder) | card (write RUN/README.md only)
    run_dir: str = ""  # the run folder (any folder written by CLIPModel.save_pretrained)
    repo_id: str = ""  # push: the Hub repo, user/name (created when missing)
    private: bool = False  # push: create the repo private
    token: str = ""  # push: a Hub token with write access; empty = HF_TOKEN or the one `hf auth login` saved
    license: str = ""  # the card's licence (a Hub licence id); empty = inferred from the towers' weights
    card: str = "auto"  # push: auto (rewrite README.md with the repo id if clip-foundation wrote it) | true | false
    commit_message: str = ""  # push: the commit's message; empty = "Upload RUN_NAME"


USAGE = ("usage: python -m clip_foundation.hub push RUN_DIR USER/REPO [--private=true] [--token=...]\n"
         "       python -m clip_foundation.hub card RUN_DIR [--license=ID]")


def files_to_push(run_dir) -> list[str]:
    """The run folder's files a push uploads (relative paths), selected by UPLOAD and SKIP with
    the function `upload_folder` selects them with."""
    from huggingface_hub.utils import filter_repo_objects
    run_dir = Path(run_dir)
    files = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    return list(filter_repo_objects(files, allow_patterns=UPLOAD, ignore_patterns=SKIP))


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a Hub call raises when the Hub cannot be reached or refuses: the hub's own errors are
    OSErrors (offline mode, HTTP errors) or ValueErrors (a bad repo id); its HTTP client's
    connection errors are neither."""
    errors = [OSError, ValueError]
    for module in ("httpx2", "httpx"):  # huggingface_hub's HTTP client, by version
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _why(e: BaseException) -> str:
    from huggingface_hub import constants
    status = getattr(getattr(e, "response", None), "status_code", None)
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so nothing is sent: unset it to push"
    if status in (401, 403):
        return (f"the Hub refused the token ({status}): pass --token=... with write access, set HF_TOKEN, "
                "or run `hf auth login`")
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def push_to_hub(model_or_run_dir, repo_id: str, *, private: bool = False, token: str | None = None,
                license: str | None = None, card: bool | None = None, commit_message: str | None = None) -> str:
    """Publish a run folder (or a `CLIPModel`, saved to a temporary folder first) as Hub model repo
    `repo_id`, created if missing; -> the commit's URL. README.md is (re)written with the repo id
    when `card` is True, or when it is None and the card is missing or the one clip-foundation
    wrote (a card someone wrote or edited is sent as it is, with a warning); the run folder's copy
    is replaced only once the push went through. HubError (one line) for a bad repo id, or when the
    Hub cannot be reached or refuses."""
    if isinstance(model_or_run_dir, CLIPModel):
        with tempfile.TemporaryDirectory() as tmp:
            model_or_run_dir.save_pretrained(tmp)
            return push_to_hub(tmp, repo_id, private=private, token=token, license=license, card=card,
                               commit_message=commit_message)
    try:
        check_repo_id(repo_id)  # first: an id the Hub would refuse is not the network's fault, nor the card's
    except ValueError as e:
        raise HubError(str(e)) from None
    run_dir = Path(model_or_run_dir)
    if not (run_dir / "model.safetensors").is_file() or not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: nothing to push (a model folder has config.json and model.safetensors)")
    CLIPConfig.from_pretrained(run_dir)  # CheckpointError for a config.json that no load would accept
    if card is None and (run_dir / CARD).is_file() and not written_here(run_dir / CARD):
        warnings.warn(f"{run_dir / CARD} is not the card clip-foundation wrote (or it was edited): sent as it is; "
                      "--card=true replaces it", stacklevel=2)
        card = False
    rewrite = card is not False or not (run_dir / CARD).is_file()
    from huggingface_hub import HfApi
    api = HfApi(token=token or None)
    with tempfile.TemporaryDirectory() as staged:
        _stage(run_dir, Path(staged))
        if rewrite:  # into the staged copy: the run folder changes only once the push went through
            write_model_card(run_dir, repo_id=repo_id, license=license, to=staged)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(repo_id=repo_id, folder_path=staged, repo_type="model",
                                       commit_message=commit_message or f"Upload {run_dir.resolve().name}")
        except _network_errors() as e:
            raise HubError(f"could not push {run_dir} to the Hub repo {repo_id}: {_why(e)}") from None
        if rewrite:
            atomic_write(run_dir / CARD, lambda tmp: shutil.copyfile(Path(staged) / CARD, tmp))
    return str(getattr(commit, "commit_url", commit))


def _stage(run_dir: Path, staged: Path) -> None:
    """The files a push uploads, linked (or copied) into `staged`, with a config.json whose
    paths on this machine (data, cache and output folders, a timm weights file, in lists too) are
    cut to their last part and whose towers are named by public names (`published_name`): a
    published model should not tell the world its author's folders, and no load reads them (a
    saved HF tower is rebuilt from its own folder in the repo)."""
    for name in files_to_push(run_dir):
        (staged / name).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(run_dir / name, staged / name)
        except OSError:  # another file system, or no hard links: a copy
            shutil.copy2(run_dir / name, staged / name)
    config = json.loads((run_dir / "config.json").read_text())
    public = _without_local_paths(config)
    for tower in ("image", "text"):
        if isinstance(config["model"].get(tower), dict) and "name" in config["model"][tower]:
            public["model"][tower]["name"] = published_name(config["model"][tower], tower)
    (staged / "config.json").unlink()
    (staged / "config.json").write_text(json.dumps(public, indent=2))


def _without_local_paths(value):
    if isinstance(value, dict):
        return {k: _without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(v) for v in value]
    return public_path(value) if isinstance(value, str) else value


def main(argv=None):
    """The command line; returns the commit URL (push) or the card's path (card)."""
    args = cli.parse(HubConfig(), argv, USAGE, positional=("action", "run_dir", "repo_id"))
    if args.action not in ("push", "card"):
        cli.usage_error(f"the first argument is push or card, not {args.action!r}", USAGE)
    if not args.run_dir or (args.action == "push" and not args.repo_id):
        cli.usage_error("push needs RUN_DIR and USER/REPO" if args.action == "push" else "card needs RUN_DIR", USAGE)
    if args.card.lower() not in ("auto", *cli.BOOLEANS):
        cli.usage_error(f"--card={args.card!r}: must be auto, true or false", USAGE)
    card = None if args.card.lower() == "auto" else cli.BOOLEANS[args.card.lower()]
    with cli.reported_warnings():  # metrics left out of the card, a card sent as it is: one line each
        try:
            if args.action == "card":
                if not Path(args.run_dir, "config.json").is_file():
                    raise FileNotFoundError(f"{args.run_dir} has no config.json: not a run folder")
                path = write_model_card(args.run_dir, license=args.license or None)
                print(f"wrote {path}")
                return path
            url = push_to_hub(args.run_dir, args.repo_id, private=args.private, token=args.token or None,
                              license=args.license or None, card=card, commit_message=args.commit_message or None)
        except (HubError, CheckpointError, OSError) as e:
            sys.exit(f"error: {e}")
    print(f"pushed {', '.join(files_to_push(args.run_dir))} -> {url}")
    return url


if __name__ == "__main__":
    from clip_foundation.commands import run
    raise SystemExit(run("hub", main))  # this module's main, not a second copy of it
