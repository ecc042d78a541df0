"""A search page in the browser (Gradio): type a phrase and see the gallery images that match it,
drop in a photo and see the captions and labels that fit it, and what is loaded.

    python app.py --checkpoint=runs/NAME                    # the run's test images
    python app.py --index=DIR                               # a prebuilt index (search.py --build_index), of any size
    page = SearchPage.from_run("runs/NAME"); page.launch()   # the same from Python (inline in Jupyter/Colab)

`SearchPage` holds the model and the indexes, embedded once (cached beside the checkpoint) and
reused by every query: a text query costs one text-tower forward (one torch thread, see
`launch`) plus the index lookup; thumbnails are made the first time an image is shown. Its
`on_query` / `on_image` are the page's handlers as plain functions (tests and the latency
benchmark call them directly); `build` lays them out with Gradio, imported only there. What it
loads and shows as loaded (its caption index, examples, the run's description): `loading.py`.

Safe by default: the server binds 127.0.0.1 (and warns when it listens wider with no login);
the page's thumbnails live in its own temporary folder (removed by `close` and at exit) and
Gradio's files (uploads, copies of what it shows) in one private folder of the process (removed
at exit); no other folder is allowed, so the page's file routes reach uploads and thumbnails of
gallery images only. Every way an image comes in (an upload, a pasted
`data:` URL) is capped in bytes before it is decoded, and decoded by `open_rgb` (64 MP limit read
from the header, decompression bombs and non-images refused with a message); the server fetches
no links. A request body is capped too (many files in one upload, a huge query), texts are
refused past `records.MAX_CAPTION_CHARS` before tokenizing, and at most `queue_size` queries wait
while `concurrency` run; past that a client is told the queue is full.
"""
from __future__ import annotations

import atexit
import hashlib
import ipaddress
import math
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clipModel import CLIPModel

from clip_foundation.common.extras import optional
from clip_foundation.common.files import atomic_write
from clip_foundation.app.loading import caption_index, describe_run, gallery_is_synthetic, synthetic_labels
from clip_foundation.data.synthetic import PHOTO_QUERIES, SYNTHETIC_QUERIES
from clip_foundation.search.quick import is_link
from clip_foundation.search.gallery import Gallery, Match, find_captions
from clip_foundation.search.kinds import Index
from clip_foundation.data.records import MAX_CAPTION_CHARS, DataError, open_rgb
from clip_foundation.evaluate.zeroshot import TEMPLATES, classify

PHOTO_LABELS = "dog, cat, horse, bicycle, car, boat, child, crowd"
THUMB_SIDE = 384  # thumbnails shown (and served) instead of the gallery files themselves
MAX_RESULTS = 48  # the n slider's top
UPLOAD_AGE_S = 600  # uploads (and Gradio's copies of thumbnails) are deleted this long after they came


class PageError(ValueError):
    """A mistake in what the user typed or dropped in; its message is shown in the page."""


class PageWarning(UserWarning):
    """The page is started in a way that may expose it (open to the network with no login)."""


def checked_text(text) -> str:
    """`text` (a query or the zero-shot labels) stripped, or PageError when it is longer than
    `MAX_CAPTION_CHARS`: checked first, because tokenizing a huge text holds a worker for
    seconds to minutes; the message gives its length and never echoes it."""
    text = text or ""
    if len(text) > MAX_CAPTION_CHARS:
        raise PageError(f"The text is {len(text):,} characters; at most {MAX_CAPTION_CHARS:,} are read: shorten it")
    return text.strip()


def too_large(size: int, limit: int | None) -> str | None:
    """The one message for an image of `size` bytes past the page's `limit` (None: no limit)."""
    if limit is None or size <= limit:
        return None
    return f"The image is {size / 2**20:.1f} MB; this page takes at most {limit / 2**20:g} MB (--max_upload_mb)"


@dataclass
class SearchPage:
    """A `Gallery` (model + image index) with a caption index, as the handlers of one web page."""
    gallery: Gallery
    captions: Index | None  # image -> text candidates; None: no captions found
    info: dict  # what is loaded, shown in the page (see `summary`)
    examples: tuple[str, ...] = PHOTO_QUERIES
    labels: str = PHOTO_LABELS  # default zero-shot labels, comma-separated
    templates: tuple[str, ...] | None = TEMPLATES  # prompts for bare labels; None: labels as written
    workdir: Path | None = None  # the page's thumbnails; None: a new temp folder, removed by close()
    threads: int | None = 1  # torch threads while serving (see `launch`); None: torch's own setting
    concurrency: int = 1  # queries run at once (one model, one torch thread each); more wait in the queue
    queue_size: int = 64  # queries that may wait; past that a client is told the queue is full
    sessions: int = 1000  # sessions whose state Gradio keeps (about 0.1 MB each; every API call is one), oldest dropped
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _thumbs: dict = field(default_factory=dict, repr=False)  # gallery path -> its thumbnail, made once
    _own_workdir: bool = field(default=False, repr=False)  # made here, so close() and exit remove it
    _blocks: object = field(default=None, repr=False)  # the launched gradio.Blocks

    def __post_init__(self):
        if self.workdir is None:
            self.workdir, self._own_workdir = Path(tempfile.mkdtemp(prefix="clip-app-")), True
            atexit.register(shutil.rmtree, self.workdir, ignore_errors=True)  # also after Ctrl-C

    @classmethod
    def from_run(cls, checkpoint, data: str | None = None, split: str = "test", *, captions: str = "train",
                 gallery: Gallery | None = None, model: CLIPModel | None = None, backend: str = "auto",
                 device=None) -> "SearchPage":
        """The page over `checkpoint`'s `split` of `data` (default: the data it trained on; any
        folder of photos works, see `gallery_records`), or over `gallery` when given.

        `captions` are the image -> text candidates: "train" (the run's training captions),
        "gallery" (the gallery's own) or a text file with one caption per line."""
        gallery = gallery or Gallery.from_run(checkpoint, data, split, model=model, backend=backend, device=device)
        captions_found, caption_note = caption_index(gallery, captions, data, backend)
        synthetic = gallery_is_synthetic(checkpoint, data)
        info = describe_run(gallery, captions_found, caption_note, data or "the run's data", split)
        return cls(gallery, captions_found, info, SYNTHETIC_QUERIES if synthetic else PHOTO_QUERIES,
                   synthetic_labels() if synthetic else PHOTO_LABELS, None if synthetic else TEMPLATES)

    # ------------------------------------------------------------ handlers (no Gradio here)

    def on_query(self, query: str, n: int = 9) -> tuple[list[tuple[str, str]], list[str], str]:
        """A text query -> (grid: [(thumbnail, "score  name")], the gallery path of each, message).
        Results that are links (an index built from an embedding folder may hold URLs) are not
        fetched: the message lists them."""
        query = checked_text(query)
        if not query:
            raise PageError("Type what to look for, e.g. " + " or ".join(f'"{q}"' for q in self.examples[:2]))
        n = max(1, min(int(n or 9), MAX_RESULTS, len(self.gallery)))
        grid, paths, unreadable, links = [], [], [], []
        for m in self.find(query, n):
            if is_link(m.path):
                links.append(f"{m.score:.3f} {m.path}")
                continue
            try:
                grid.append((self.thumbnail(m.path), f"{m.score:.3f}  {Path(m.path).name}"))
                paths.append(m.path)
            except (OSError, DataError):  # moved, deleted or damaged since the index was built
                unreadable.append(Path(m.path).name)
        note = f"top {len(grid) + len(links)} of {len(self.gallery):,} images for \"{query}\" (cosine similarity)"
        if unreadable:
            note += f"; {len(unreadable)} could not be shown (gone or unreadable: {', '.join(unreadable)})"
        if links:
            note += f"; {len(links)} are links, not fetched by this page: {', '.join(links)}"
        return grid, paths, note

    def find(self, query: str, n: int) -> list[Match]:
        """The `n` gallery images best matching `query`: one text-tower forward plus the index
        lookup, nothing else (`find_matches` uses a model in eval mode as it is)."""
        self.use_query_threads()
        return self.gallery.find_matches(query, n)

    def on_image(self, image, labels: str = "", n: int = 5) -> tuple[list[list[str]], dict[str, float], str]:
        """An image (a path or PIL image) -> (caption rows [score, caption], {label: probability}, message)."""
        labels = checked_text(labels)
        if image is None or image == "":
            raise PageError("Upload or paste a photo, or click an image in the grid")
        try:
            picture = open_rgb(image) if isinstance(image, (str, Path)) else image
        except DataError as e:  # not an image, corrupt, truncated, or over the 64 MP limit
            name = Path(image).name  # the file's own name: never the server's folders
            reason = str(e).removeprefix(f"{image}: ").replace(str(image), name)
            raise PageError(f"{name} cannot be used as an image: {reason}") from None
        self.use_query_threads()
        rows, notes = [], []
        if self.captions is None:
            notes.append(f"no captions to rank ({self.info['captions']})")
        else:
            rows = [[f"{c.score:.3f}", c.caption]
                    for c in find_captions(self.gallery.model, self.captions, picture, max(1, int(n or 5)))]
        names = list(dict.fromkeys(s.strip() for s in labels.split(",") if s.strip()))
        probs = {}
        if len(names) >= 2:
            probs = dict(classify(self.gallery.model, picture, names, self.templates))
        else:
            notes.append("type two or more labels, comma-separated, for zero-shot probabilities")
        width, height = picture.size
        return rows, probs, "; ".join([f"image {width}x{height}"] + notes)

    def thumbnail(self, path) -> str:
        """A small JPEG of gallery image `path` in this page's folder, for the grid. Made once:
        later queries take it from memory (`on_query` reads no gallery file after the first
        time an image is shown)."""
        if known := self._thumbs.get(str(path)):
            return known
        stat = Path(path).stat()
        key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode("utf-8", "surrogateescape"))
        out = self.workdir / "thumbs" / f"{key.hexdigest()[:24]}.jpg"
        with self._lock:
            if not out.is_file():
                picture = open_rgb(path)
                picture.thumbnail((THUMB_SIDE, THUMB_SIDE))
                out.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(out, lambda tmp: picture.save(tmp, "JPEG", quality=90))
            self._thumbs[str(path)] = str(out)
        return str(out)

    def use_query_threads(self) -> None:
        """torch's thread count for serving queries (`threads`; None leaves it as it is), in the
        calling thread: torch keeps a count per thread once a thread has run an op, so a server
        thread that ran one before `launch` would otherwise keep the old count."""
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def summary(self) -> str:
        """What is loaded, as Markdown."""
        return "\n".join(f"- **{k}**: {v}" for k, v in self.info.items())

    # ------------------------------------------------------------ the page

    def build(self):
        """The page as a `gradio.Blocks`, not started (see `launch`)."""
        return build_blocks(self)

    def launch(self, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
               max_upload_mb: float = 10, auth=None, **kwargs):
        """Start the page's server: blocking in a script, inline in Jupyter and Colab ->
        the launched `gradio.Blocks` (`.local_url`; `close()` the page to stop it). `port` None:
        the first free from 7860; images over `max_upload_mb` are refused, however they come;
        `auth`: Gradio's login, e.g. [("user", "password")] (a PageWarning when the page is open
        to the network without one); `kwargs` go to `Blocks.launch`.

        Sets torch to `self.threads` threads (1 unless changed; process-wide, so a notebook that
        trains afterwards may want `torch.set_num_threads` back): a query is one forward at
        batch 1, too small to split, and on a busy machine every op of a multi-threaded forward
        waits for its slowest thread (docs/search.md: 2 threads made it 70x slower under load)."""
        if not auth and (share or not is_loopback(host)):
            where = "a public gradio.live link" if share else f"{host}, open to the network,"
            warnings.warn(PageWarning(f"the page is served on {where} with no login: anyone who reaches it can "
                                      "search and upload; give --auth=FILE (user:password lines) or set "
                                      "CLIP_APP_AUTH=user:password"), stacklevel=2)
        self.use_query_threads()
        limit = int(max_upload_mb * 2**20)
        blocks = build_blocks(self, limit).queue(max_size=self.queue_size)
        app_kwargs = kwargs.pop("app_kwargs", None) or {}
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), body_limit(limit)]
        kwargs.setdefault("enable_monitoring", False)  # Gradio's traffic summary, open to anyone otherwise
        self._blocks = blocks
        blocks.launch(server_name=host, server_port=port, share=share, auth=auth, allowed_paths=[], ssr_mode=False,
                      max_file_size=limit, state_session_capacity=self.sessions, css=CSS, app_kwargs=app_kwargs,
                      **kwargs)
        return blocks

    def close(self) -> None:
        """Stop the launched server and delete the page's temporary folder (its thumbnails; uploads
        are deleted by age and at exit, with the process's Gradio folder)."""
        if self._blocks is not None:
            self._blocks.close()
            self._blocks = None
        self._thumbs.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


# ---------------------------------------------------------------- the page in Gradio (imported only here)

CSS = "#message p, #image_message p {margin: 0}"


_GRADIO_DIR: list[Path] = []  # this process's private Gradio folder, made by the first page


def _private_files(page: SearchPage) -> None:
    """Gradio's upload folder and example cache in a private folder of this process, so nothing
    another app wrote is served. One folder for every page of the process: Gradio reads
    GRADIO_TEMP_DIR again whenever it checks an upload, so a second page (another run in the same
    notebook) must not move it from under the first one's server. Removed when the process ends."""
    if not _GRADIO_DIR:
        _GRADIO_DIR.append(Path(tempfile.mkdtemp(prefix="clip-app-gradio-")))
        atexit.register(shutil.rmtree, _GRADIO_DIR[0], ignore_errors=True)
    os.environ["GRADIO_TEMP_DIR"] = str(_GRADIO_DIR[0] / "uploads")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(_GRADIO_DIR[0] / "examples")


def is_loopback(host: str) -> bool:
    """Whether `host` listens on this machine only (127.0.0.1, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def body_limit(image_bytes: int):
    """A Starlette middleware refusing (413, one line) any request whose body could not be one
    image of at most `image_bytes`, before it is read: Gradio caps each uploaded file, but not
    a request of many files, nor a JSON body with a pasted image or a huge query in it. A
    base64 `data:` URL is 4/3 of its image, plus room for the rest of the request."""
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    limit = math.ceil(image_bytes * 4 / 3) + 64 * 1024
    refusal = PlainTextResponse(f"a request may carry one image of at most {image_bytes / 2**20:g} MB "
                                "(--max_upload_mb)\n", status_code=413)

    class BodyLimit:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            length = dict(scope.get("headers", ())).get(b"content-length", b"0")
            if scope["type"] == "http" and (not length.isdigit() or int(length) > limit):
                return await refusal(scope, receive, send)
            seen = 0

            async def counted():  # a body without an honest length stops being read at the limit
                nonlocal seen
                message = await receive()
                seen += len(message.get("body", b""))
                return message if seen <= limit else {"type": "http.disconnect"}
            return await self.app(scope, counted if scope["type"] == "http" else receive, send)
    return Middleware(BodyLimit)


def _checked_image_input(image, max_upload_bytes: int | None):
    """Make every way into `image`'s (a gr.Image) handler keep the page's limits, by wrapping
    the one instance (a gr.Image subclass makes Gradio write a .pyi beside this file):

    - a pasted `data:` URL (which Gradio would decode whole, at any size) is refused past the
      upload size from its length, else written as a file; the handler's `open_rgb` then checks
      its pixel count from the header before decoding, as for an upload;
    - a link (Gradio would download it, at any size) is refused: uploads come as files;
    - otherwise the upload step never fails: a file that is no image, or too large for PIL to
      open, reaches the handler as its path, and `open_rgb` there says what is wrong."""
    gr = optional("gradio", "app", "the search page")
    from gradio.processing_utils import save_base64_to_cache
    preprocess, move = image.preprocess, image.async_move_resource_to_block_cache

    def checked(payload):
        if payload is not None and payload.url and payload.url.startswith("data:"):
            encoded = len(payload.url) - payload.url.find(",") - 1  # base64: 4 characters per 3 bytes
            if message := too_large(encoded * 3 // 4, max_upload_bytes):
                raise gr.Error(message, print_exception=False)
            try:
                path = save_base64_to_cache(payload.url, image.GRADIO_CACHE)
            except ValueError:  # not base64
                raise gr.Error("That data: URL holds no image (it is not base64)", print_exception=False) from None
            image.temp_files.add(path)  # deleted with the other uploads
            return path
        try:
            return preprocess(payload)
        except Exception:  # noqa: BLE001 (PIL raises many kinds; the handler reports it)
            return str(payload.path) if payload is not None and payload.path else None

    async def local_only(path):
        if isinstance(path, str) and path.startswith(("http://", "https://")):
            raise gr.Error("Upload or paste the image itself, not a link: this page fetches nothing",
                           print_exception=False)
        return await move(path)
    image.preprocess, image.async_move_resource_to_block_cache = checked, local_only
    return image


def build_blocks(page: SearchPage, max_upload_bytes: int | None = None):
    """The page as a `gradio.Blocks`, not started; pasted images over `max_upload_bytes` are refused
    (uploaded files: `max_file_size` of `Blocks.launch`)."""
    _private_files(page)
    gr = optional("gradio", "app", "the search page")

    def search(query, n):
        try:
            grid, paths, note = page.on_query(query, n)
        except PageError as e:
            return [], [], f"⚠️ {e}"
        return grid, paths, note

    def describe(image, labels, n):
        try:
            rows, probs, note = page.on_image(image, labels, n)
        except PageError as e:
            return [], None, f"⚠️ {e}"
        return rows, probs or None, note

    def pick(paths, labels, n, evt):  # a click on the grid: that gallery image
        if not paths or evt.index is None or evt.index >= len(paths):
            return None, [], None, "⚠️ search first, then click an image"
        path = paths[evt.index]
        return (page.thumbnail(path), *describe(path, labels, n))
    pick.__annotations__["evt"] = gr.SelectData  # how Gradio knows to pass the click

    # uploads (and Gradio's copies of thumbnails) are deleted UPLOAD_AGE_S after they came, all of them at shutdown
    with gr.Blocks(title="CLIP search", analytics_enabled=False, delete_cache=(60, UPLOAD_AGE_S)) as blocks:
        gr.Markdown("## CLIP search: type what to look for, or drop in a photo")
        with gr.Accordion("What is loaded", open=False):
            gr.Markdown(page.summary(), elem_id="loaded")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    query = gr.Textbox(label="Text → images", placeholder=page.examples[0], scale=4,
                                       elem_id="query", max_length=MAX_CAPTION_CHARS, submit_btn="Search")
                    n = gr.Slider(1, min(MAX_RESULTS, len(page.gallery)), value=min(9, len(page.gallery)),
                                  step=1, label="images", scale=1, elem_id="n")
                message = gr.Markdown(elem_id="message")
                grid = gr.Gallery(label="best matches (score, file)", columns=5, height="auto",
                                  object_fit="contain", allow_preview=False, elem_id="grid")
                paths = gr.State([])  # the gallery files behind the grid, kept on the server
                examples = gr.Examples([[q] for q in page.examples], inputs=query, label="Examples")
            with gr.Column(scale=2):
                image = gr.Image(label="Image → text: upload or paste a photo, or click a result",
                                 type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 height=240, elem_id="image")
                _checked_image_input(image, max_upload_bytes)
                labels = gr.Textbox(label="Zero-shot labels, comma-separated", value=page.labels,
                                    elem_id="labels", max_length=MAX_CAPTION_CHARS, submit_btn="Classify")
                n_captions = gr.Slider(1, 20, value=5, step=1, label="captions", elem_id="n_captions")
                image_message = gr.Markdown(elem_id="image_message")
                captions = gr.Dataframe(headers=["score", "caption"], label="captions that fit it best",
                                        interactive=False, wrap=True, elem_id="captions")
                probs = gr.Label(label="zero-shot probabilities", elem_id="probs")

        # every event uses the one model: they share one limit of `concurrency` runs at once
        model = dict(concurrency_id="model", concurrency_limit=page.concurrency)
        query.submit(search, [query, n], [grid, paths, message], api_name="search", **model)
        n.release(search, [query, n], [grid, paths, message], api_visibility="private", **model)
        examples.load_input_event.then(search, [query, n], [grid, paths, message], api_visibility="private", **model)
        image.upload(describe, [image, labels, n_captions], [captions, probs, image_message], api_name="describe",
                     **model)
        labels.submit(describe, [image, labels, n_captions], [captions, probs, image_message],
                      api_visibility="private", **model)
        grid.select(pick, [paths, labels, n_captions], [image, captions, probs, image_message],
                    api_visibility="private", **model)
    return blocks
