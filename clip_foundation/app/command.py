"""A search page in the browser: type a phrase and see the gallery images that match it, drop in a
photo and see the captions and zero-shot labels that fit it (the library side, `SearchPage`:
clip_foundation/app/page.py).

    python app.py --checkpoint=runs/NAME                        # the run's test images, on http://127.0.0.1:7860
    python app.py --checkpoint=runs/NAME --gallery=PHOTOS       # any folder of your own photos
    python app.py --checkpoint=runs/NAME --split=all --port=8080
    python app.py --index=DIR                                   # a prebuilt index (search.py --build_index), of any size
    python app.py --help                                        # every option

The gallery is embedded once (a progress bar; cached in CHECKPOINT/index/ like search.py's) and
every query reuses it. The server listens on 127.0.0.1 only unless --host or --share is given;
--auth=FILE (lines of user:password, or CLIP_APP_AUTH=user:password in the environment) asks for
a login. The options and the address are checked before the model is loaded.
"""
from __future__ import annotations

import errno
import functools
import math
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from clip_foundation.common import cli
from clip_foundation.common.files import digests_held
from clip_foundation.data.splits import SPLITS
from clip_foundation.engines.options import ModelOptions, checked_device
from clip_foundation.engines.lazy import load_model
from clip_foundation.engines.registry import use_engine
from clip_foundation.data.records import DataError
from clipModel import check, model_folder


@dataclass
class AppConfig(ModelOptions):  # --checkpoint, --device, --engine
    gallery: str = ""  # a folder of images to search (every image in it); instead of --data/--split
    index: str = ""  # a prebuilt index folder (search.py --build_index, of any size) to search instead; --checkpoint defaults to its own
    data: str = ""  # dataset folder; empty = the one the run trained on
    split: str = "test"  # train | val | test as the run split the data, or all
    captions: str = "train"  # image -> text candidates: train (the run's), gallery, or a file of lines
    backend: str = "auto"  # auto (FAISS for large galleries when installed) | exact | faiss
    host: str = "127.0.0.1"  # address to listen on; 0.0.0.0 opens the page to the network
    port: int = 0  # 0 = the first free port from 7860
    share: bool = False  # also make a public gradio.live link (needs the internet)
    max_upload_mb: float = 10.0  # larger uploads are refused
    auth: str = ""  # a file of user:password lines (chmod 600) the page asks to log in with; or set CLIP_APP_AUTH
    threads: int = 1  # threads per query: 1 on a shared CPU (2 were up to 70x slower under load); the cores of an idle server are faster (docs/search.md)

    def validate(self) -> None:
        """Raise ConfigError (one line: the option, its value, the allowed range) for a value out of range;
        --engine and --device as every command checks them (`ModelOptions`)."""
        check(self.threads >= 1, "threads", self.threads, ">= 1")
        super().validate()


USAGE = ("usage: python app.py --checkpoint=RUN [--gallery=DIR | --data=DIR --split=test] "
         "[--host=ADDR --port=N --auth=FILE]  |  --index=DIR [--checkpoint=RUN]")
AUTH_ENV = "CLIP_APP_AUTH"  # user:password (one login) when no --auth file is given


def logins(text: str, source: str) -> list[tuple[str, str]]:
    """`user:password` lines (blank lines and # comments skipped) -> Gradio's `auth` list; a
    malformed line is a ValueError naming `source` and the line, never the password."""
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            user, colon, password = line.strip().partition(":")
            if not (colon and user and password):
                raise ValueError(f"{source}:{number}: expected user:password")
            pairs.append((user, password))
    if not pairs:
        raise ValueError(f"{source}: no user:password line")
    return pairs


def read_auth(path: str) -> list[tuple[str, str]] | None:
    """The page's logins: from the --auth file, else from $CLIP_APP_AUTH, else None (no login)."""
    if path:
        try:
            return logins(Path(path).read_text(encoding="utf-8"), path)
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--auth={path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if os.environ.get(AUTH_ENV):
        return logins(os.environ[AUTH_ENV], AUTH_ENV)
    return None


def check_address(host: str, port: int) -> None:
    """Bind `host`:`port` (port 0: any) for a moment, so a wrong address or a port in use is one
    line now rather than Gradio's error after the whole gallery was embedded."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
            s.bind(address)
    except OSError as e:  # socket.gaierror included
        if e.errno == errno.EADDRINUSE:
            cli.usage_error(f"port {port} is in use on {host}: give another --port, or leave it out "
                            "for the first free one from 7860", USAGE)
        cli.usage_error(f"--host={host} cannot be listened on ({e.strerror or e}): give an address of this "
                        "machine, e.g. 127.0.0.1, or 0.0.0.0 for all of them", USAGE)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # the shell's status for a process ended by the signal


def ends_on_sigterm(command):
    """`command`, ended by SIGTERM (kill, systemd, docker stop) as by Ctrl-C: unwinding, so the
    atexit cleanup of the page's temp and upload folders runs (the signal's default skips it)."""
    @functools.wraps(command)
    def wrapped(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():  # only it may handle signals
            return command(*args, **kwargs)
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            return command(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return wrapped


@digests_held()  # the weights file is hashed once for the engines' folder and each index
def _page(args, device):
    """The page over what the command line names: its model (each tower read when a query first needs it,
    `engines.lazy`), its gallery and caption indexes."""
    from clip_foundation.app.page import SearchPage
    gallery = None
    args.checkpoint = args.checkpoint and str(model_folder(args.checkpoint))  # a Hub id: its snapshot
    if args.index:
        from clip_foundation.search.gallery import Gallery
        gallery = Gallery.from_index(args.index, args.checkpoint or None, backend=args.backend, device=device,
                                     engine=args.engine)
        args.checkpoint = gallery.checkpoint
    model = gallery.model if gallery else load_model(args.checkpoint, device)
    if not gallery:
        use_engine(model, args.engine, args.checkpoint)
    if args.gallery:
        from clip_foundation.data.splits import image_folder_records
        from clip_foundation.search.gallery import Gallery
        gallery = Gallery.from_run(args.checkpoint, records=image_folder_records(args.gallery), model=model,
                                   backend=args.backend)
    return SearchPage.from_run(args.checkpoint, args.data or None, args.split, captions=args.captions,
                               gallery=gallery, model=model, backend=args.backend)


@ends_on_sigterm
def main(argv=None):
    args = cli.parse(AppConfig(), argv, USAGE)
    if not (args.checkpoint or args.index):
        cli.usage_error("--checkpoint=DIR is required (the run folder train.py printed; a prebuilt --index=DIR "
                        "may omit it)", USAGE)
    if bool(args.gallery) + bool(args.data) + bool(args.index) > 1:
        cli.usage_error("--gallery=DIR (a folder of images), --data=DIR (a dataset) and --index=DIR (a prebuilt "
                        "index) each name the gallery: give one, not both", USAGE)
    if args.split not in (*SPLITS, "all") or args.backend not in ("auto", "exact", "faiss"):
        cli.usage_error("--split is train, val, test or all; --backend is auto, exact or faiss", USAGE)
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0) or not 0 <= args.port < 65536:
        cli.usage_error(f"--max_upload_mb must be a positive number of MB (got {args.max_upload_mb}) "
                        f"and --port 0-65535 (got {args.port})", USAGE)
    device = checked_device(args, USAGE)  # --engine, --threads and --device, as the other commands check them
    check_address(args.host, args.port)
    try:
        auth = read_auth(args.auth)
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        page = _page(args, device)
    except (FileNotFoundError, DataError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    page.threads = args.threads  # set in each query's thread, before its first forward (and an engine's compile)
    print(page.summary().replace("**", ""))
    return page.launch(args.host, args.port or None, args.share, args.max_upload_mb, auth=auth)


if __name__ == "__main__":
    from clip_foundation.commands import run
    raise SystemExit(run("app", main))  # this module's main, not a second copy of it
