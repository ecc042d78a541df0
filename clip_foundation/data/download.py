"""Download Flickr8k / Flickr30k from Kaggle, and Karpathy's split files and MS-COCO from their
own sites, into the layouts the loaders read.

    python download.py flickr8k  [--dest=data] [--kaggle_json=PATH] [--force]
    python download.py flickr30k [--dest=data] [--kaggle_json=PATH] [--force]
    python download.py karpathy  [--dest=data]   # dataset_{flickr8k,flickr30k,coco}.json
    python download.py coco      [--dest=data]   # 2017 captions + images (19 GB)

Kaggle datasets use the `kaggle` package's Python API; the others are plain HTTP downloads
(resumed after an interruption). Each zip is unpacked safely (archive.py: no member may land outside
the destination, nor unpack to more than the free space or MAX_RATIO times its packed size), the
image and caption counts are checked, and only then is the folder moved into place. A dataset
folder that already has the expected counts is not downloaded again, nor is a zip that an
earlier run downloaded but could not unpack (no space, Ctrl-C).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clip_foundation.common import cli
from clip_foundation.data.archive import BadArchive, DownloadError, extract
from clip_foundation.data.webfetch import explain, url_fetch


@dataclass(frozen=True)
class Spec:
    slug: str        # Kaggle dataset id, owner/name; empty for a dataset fetched from `urls`
    images: str      # image folder, relative to the dataset folder; empty = none to count
    captions: str    # caption file, relative to the dataset folder; empty = none to count
    n_images: int    # at least this many *.jpg in `images`
    n_captions: int  # at least this many non-blank lines after the header in `captions`
    skip: tuple[str, ...] = ()  # archive members (prefixes) not worth extracting
    urls: tuple[str, ...] = ()  # zips fetched over HTTP instead of from Kaggle, all unpacked into one folder
    files: tuple[str, ...] = ()  # files and folders that must be there once unpacked
    then: str = ""   # the next step, printed once the folder is complete ({target}: the folder, {dest}: DEST)


# What the Kaggle uploads contain. Flickr30k's results.csv has 158,915 caption rows, but one
# (2199200615.jpg #4) lacks its second '|', so a parser that drops it sees 158,914: accept that.
# Its zip also nests a second copy of the images and the csv one level deeper: skip those.
DATASETS = {
    "flickr8k": Spec("adityajn105/flickr8k", "Images", "captions.txt", 8_091, 40_455),
    "flickr30k": Spec("hsankesara/flickr-image-dataset", "flickr30k_images/flickr30k_images",
                      "flickr30k_images/results.csv", 31_783, 158_914,
                      skip=("flickr30k_images/flickr30k_images/flickr30k_images/",
                            "flickr30k_images/flickr30k_images/results.csv")),
    # Karpathy & Fei-Fei's standard splits (CVPR 2015) of all three, as the retrieval papers use them
    "karpathy": Spec("", "", "", 0, 0,
                     urls=("https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",),
                     files=("dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json"),
                     then="copy a split file into its dataset's folder (e.g. cp {target}/dataset_flickr8k.json "
                          "{dest}/flickr8k/): that folder then reads with the standard split"),
    # MS-COCO 2017 from cocodataset.org: the caption annotations (other annotations skipped) and the
    # 123,287 images; dataset_coco.json finds its 2014 file names among them by COCO id
    "coco": Spec("", "train2017", "", 118_287, 0, skip=("annotations/instances_", "annotations/person_keypoints_"),
                 urls=tuple(f"http://images.cocodataset.org/{p}.zip" for p in
                            ("annotations/annotations_trainval2017", "zips/val2017", "zips/train2017")),
                 files=("annotations/captions_train2017.json", "annotations/captions_val2017.json", "val2017"),
                 then="the standard test is Karpathy's 5,000 images: put dataset_coco.json (download.py "
                      "karpathy) in {target}"),
}

NO_CREDENTIALS = ("No Kaggle credentials found: put kaggle.json in ~/.kaggle/ (mode 600), set "
                  "KAGGLE_USERNAME and KAGGLE_KEY, or pass --kaggle-json PATH "
                  "(from Python: kaggle_json=PATH or install_kaggle_json(...)).")


@dataclass(repr=False)
class Credentials:
    source: str                 # where they came from, for messages
    username: str | None = None
    key: str | None = None      # None: an API token that the kaggle package finds itself

    def __repr__(self) -> str:  # never the key, even in a traceback
        return f"Credentials(source={self.source!r}, username={self.username!r})"


def _parse_kaggle_json(data: bytes | dict, where: str) -> Credentials:
    try:
        obj = data if isinstance(data, dict) else json.loads(data)
        username, key = obj["username"], obj["key"]
        if not all(isinstance(v, str) and v.strip() for v in (username, key)):
            raise ValueError  # null or "" would reach Kaggle as the name "None" or nothing
    except (ValueError, KeyError, TypeError):  # messages of these could quote the file: drop them
        raise DownloadError(f"{where} is not a valid kaggle.json: it must be a JSON object with "
                            "non-empty \"username\" and \"key\" strings (get it at kaggle.com > "
                            "Settings > API)") from None
    return Credentials(where, username, key)


def _read_kaggle_json(path: Path) -> Credentials:
    if not path.is_file():
        raise DownloadError(f"kaggle.json not found at {path}: pass the file from "
                            "kaggle.com > Settings > API")
    # Warn like the kaggle client does; changing the user's file behind their back would not.
    if os.name != "nt" and path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        print(f"warning: {path} is readable by other users: run chmod 600 {path}", file=sys.stderr)
    return _parse_kaggle_json(path.read_bytes(), str(path))


def _config_dir() -> Path:
    return Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")


def find_credentials(kaggle_json: str | Path | None = None) -> Credentials:
    """Kaggle credentials from `kaggle_json`, else KAGGLE_USERNAME/KAGGLE_KEY, else kaggle.json
    in $KAGGLE_CONFIG_DIR, ~/.kaggle or ~/.config/kaggle, else a newer-style API token."""
    if kaggle_json is not None:
        return _read_kaggle_json(Path(kaggle_json).expanduser())
    username, key = os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY")
    if username and key:
        return Credentials("KAGGLE_USERNAME/KAGGLE_KEY", username, key)
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    for folder in (_config_dir(), Path.home() / ".kaggle", xdg / "kaggle"):
        if (folder / "kaggle.json").is_file():
            return _read_kaggle_json(folder / "kaggle.json")
    # kaggle 1.8+ also takes an API token; it reads these two places itself.
    if os.environ.get("KAGGLE_API_TOKEN"):
        return Credentials("KAGGLE_API_TOKEN")
    if (Path.home() / ".kaggle" / "access_token").is_file():
        return Credentials("~/.kaggle/access_token")
    raise DownloadError(NO_CREDENTIALS)


def install_kaggle_json(src: str | Path | bytes | dict) -> Path:
    """Write Kaggle credentials to ~/.kaggle/kaggle.json ($KAGGLE_CONFIG_DIR if set), mode 600.

    `src` is the path of a kaggle.json, its bytes, a {"username": ..., "key": ...} dict, or
    what Colab's `files.upload()` returns ({"kaggle.json": b"..."}). Returns the written path.
    """
    if isinstance(src, dict) and len(src) == 1 and "key" not in src:
        src = next(iter(src.values()))  # Colab upload: {filename: bytes}
    creds = (_read_kaggle_json(Path(src).expanduser()) if isinstance(src, (str, os.PathLike))
             else _parse_kaggle_json(src, "the given credentials"))
    folder = _config_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / "kaggle.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # the file may have existed with looser permissions
        json.dump({"username": creds.username, "key": creds.key}, f)
    print(f"Wrote Kaggle credentials for {creds.username} to {path}")
    return path


def kaggle_fetch(slug: str, out_dir: Path, creds: Credentials) -> None:
    """Download Kaggle dataset `slug` as a zip into `out_dir` with the kaggle package's API."""
    # `import kaggle` authenticates at import time (old releases raise without credentials,
    # newer ones print help), so hand it ours through its environment variables meanwhile.
    saved = {k: os.environ.get(k) for k in ("KAGGLE_USERNAME", "KAGGLE_KEY")}
    if creds.key is not None:
        os.environ.update(KAGGLE_USERNAME=creds.username, KAGGLE_KEY=creds.key)
    try:
        try:
            from kaggle.api.kaggle_api_extended import KaggleApi
        except ImportError as e:
            raise DownloadError(_import_hint(e)) from None
        api = KaggleApi()
        api.authenticate()  # reads the variables above into the instance; no network for a key
        # Not forced, so a later run resumes an interrupted download left in out_dir.
        api.dataset_download_files(slug, path=str(out_dir), quiet=False, unzip=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _import_hint(e: ImportError) -> str:
    # An installed kaggle can fail to import for want of a module it uses but does not
    # declare (kaggle 2.2 and `six`): name that module, not kaggle.
    missing = e.name or ""
    if not missing or missing == "kaggle" or missing.startswith("kaggle."):
        return f'The kaggle package is not installed ({e}): pip install "clip-foundation[kaggle]"'
    return (f"The kaggle package is installed but cannot be imported: it needs the module "
            f"{missing!r}, which is missing ({e}): pip install {missing.split('.')[0]}")


def _explain(e: BaseException, spec: Spec, target: Path, creds: Credentials) -> str:
    status = getattr(e, "status", None) or getattr(getattr(e, "response", None), "status_code", None)
    by_hand = (f"download https://www.kaggle.com/datasets/{spec.slug} on a machine with internet "
               f"and unzip it into {target}")
    if status in (401, 403) or isinstance(e, SystemExit):  # newer kaggle exits on unusable credentials
        return (f"Kaggle did not accept the credentials from {creds.source}"
                f"{f' (HTTP {status})' if status else ''}: create a new API token at "
                f"https://www.kaggle.com/settings and try again, or {by_hand}.")
    if status:
        return f"Kaggle answered HTTP {status} for {spec.slug}: try again later, or {by_hand}."
    packages = {c.__module__.split(".")[0] for c in type(e).__mro__}  # kaggle's HTTP stack
    if isinstance(e, (ConnectionError, TimeoutError)) or packages & {"requests", "urllib3", "socket", "ssl"}:
        return f"Could not reach Kaggle (network unavailable: {type(e).__name__}): {by_hand}."
    return f"Downloading {spec.slug} from Kaggle failed ({type(e).__name__}: {e}): {by_hand}."


def _scrub(text: str, creds: Credentials) -> str:
    for secret in (creds.key, os.environ.get("KAGGLE_API_TOKEN")):
        text = text.replace(secret, "***") if secret else text
    return text


def verify(name: str, root: str | Path, where: str | None = None) -> tuple[int, int]:
    """Check dataset folder `root` against DATASETS[name]; return (images, captions) found."""
    spec, root = DATASETS[name], Path(root)
    images, captions = root / spec.images, root / spec.captions
    n_img = sum(1 for e in os.scandir(images) if e.name.lower().endswith(".jpg")) if images.is_dir() else 0
    n_cap = 0
    if captions.is_file():
        with open(captions, "rb") as f:
            n_cap = max(sum(1 for line in f if line.strip()) - 1, 0)  # minus the header
    problems = []
    if spec.images and n_img < spec.n_images:
        problems.append(f"expected at least {spec.n_images:,} images in {spec.images}/, found {n_img:,}")
    if spec.captions and n_cap < spec.n_captions:
        problems.append(f"expected at least {spec.n_captions:,} captions in {spec.captions}, found {n_cap:,}")
    if missing := [f for f in spec.files if not (root / f).exists()]:
        problems.append(f"{', '.join(missing)} missing")
    if problems:
        raise DownloadError(f"{where or root} is incomplete: " + "; ".join(problems))
    return n_img, n_cap


def _found(spec: Spec, counts: tuple[int, int]) -> str:  # "8,091 images, 40,455 captions"
    parts = [f"{n:,} {what}" for n, what, counted in zip(counts, ("images", "captions"), (spec.images, spec.captions))
             if counted] or list(spec.files)
    return ", ".join(parts)


def _replace_dir(new: Path, target: Path) -> None:
    # Each rename is atomic, so `target` is the old folder or the complete new one, never a mix.
    old = target.with_name(f".{target.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _kaggle_archives(spec: Spec, work: Path, target: Path, kaggle_json, fetch) -> list[Path]:
    zips = sorted(work.glob("*.zip"))
    # A zip kept by a run that failed to extract it is complete (a partial one lacks the
    # central directory, which comes last): unpack it again rather than download it again.
    if len(zips) == 1 and zipfile.is_zipfile(zips[0]):
        print(f"Reusing {zips[0]}, downloaded by an earlier run")
        return zips
    creds = find_credentials(kaggle_json)
    work.mkdir(parents=True, exist_ok=True)
    print(f"Downloading {spec.slug} from Kaggle (credentials from {creds.source})")
    try:
        (fetch or kaggle_fetch)(spec.slug, work, creds)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - any kaggle failure becomes one sentence
        if not any(work.iterdir()):
            work.rmdir()  # keep only a partial zip, which kaggle resumes next time
        msg = str(e) if isinstance(e, DownloadError) else _explain(e, spec, target, creds)
        raise DownloadError(_scrub(msg, creds)) from None
    zips = sorted(work.glob("*.zip"))
    if len(zips) != 1:
        shutil.rmtree(work, ignore_errors=True)
        raise DownloadError(f"expected one .zip from Kaggle in {work}, found {len(zips)}")
    return zips


def _web_archives(spec: Spec, work: Path, target: Path, fetch) -> list[Path]:
    work.mkdir(parents=True, exist_ok=True)
    archives = [work / url.rsplit("/", 1)[1] for url in spec.urls]
    for url, archive in zip(spec.urls, archives):
        if zipfile.is_zipfile(archive):  # complete: kept by a run that could not unpack it
            print(f"Reusing {archive}, downloaded by an earlier run")
            continue
        print(f"Downloading {url}")
        try:
            (fetch or url_fetch)(url, work, None)
        except Exception as e:  # noqa: BLE001 - any network failure becomes one sentence
            if not any(work.iterdir()):
                work.rmdir()  # keep only finished zips and partial ones, which the next run resumes
            by_hand = f"download {url} on a machine with internet and unzip it into {target}"
            raise DownloadError(str(e) if isinstance(e, DownloadError) else explain(e, url, by_hand)) from None
    return archives


def download(name: str, dest: str | Path = "data", kaggle_json: str | Path | None = None,
             force: bool = False, fetch: Callable[[str, Path, Credentials | None], None] | None = None) -> Path:
    """Download dataset `name` (see DATASETS) to `dest/name`; return that folder.

    A folder that already has the expected counts is returned untouched unless `force`.
    `fetch(slug, out_dir, credentials)` must leave the dataset's zip in `out_dir`; it
    defaults to the kaggle API (`kaggle_fetch`), or for a dataset with `urls` to
    `url_fetch(url, out_dir, None)`, once per URL. Raises DownloadError with what to do.
    A zip that failed to unpack through no fault of its own stays in `dest/.NAME-download`
    and the next call unpacks it without downloading; a corrupt or refused one is deleted.
    """
    if name not in DATASETS:
        raise DownloadError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    spec, dest = DATASETS[name], Path(dest).expanduser()
    target = dest / name
    then = f"next: {spec.then.format(target=target, dest=dest)}" if spec.then else ""
    if target.exists() and not force:
        try:
            print(f"{target}: already complete ({_found(spec, verify(name, target))})" + (f"; {then}" if then else ""))
            return target
        except DownloadError as e:
            print(f"{e}; downloading it again")
    work = dest / f".{name}-download"  # a fixed name, so a partial download resumes here
    if force:
        shutil.rmtree(work, ignore_errors=True)
    archives = (_web_archives(spec, work, target, fetch) if spec.urls
                else _kaggle_archives(spec, work, target, kaggle_json, fetch))
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-extract-", dir=dest))  # same filesystem
    try:
        for archive in archives:
            extract(archive, tmp, spec.skip)
        try:
            counts = verify(name, tmp, where=f"the archive of {spec.slug or name}")
        except DownloadError as e:  # intact but not the expected content: reusing it cannot help
            raise BadArchive(str(e)) from None
        _replace_dir(tmp, target)
    except BadArchive:  # corrupt, refused (path, link, bomb) or wrong counts: download it anew
        shutil.rmtree(work, ignore_errors=True)
        raise
    except (DownloadError, OSError) as e:  # the destination failed (no space, permissions), not the zip
        reason = e if isinstance(e, DownloadError) else f"could not extract {archive.name} into {dest} ({e})"
        kept = f"archive at {archive}" if len(archives) == 1 else f"archives in {work}"
        raise DownloadError(f"{reason}; kept the downloaded {kept}, so running this "
                            "again extracts it without downloading it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    print(f"{target}: {_found(spec, counts)}")
    if then:
        print(then)
    return target


@dataclass
class DownloadConfig:
    name: str = ""  # the dataset (the first bare argument): flickr8k, flickr30k (Kaggle), karpathy or coco
    dest: str = "data"  # parent folder: the dataset lands in DEST/NAME
    kaggle_json: str = ""  # kaggle.json to use; empty = ~/.kaggle, KAGGLE_USERNAME/KAGGLE_KEY, ...
    force: bool = False  # download even if the folder is already complete


USAGE = f"usage: python download.py {{{','.join(sorted(DATASETS))}}} [--dest=data] [--kaggle_json=PATH] [--force]"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    args = cli.parse(DownloadConfig(), argv, USAGE, positional=("name",))
    if args.name not in DATASETS:
        cli.usage_error(f"invalid choice {args.name!r}: pick one of {', '.join(sorted(DATASETS))}", USAGE)
    try:
        download(args.name, args.dest, args.kaggle_json or None, args.force)
    except (DownloadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from clip_foundation.commands import run
    raise SystemExit(run("download", main))  # this module's main, not a second copy of it
