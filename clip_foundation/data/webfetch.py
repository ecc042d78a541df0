"""Plain HTTP downloads of large files: resumed after an interruption, failures in one sentence.

    url_fetch("http://images.cocodataset.org/zips/val2017.zip", Path("data/.coco-download"))

The file arrives as NAME.part and is renamed to NAME only when complete, so a file under its
own name is whole; a later call continues a .part where the server allows (HTTP Range).
"""
from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from tqdm import tqdm


def url_fetch(url: str, out_dir: str | Path, credentials=None) -> Path:
    """Download `url` into `out_dir` under its own file name; return that path. `credentials` is
    ignored (the signature of `download.download`'s `fetch`). Network errors propagate."""
    path = Path(out_dir) / url.rsplit("/", 1)[1]
    part = path.with_name(path.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        resumed = getattr(response, "status", None) == 206  # else the whole file comes again
        start = have if resumed else 0
        size = int(response.headers.get("Content-Length") or 0) + start
        with open(part, "ab" if resumed else "wb") as f, \
                tqdm(total=size or None, initial=start, unit="B", unit_scale=True, desc=path.name) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    os.replace(part, path)
    return path


def explain(e: BaseException, url: str, by_hand: str) -> str:
    """One sentence for a failed `url_fetch`: what failed and `by_hand`, what to do instead."""
    host = url.split("/")[2]
    if status := getattr(e, "code", None):  # urllib's HTTPError
        return f"{host} answered HTTP {status} for {url}: try again later, or {by_hand}."
    if isinstance(e, OSError):  # URLError, timeouts, refused connections, no DNS
        reason = getattr(e, "reason", None) or type(e).__name__
        return f"Could not reach {host} (network unavailable: {reason}): {by_hand}."
    return f"Downloading {url} failed ({type(e).__name__}: {e}): {by_hand}."
