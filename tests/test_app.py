"""app.py and clip_foundation/app/page.py: the search page, tested as a person uses it.

On the tiny trained synthetic model (the `tiny_run` fixture): the handlers themselves, the running
server through its HTTP API (`gradio_client`) and its file route, and a real headless Chromium
that types a query, checks the grid, uploads an image and saves a screenshot. The browser test
skips, saying why, where Playwright or Debian's chromium is missing or cannot start.
"""
import base64
import csv
import io
import os
import shutil
from pathlib import Path

import pytest

from clip_foundation.app import command as app
from clip_foundation.common import cli
from clip_foundation.app.page import PageError, SearchPage
from test_readers import _png_header

gradio = pytest.importorskip("gradio", reason="the page needs gradio: pip install -e \".[app]\"")

CHROMIUM = os.environ.get("CLIP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def attributes(data: Path) -> dict[str, set[tuple[str, str]]]:
    """Image file name -> the (colour, shape) of each shape in it, from the set's captions.csv."""
    with open(data / "captions.csv", newline="") as f:
        return {Path(r["image"]).name: {(r[f"color{i}"], r[f"shape{i}"]) for i in (1, 2) if r[f"color{i}"]}
                for r in csv.DictReader(f)}


def red(attrs, name) -> bool:
    return any(colour == "red" for colour, _ in attrs[name])


def gallery_names(page) -> list[str]:
    return [Path(r.image).name for r in page.gallery.records]


@pytest.fixture(scope="module", autouse=True)
def torch_threads():
    """The page serves with 1 torch thread (process-wide for new threads): put it back after."""
    import torch
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def page(tiny_run):
    from clip_foundation.search.gallery import Gallery
    data, run_dir, _ = tiny_run
    # the page on torch: these tests are about the page; test_engines checks every engine's embeddings
    return SearchPage.from_run(run_dir, str(data), "test",
                               gallery=Gallery.from_run(run_dir, str(data), "test", engine="torch"))


@pytest.fixture(scope="module")
def served(page):
    """The page's server, started once for this module -> its URL."""
    blocks = page.launch(prevent_thread_lock=True, quiet=True, max_upload_mb=1)
    yield blocks.local_url
    blocks.close()


def red_circle_image(tiny_run) -> Path:
    data, _, _ = tiny_run
    attrs = attributes(data)
    return next(data / "images" / name for name in sorted(attrs) if attrs[name] == {("red", "circle")})


# ---------------------------------------------------------------- the handlers


def test_a_red_circle_brings_back_red_circles(page, tiny_run):
    attrs = attributes(tiny_run[0])
    grid, paths, note = page.on_query("a red circle", 9)
    assert len(grid) == len(paths) == 9 and note.startswith('top 9 of 60 images for "a red circle"')
    names = [Path(p).name for p in paths]  # the tiny model knows colours (learnt first), not yet shapes
    base = sum(red(attrs, n) for n in gallery_names(page)) / len(page.gallery)  # about 1 in 5
    assert sum(red(attrs, n) for n in names[:5]) >= 4 > 5 * base / 2, names
    assert all(Path(thumb).is_relative_to(page.workdir) for thumb, _ in grid)  # thumbnails, not the files
    assert [label.split()[1] for _, label in grid] == [Path(p).name for p in paths]
    scores = [float(label.split()[0]) for _, label in grid]
    assert scores == sorted(scores, reverse=True)


def test_image_to_text_ranks_captions_and_labels(page, tiny_run):
    rows, probs, note = page.on_image(str(red_circle_image(tiny_run)), "a red shape, a blue shape, a green shape", 3)
    assert len(rows) == 3 and any("red" in caption for _, caption in rows)
    assert max(probs, key=probs.get) == "a red shape" and sum(probs.values()) == pytest.approx(1, abs=1e-4)
    assert note.startswith("image ")
    _, probs, note = page.on_image(str(red_circle_image(tiny_run)), "just one label", 3)
    assert probs == {} and "two or more labels" in note


def test_what_is_loaded(page):
    info = page.info
    assert "scratch" in info["towers"] and "60 images" in info["gallery"] and info["index"].startswith("exact")
    assert "text -> image R@1/5/10" in info["test recall"] and "training captions" in info["captions"]
    assert page.examples[0] == "a red circle"  # the synthetic model gets shape queries


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("content, message", [
    (b"just some text", "cannot identify image file"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "cannot decode image"),  # a truncated PNG
    (_png_header(12000, 12000), "more than the 64 MP"),  # a decompression bomb's header
])
def test_bad_uploads_say_what_is_wrong(page, tmp_path, content, message):
    path = tmp_path / "upload.png"
    path.write_bytes(content)
    with pytest.raises(PageError, match=message) as error:
        page.on_image(str(path), "a, b")
    assert str(tmp_path) not in str(error.value) and "upload.png" in str(error.value)  # the file's own name only


@pytest.mark.parametrize("call", [
    lambda page, text: page.on_query(text, 9),
    lambda page, text: page.on_image(None, text),  # zero-shot labels: the same limit, checked before the image
], ids=["query", "labels"])
def test_over_long_text_is_refused_before_tokenizing(page, monkeypatch, call):
    monkeypatch.setattr(page.gallery.model, "encode_text", lambda *a, **k: pytest.fail("a long text was encoded"))
    with pytest.raises(PageError, match=r"^The text is 1,000,001 characters; at most 1,000 are read") as error:
        call(page, "x" * 1_000_001)
    assert "xxxx" not in str(error.value)  # not echoed back


def test_empty_query_and_missing_image_are_messages(page):
    with pytest.raises(PageError, match="Type what to look for"):
        page.on_query("   ", 9)
    with pytest.raises(PageError, match="Upload or paste a photo"):
        page.on_image(None)


# ---------------------------------------------------------------- the command line


def test_command_line_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^error: .*not a saved CLIPModel folder|^error: .*not found"):
        app.main([f"--checkpoint={tmp_path / 'missing'}"])
    for argv, said in (([], "--checkpoint=DIR is required"), (["--checkpoint=x", "--split=dev"], "--split is"),
                       (["--checkpoint=x", "--gallery=a", "--data=b"], "not both"), (["--bogus=1"], "unknown option")):
        with pytest.raises(SystemExit) as stop:
            app.main(argv)
        assert stop.value.code == 2 and said in capsys.readouterr().err


def test_threads_option_reaches_the_page_that_serves(tiny_run, monkeypatch):
    from clip_foundation.app.page import SearchPage
    monkeypatch.setattr(SearchPage, "launch", lambda self, *args, **kwargs: self)  # no server here
    import torch
    before = torch.get_num_threads()
    try:
        page = app.main([f"--checkpoint={tiny_run[1]}", "--threads=2", "--engine=torch"])
        page.find("a red circle", 3)  # a query sets its thread's torch count (and an engine's, at compile)
        assert page.threads == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("option, said", [
    ("--max_upload_mb=nan", "--max_upload_mb must be a positive number of MB (got nan)"),
    ("--max_upload_mb=inf", "--max_upload_mb must be a positive number of MB (got inf)"),
    ("--max_upload_mb=-1", "--max_upload_mb must be a positive number of MB (got -1.0)"),
    ("--host=999.1.1.1", "--host=999.1.1.1 cannot be listened on"),
    ("--host=192.0.2.1", "--host=192.0.2.1 cannot be listened on"),  # an address of another machine
    ("--port=PORT", "port PORT is in use on 127.0.0.1"),
    ("--threads=0", "--threads=0: must be >= 1"),
])
def test_bad_values_and_addresses_are_one_line_before_loading(tmp_path, capsys, option, said):
    import socket
    with socket.socket() as taken:  # a port some other server holds
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        with pytest.raises(SystemExit) as stop:  # the missing checkpoint shows the check came first
            app.main([f"--checkpoint={tmp_path / 'missing'}", option.replace("PORT", port)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and said.replace("PORT", port) in err and len(err.splitlines()) == 2, err


@pytest.mark.parametrize("text, said", [
    (None, "cannot read it"),
    ("", "no user:password line"),
    ("# logins\nann:secret\nbob\n", "auth.txt:3: expected user:password"),
    ("ann:\n", "auth.txt:1: expected user:password"),
])
def test_bad_auth_files_are_one_line(tmp_path, text, said):
    path = tmp_path / "auth.txt"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit, match=f"^error: .*{said}") as stop:
        app.main([f"--checkpoint={tmp_path / 'missing'}", f"--auth={path}"])
    assert "secret" not in str(stop.value.code)


def test_logins_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "auth.txt"
    path.write_text("# who may search\nann:pass:word\n\nbob:x\n")
    assert app.read_auth(str(path)) == [("ann", "pass:word"), ("bob", "x")]
    monkeypatch.setenv(app.AUTH_ENV, "cat:meow")
    assert app.read_auth("") == [("cat", "meow")] and app.read_auth(str(path))[0][0] == "ann"
    monkeypatch.delenv(app.AUTH_ENV)
    assert app.read_auth("") is None


def test_missing_gallery_is_one_line(tiny_run, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: .*image folder not found"):
        app.main([f"--checkpoint={tiny_run[1]}", f"--gallery={tmp_path / 'nowhere'}"])


def test_defaults_are_safe():
    cfg = cli.parse(app.AppConfig(), ["--checkpoint=runs/x"], app.USAGE)
    assert cfg.host == "127.0.0.1" and not cfg.share and cfg.max_upload_mb == 10


def test_latency_benchmark_smoke():
    from benchmarks import search_latency
    result = search_latency.main(["--app", "--rows=300,600", "--queries=6", "--dim=64"])
    tower = result["towers"]["scratch"]
    assert result["threads"] == 1 and 0 < tower["text_forward"]["p50_ms"] <= tower["text_forward"]["p95_ms"]
    assert {"tokenize", "forward_1_threads", "forward_2_threads"} <= set(tower)
    for rows in ("300", "600"):
        row = result["galleries"][rows]
        assert row["index"] == "exact" and 0 < row["scratch"]["handler"]["p50_ms"] <= row["scratch"]["handler"]["p95_ms"]
        assert row["scratch"]["lookup"]["p50_ms"] > 0


def test_queries_run_on_the_pages_thread_count_in_any_thread(page):
    import torch
    from concurrent.futures import ThreadPoolExecutor

    def in_a_server_thread():
        torch.set_num_threads(2)  # a thread that ran torch before the page's setting keeps its own count
        page.on_query("a red circle", 3)
        return torch.get_num_threads()
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(in_a_server_thread).result() == page.threads == 1


def test_a_query_is_one_forward_and_a_lookup(page, monkeypatch):
    """Thumbnails come from memory after the first time, and no per-query mode switching."""
    page.on_query("a red circle", 9)
    monkeypatch.setattr("clip_foundation.app.page.open_rgb", lambda *a: pytest.fail("a thumbnail was remade"))
    monkeypatch.setattr("clip_foundation.search.gallery.eval_mode", lambda *a: pytest.fail("eval_mode on the query path"))
    grid, paths, _ = page.on_query("a red circle", 9)
    assert [Path(p).name for p in paths] == [Path(p).name for p in page.on_query("a red circle", 9)[1]]
    assert len(grid) == 9 and not page.gallery.model.training


# ---------------------------------------------------------------- the running server


def test_api_search_and_describe(served, tiny_run):
    from gradio_client import Client, handle_file
    client = Client(served, verbose=False)
    grid, message = client.predict("a red circle", 4, api_name="/search")
    attrs = attributes(tiny_run[0])
    names = [item["caption"].split()[1] for item in grid]
    assert len(names) == 4 and sum(red(attrs, n) for n in names) >= 3 and "a red circle" in message
    _, message = client.predict("", 4, api_name="/search")
    assert "Type what to look for" in message  # and the server goes on serving:
    rows, probs, message = client.predict(handle_file(str(red_circle_image(tiny_run))), "a red shape, a blue shape",
                                          3, api_name="/describe")
    assert probs["label"] == "a red shape" and len(rows["data"]) == 3
    text, bomb = Path(tiny_run[1]) / "not_an_image.png", Path(tiny_run[1]) / "bomb.png"
    text.write_text("hello")
    bomb.write_bytes(_png_header(30000, 30000))  # past even PIL's own limit, which Gradio's upload step meets
    for upload, said in ((text, "cannot identify image file"), (bomb, "decompression bomb")):
        _, _, message = client.predict(handle_file(str(upload)), "a, b", 3, api_name="/describe")
        assert "cannot be used as an image" in message and said in message


def api_call(url: str, name: str, *data) -> tuple[str, str]:
    """One call of the page's HTTP API as any client makes it (no gradio_client) -> (event, its data)."""
    import httpx
    response = httpx.post(f"{url}gradio_api/call/{name}", json={"data": list(data)}, timeout=60)
    if response.status_code != 200:
        return "refused", f"{response.status_code} {response.text}"
    events = httpx.get(f"{url}gradio_api/call/{name}/{response.json()['event_id']}", timeout=60).text
    event, payload = events.strip().splitlines()[-2:]  # the last event: "event: NAME", "data: JSON"
    return event.partition(": ")[2], payload.partition(": ")[2]


def data_url(content: bytes) -> dict:
    return {"url": "data:image/png;base64," + base64.b64encode(content).decode()}


def png(width: int, height: int) -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("payload, said", [
    (data_url(png(40, 30)), "image 40x30"),  # a pasted image still works
    (data_url(png(40, 30) + b"\0" * 1_060_000), "at most 1 MB"),  # the module's server takes 1 MB
    (data_url(_png_header(12000, 12000)), "more than the 64 MP"),  # refused from its header, not decoded
    ({"path": "https://huggingface.co/big.png", "meta": {"_type": "gradio.FileData"}}, "not a link"),
])
def test_every_way_in_keeps_the_upload_limits(served, payload, said):
    event, message = api_call(served, "describe", payload, "a, b", 3)
    assert said in message, (event, message[:300])


def test_an_upload_request_is_bounded_in_total(served, tmp_path):
    import httpx
    files = [("files", (f"part{i}.png", b"\0" * 600_000)) for i in range(3)]  # each under 1 MB, 1.8 MB in all
    response = httpx.post(f"{served}gradio_api/upload", files=files)
    assert response.status_code == 413 and "at most 1 MB" in response.text, (response.status_code, response.text)


def test_a_huge_query_is_refused_at_once(served):
    event, message = api_call(served, "search", "x" * 100_000, 4)
    assert "at most 1,000 are read" in message and "xxxx" not in message, (event, message[:300])


def test_monitoring_is_private(served):
    import httpx
    assert httpx.get(f"{served}monitoring/summary").status_code != 200


@pytest.mark.parametrize("host, share, auth, warned", [
    ("0.0.0.0", False, None, "0.0.0.0, open to the network, with no login"),
    ("127.0.0.1", True, None, "a public gradio.live link with no login"),
    ("0.0.0.0", False, [("ann", "pw")], None),
    ("127.0.0.1", False, None, None),
    ("localhost", False, None, None),
])
def test_an_open_page_without_login_warns(page, monkeypatch, host, share, auth, warned):
    import warnings
    from clip_foundation.app.page import PageWarning
    started = {}
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: started.update(kwargs))  # no server here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        page.launch(host, share=share, auth=auth)
    said = [str(w.message) for w in caught if issubclass(w.category, PageWarning)]
    assert (said[0].startswith(f"the page is served on {warned}") and "--auth=FILE" in said[0]) if warned else not said
    assert started["auth"] == auth and started["server_name"] == host and started["enable_monitoring"] is False


def test_a_login_is_asked_for(page):
    import httpx
    guarded = SearchPage(page.gallery, page.captions, page.info)
    url = guarded.launch(prevent_thread_lock=True, quiet=True, auth=[("ann", "pw")]).local_url
    try:
        assert api_call(url, "search", "a red circle", 3)[0] == "refused"
        with httpx.Client() as browser:
            assert browser.post(f"{url}login", data={"username": "ann", "password": "pw"}).status_code == 200
            response = browser.post(f"{url}gradio_api/call/search", json={"data": ["a red circle", 3]})
            assert response.status_code == 200
    finally:
        guarded.close()


@pytest.mark.slow
def test_a_burst_past_the_queue_is_told_it_is_full(page):
    import time
    from concurrent.futures import ThreadPoolExecutor
    busy = SearchPage(page.gallery, page.captions, page.info, queue_size=2)
    busy.find = lambda query, n: time.sleep(1) or page.find(query, n)  # a slow query: the burst piles up
    url = busy.launch(prevent_thread_lock=True, quiet=True).local_url
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: api_call(url, "search", "a red circle", 3), range(8)))
    finally:
        busy.close()
    refused = [message for event, message in answers if event == "refused"]
    assert refused and all(message.startswith("503") and "Queue is full" in message for message in refused), answers
    assert sum(event == "complete" for event, _ in answers) == len(answers) - len(refused) >= 2


@pytest.mark.slow
def test_load_benchmark_smoke(tiny_run):
    from benchmarks import app_load
    data, run_dir, _ = tiny_run
    result = app_load.main([f"--checkpoint={run_dir}", f"--data={data}", "--queries=12", "--warmup=4", "--clients=3"])
    assert result["ok"] == 12 and result["errors"] == result["busy"] == 0 and result["queries_per_s"] > 0
    assert len(result["rss_mb_per_chunk"]) == 2 and result["rss_before_mb"] > 0


@pytest.mark.slow
def test_close_and_exit_remove_the_pages_folder(page, tmp_path):
    import subprocess
    import sys
    closed = SearchPage(page.gallery, page.captions, page.info)
    closed.thumbnail(page.gallery.records[0].image)
    assert any(closed.workdir.rglob("*.jpg"))
    closed.close()
    assert not closed.workdir.exists()
    mine = tmp_path / "mine"  # a folder the caller gave is the caller's: left alone
    mine.mkdir()
    SearchPage(page.gallery, page.captions, page.info, workdir=mine).close()
    assert mine.is_dir()
    made = subprocess.run([sys.executable, "-c", "from clip_foundation.app.page import SearchPage; "
                           "print(SearchPage(None, None, {}).workdir)"], capture_output=True, text=True,
                          cwd=Path(app.__file__).parent, check=True).stdout.strip()
    assert made and not Path(made).exists()  # a script that ends (or is stopped with Ctrl-C) leaves nothing


def test_a_second_page_in_the_process_leaves_the_first_ones_uploads_working(page, served, tiny_run):
    # Gradio reads its upload folder from the environment whenever it checks an upload: a second page
    # (another run in the same notebook) must not move it from under the first one's server
    from gradio_client import Client, handle_file
    other = SearchPage(page.gallery, page.captions, page.info)
    other.build()
    try:
        rows, probs, message = Client(served, verbose=False).predict(
            handle_file(str(red_circle_image(tiny_run))), "a red shape, a blue shape", 3, api_name="/describe")
        assert probs["label"] == "a red shape", message
    finally:
        other.close()


def test_file_route_serves_nothing_outside_the_page(served, tiny_run):
    import httpx
    data, run_dir, _ = tiny_run
    for path in ("/etc/passwd", data / "captions.csv", red_circle_image(tiny_run), run_dir / "model.safetensors"):
        response = httpx.get(f"{served}gradio_api/file={path}")
        assert response.status_code == 403, (path, response.status_code)


def test_uploads_are_capped(served, tmp_path):
    import httpx
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))  # the module's server takes 1 MB
    response = httpx.post(f"{served}gradio_api/upload", files={"files": big.open("rb")})
    assert response.status_code == 413, response.status_code


# ---------------------------------------------------------------- a real browser


@pytest.mark.browser
def test_in_a_real_browser(served, tiny_run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python client is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set CLIP_CHROMIUM)")
    attrs = attributes(tiny_run[0])
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        except sync_api.Error as e:
            pytest.skip(f"Chromium at {CHROMIUM} cannot start here: {str(e).splitlines()[0]}")
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 1000})
            tab.goto(served)
            box = tab.locator("#query textarea")
            box.fill("a red circle")
            box.press("Enter")
            tab.wait_for_function("document.querySelector('#message').innerText.includes('a red circle')")
            labels = tab.locator("#grid .caption-label").all_inner_texts()  # "score  file" under each image
            names = [label.split()[1] for label in labels]
            assert len(names) == 9 and tab.locator("#grid img").count() == 9
            assert sum(red(attrs, n) for n in names[:5]) >= 4, names
            tab.locator("#image input[type=file]").set_input_files(str(red_circle_image(tiny_run)))
            tab.wait_for_function("document.querySelector('#image_message').innerText.includes('image ')")
            captions = tab.locator("#captions").inner_text()
            assert "red" in captions and "a red shape" in tab.locator("#probs").inner_text()
            tab.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            if os.environ.get("CLIP_APP_SCREENSHOT"):
                shutil.copy(tmp_path / "app.png", os.environ["CLIP_APP_SCREENSHOT"])
        finally:
            browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
