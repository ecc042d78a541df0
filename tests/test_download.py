"""download.py against tiny zips in the exact Kaggle layouts; offline, no real ~/.kaggle."""
import dataclasses
import errno
import io
import json
import os
import random
import re
import stat
import sys
import types
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clip_foundation.data import archive, download  # noqa: E402
from clip_foundation.data.download import DownloadError  # noqa: E402

KEY = "k3y-s3cr3t-0123456789abcdef"
SHARED_FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"
N_IMAGES, PER_IMAGE = 3, 5
NAMES = ["flickr8k", "flickr30k"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A fake HOME with no credentials, and small expected counts."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "KAGGLE_API_TOKEN", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    for name, spec in list(download.DATASETS.items()):
        small = dataclasses.replace(spec, n_images=N_IMAGES, n_captions=N_IMAGES * PER_IMAGE)
        monkeypatch.setitem(download.DATASETS, name, small)
    return home


@pytest.fixture
def creds(monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", KEY)


def kaggle_zip(path, name, n_images=N_IMAGES, extra=()):
    """A zip laid out like the Kaggle upload of `name`; `extra` = [(ZipInfo or name, bytes)]."""
    with zipfile.ZipFile(path, "w") as zf:
        if name == "flickr8k":
            zf.writestr("Images/", b"")
            rows = ["image,caption"]
            for i in range(n_images):
                zf.writestr(f"Images/{i}.jpg", b"\xff\xd8jpeg" + bytes([i]) * 64)
                rows += [f"{i}.jpg,A dog number {i} , caption {j} ." for j in range(PER_IMAGE)]
            zf.writestr("captions.txt", "\n".join(rows) + "\n")
        else:
            zf.writestr("flickr30k_images/", b"")
            zf.writestr("flickr30k_images/flickr30k_images/", b"")
            rows = ["image_name| comment_number| comment"]
            for i in range(n_images):
                zf.writestr(f"flickr30k_images/flickr30k_images/{i}.jpg", b"\xff\xd8jpeg" + bytes([i]) * 64)
                rows += [f"{i}.jpg| {j}| A dog runs ." for j in range(PER_IMAGE)]
            rows[-1] = f"{n_images - 1}.jpg| 4   A dog runs across the grass ."  # the known malformed row
            zf.writestr("flickr30k_images/results.csv", "\n".join(rows) + "\n")
            # the upload's redundant nested copy, which download() skips
            zf.writestr("flickr30k_images/flickr30k_images/results.csv", "\n".join(rows) + "\n")
            zf.writestr("flickr30k_images/flickr30k_images/flickr30k_images/0.jpg", b"\xff\xd8copy")
        for info, data in extra:
            zf.writestr(info, data)
    return path


class Fetch:
    """Fake for the kaggle call: writes a zip into out_dir the way the Kaggle API names it."""

    def __init__(self, name, **zip_args):
        self.name, self.zip_args, self.calls = name, zip_args, []

    def __call__(self, slug, out_dir, credentials):
        self.calls.append((slug, Path(out_dir), credentials))
        return self.write(Path(out_dir) / (slug.split("/")[1] + ".zip"))

    def write(self, path):
        return kaggle_zip(path, self.name, **self.zip_args)


def refuse(*a):
    raise AssertionError("fetch must not be called")


def leftovers(dest, name):
    return sorted(p.name for p in dest.iterdir() if p.name != name) if dest.exists() else []


@pytest.mark.parametrize("name", NAMES)
def test_download_leaves_loader_layout(tmp_path, creds, name):
    dest, fetch = tmp_path / "data", Fetch(name)
    root = download.download(name, dest, fetch=fetch)
    assert root == dest / name
    spec = download.DATASETS[name]
    assert fetch.calls[0][0] == spec.slug
    if name == "flickr8k":
        assert sorted(p.name for p in (root / "Images").glob("*.jpg")) == ["0.jpg", "1.jpg", "2.jpg"]
        assert (root / "captions.txt").read_text().startswith("image,caption\n")
    else:
        assert len(list((root / "flickr30k_images" / "flickr30k_images").glob("*.jpg"))) == 3
        assert (root / "flickr30k_images" / "results.csv").read_text().startswith("image_name|")
        assert sorted(p.name for p in (root / "flickr30k_images" / "flickr30k_images").iterdir()
                      if not p.name.endswith(".jpg")) == []  # the nested copy was skipped
    assert download.verify(name, root) == (3, 15)
    assert leftovers(dest, name) == []  # no zip, download or temp folders left behind


@pytest.mark.parametrize("name", NAMES)
def test_complete_dataset_is_not_downloaded_again(tmp_path, creds, monkeypatch, capsys, name):
    dest = tmp_path / "data"
    download.download(name, dest, fetch=Fetch(name))
    monkeypatch.delenv("KAGGLE_KEY")  # a complete dataset needs no credentials either
    assert download.download(name, dest, fetch=refuse) == dest / name
    assert "already complete" in capsys.readouterr().out


def test_incomplete_dataset_is_replaced_and_force_downloads(tmp_path, creds):
    dest = tmp_path / "data"
    kaggle_zip(tmp_path / "small.zip", "flickr8k", n_images=1)
    download.extract(tmp_path / "small.zip", dest / "flickr8k")
    fetch = Fetch("flickr8k")
    download.download("flickr8k", dest, fetch=fetch)
    assert len(fetch.calls) == 1 and download.verify("flickr8k", dest / "flickr8k") == (3, 15)
    download.download("flickr8k", dest, force=True, fetch=fetch)
    assert len(fetch.calls) == 2 and leftovers(dest, "flickr8k") == []


@pytest.mark.skipif(not SHARED_FLICKR8K.is_dir(), reason="needs ../shared/data/flickr8k")
def test_real_flickr8k_layout_counts_as_complete(monkeypatch, capsys):
    """The shared 7,000-image subset is in the real Kaggle layout: verify() reads it as is."""
    spec = dataclasses.replace(download.DATASETS["flickr8k"], n_images=7_000, n_captions=35_000)
    monkeypatch.setitem(download.DATASETS, "flickr8k", spec)
    assert download.download("flickr8k", SHARED_FLICKR8K.parent, fetch=refuse) == SHARED_FLICKR8K
    assert "already complete (7,000 images, 35,000 captions)" in capsys.readouterr().out


@pytest.mark.parametrize("evil", ["../evil.jpg", "Images/../../evil.jpg", "ABSOLUTE"])
def test_path_traversal_member_is_refused(tmp_path, creds, evil):
    dest = tmp_path / "data"
    evil = str(tmp_path / "abs_evil.jpg") if evil == "ABSOLUTE" else evil
    fetch = Fetch("flickr8k", extra=[(zipfile.ZipInfo(evil), b"pwned")])
    with pytest.raises(DownloadError, match="refusing archive member.*outside"):
        download.download("flickr8k", dest, fetch=fetch)
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "abs_evil.jpg").exists()
    assert not (dest / "flickr8k").exists() and leftovers(dest, "flickr8k") == []


def test_symlink_member_pointing_outside_is_refused(tmp_path, creds):
    link = zipfile.ZipInfo("Images/link.jpg")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    fetch = Fetch("flickr8k", extra=[(link, b"../../../../etc/passwd")])
    dest = tmp_path / "data"
    with pytest.raises(DownloadError, match="symlink to '../../../../etc/passwd', outside"):
        download.download("flickr8k", dest, fetch=fetch)
    assert not (dest / "flickr8k").exists() and leftovers(dest, "flickr8k") == []


@pytest.mark.parametrize("damage", ["truncate", "crc"])
def test_corrupt_download_is_removed_with_clear_error(tmp_path, creds, damage):
    class Broken(Fetch):
        def write(self, path):
            data = super().write(path).read_bytes()
            if damage == "truncate":
                data = data[: len(data) // 2]
            else:  # flip bytes inside a stored member, so only its CRC check can notice
                data = data.replace(b"\x01" * 64, b"\x02" * 64, 1)
            path.write_bytes(data)
            self.path = path
            return path

    dest, fetch = tmp_path / "data", Broken("flickr8k")
    with pytest.raises(DownloadError, match="corrupt or truncated.*removed it"):
        download.download("flickr8k", dest, fetch=fetch)
    assert not fetch.path.exists()
    assert not (dest / "flickr8k").exists() and leftovers(dest, "flickr8k") == []


def caption_text(n_rows):
    """Caption-like rows, which deflate about 4:1 like the real captions files."""
    rng, words = random.Random(0), "a dog man woman runs jumps the in on grass water red child".split()
    return "".join(f"{rng.randrange(10**9)}.jpg,{' '.join(rng.choices(words, k=12))} .\n"
                   for _ in range(n_rows)).encode()


@pytest.mark.parametrize("data, refused", [
    pytest.param(b"\0" * (2 << 20), True, id="bomb"),  # 2 MB from ~2 KB
    pytest.param(b"\0" * (512 << 10), False, id="small"),  # as compressible, but too small to matter
    pytest.param(random.Random(0).randbytes(archive.RATIO_MIN_SIZE + 1), False, id="jpeg"),  # 1:1
    pytest.param(caption_text(16_000), False, id="captions"),  # 4:1, 1.1 MB
])
def test_zip_bomb_member_is_refused_but_real_ratios_pass(tmp_path, creds, data, refused):
    member = zipfile.ZipInfo("Images/extra.jpg")
    member.compress_type = zipfile.ZIP_DEFLATED
    dest, fetch = tmp_path / "data", Fetch("flickr8k", extra=[(member, data)])
    if refused:
        with pytest.raises(DownloadError, match=r"refusing archive member 'Images/extra.jpg': "
                                                 r"it would unpack from [\d,]+ bytes to 2.1 MB, "
                                                 r"[\d,]+ times its size \(the limit is 200\)"):
            download.download("flickr8k", dest, fetch=fetch)
        assert not (dest / "flickr8k").exists()
    else:
        assert (download.download("flickr8k", dest, fetch=fetch) / member.filename).read_bytes() == data
    assert leftovers(dest, "flickr8k") == []  # a refused archive is deleted, not kept for reuse


def test_member_longer_than_its_header_is_cut_off(tmp_path, monkeypatch):
    """zipfile itself stops at the declared size; a reader that did not must not fill the disk."""
    archive, real_open = kaggle_zip(tmp_path / "flickr8k.zip", "flickr8k"), zipfile.ZipFile.open

    def lying_open(self, member, *args, **kwargs):
        src = real_open(self, member, *args, **kwargs)
        return io.BytesIO(src.read() + b"\0" * (2 << 20)) if src.name == "Images/0.jpg" else src

    monkeypatch.setattr(zipfile.ZipFile, "open", lying_open)
    declared = zipfile.ZipFile(archive).getinfo("Images/0.jpg").file_size
    with pytest.raises(download.BadArchive, match=f"'Images/0.jpg': it unpacks to more than the "
                                                  f"{declared} bytes its header declares"):
        download.extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "Images" / "0.jpg").stat().st_size <= declared


def no_space(m):
    m.setattr(download.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=100_000))


def disk_full(m):
    def open_(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return open(path, mode, *args, **kwargs)
    m.setattr(archive, "open", open_, raising=False)  # extract writes there


@pytest.mark.parametrize("failure, message", [
    pytest.param(no_space, r"not enough space to extract flickr8k.zip: it unpacks to 0.0 MB \(plus a "
                           r"250.0 MB margin\) but only 0.1 MB is free in .*data; ", id="no_space"),
    pytest.param(disk_full, r"could not extract flickr8k.zip into .* \(\[Errno 28\] No space left "
                            r"on device: ", id="disk_full"),
])
def test_failed_extraction_keeps_the_archive_and_a_rerun_reuses_it(
        tmp_path, creds, monkeypatch, capsys, failure, message):
    dest = tmp_path / "data"
    archive = dest / ".flickr8k-download" / "flickr8k.zip"
    with monkeypatch.context() as m, pytest.raises(DownloadError, match=message) as err:
        failure(m)
        download.download("flickr8k", dest, fetch=Fetch("flickr8k"))
    assert str(err.value).endswith(f"; kept the downloaded archive at {archive}, so running this "
                                   "again extracts it without downloading it again")
    assert archive.is_file() and not (dest / "flickr8k").exists()
    assert leftovers(dest, "flickr8k") == [".flickr8k-download"]  # no half-extracted folder
    monkeypatch.delenv("KAGGLE_KEY")  # reusing the archive needs neither Kaggle nor credentials
    assert download.download("flickr8k", dest, fetch=refuse) == dest / "flickr8k"
    assert f"Reusing {archive}" in capsys.readouterr().out
    assert download.verify("flickr8k", dest / "flickr8k") == (3, 15) and leftovers(dest, "flickr8k") == []


@pytest.mark.parametrize("name", NAMES)
def test_wrong_counts_name_expected_and_found(tmp_path, creds, name):
    dest = tmp_path / "data"
    with pytest.raises(DownloadError) as err:
        download.download(name, dest, fetch=Fetch(name, n_images=2))
    assert "expected at least 3 images" in str(err.value) and "found 2" in str(err.value)
    assert "expected at least 15 captions" in str(err.value) and "found 10" in str(err.value)
    assert not (dest / name).exists() and leftovers(dest, name) == []


def test_missing_credentials_one_sentence(tmp_path, capsys):
    with pytest.raises(DownloadError) as err:
        download.download("flickr8k", tmp_path / "data", fetch=refuse)
    assert str(err.value) == download.NO_CREDENTIALS
    assert download.main(["flickr8k", "--dest", str(tmp_path / "data")]) == 1
    stderr = capsys.readouterr().err
    assert stderr.strip() == "error: " + download.NO_CREDENTIALS and "Traceback" not in stderr
    assert not (tmp_path / "data").exists()


def test_env_credentials_reach_fetch_and_key_never_printed(tmp_path, creds, capsys, caplog):
    fetch = Fetch("flickr8k")
    download.download("flickr8k", tmp_path / "data", fetch=fetch)
    c = fetch.calls[0][2]
    assert (c.username, c.key) == ("alice", KEY) and KEY not in repr(c)

    def leaky(slug, out_dir, credentials):  # a library error that quotes the key
        raise RuntimeError(f"auth failed for alice:{credentials.key}")

    with pytest.raises(DownloadError) as err:
        download.download("flickr30k", tmp_path / "data", fetch=leaky)
    assert KEY not in str(err.value) and "***" in str(err.value)
    out = capsys.readouterr()
    assert KEY not in out.out + out.err + caplog.text


@pytest.mark.parametrize("where", ["argument", "config_dir", "home"])
def test_kaggle_json_credentials(tmp_path, monkeypatch, capsys, caplog, isolated, where):
    folder = {"argument": tmp_path / "elsewhere", "config_dir": tmp_path / "cfg",
              "home": isolated / ".kaggle"}[where]
    folder.mkdir()
    (folder / "kaggle.json").write_text(json.dumps({"username": "bob", "key": KEY}))
    if where == "config_dir":
        monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(folder))
    fetch = Fetch("flickr30k")
    monkeypatch.setattr(download, "kaggle_fetch", fetch)  # main() uses the default fetch
    argv = ["flickr30k", "--dest", str(tmp_path / "data")]
    if where == "argument":
        argv += ["--kaggle-json", str(folder / "kaggle.json")]
    assert download.main(argv) == 0
    assert fetch.calls[0][2].key == KEY
    out = capsys.readouterr()
    assert KEY not in out.out + out.err + caplog.text


def test_invalid_kaggle_json_is_reported_without_its_content(tmp_path, capsys):
    bad = tmp_path / "kaggle.json"
    bad.write_text(json.dumps({"username": "bob", "kee": KEY}))
    assert download.main(["flickr8k", "--dest", str(tmp_path), "--kaggle-json", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "not a valid kaggle.json" in err and KEY not in err
    assert download.main(["flickr8k", "--kaggle-json", str(tmp_path / "none.json")]) == 1
    assert "kaggle.json not found" in capsys.readouterr().err


@pytest.mark.parametrize("content", [{"username": None, "key": None}, {"username": "bob", "key": ""},
                                     {"username": " ", "key": KEY}, {"username": "bob", "key": 12345}],
                         ids=["null", "empty_key", "blank_username", "number_key"])
def test_null_or_empty_username_or_key_is_invalid(tmp_path, isolated, content):
    path = tmp_path / "kaggle.json"
    path.write_text(json.dumps(content))
    # a file, and what a notebook passes to install_kaggle_json
    for load in (lambda: download.find_credentials(path), lambda: download.install_kaggle_json(content)):
        with pytest.raises(DownloadError, match="is not a valid kaggle.json") as err:
            load()
        assert KEY not in str(err.value)
    assert not (isolated / ".kaggle").exists()


@pytest.mark.skipif(os.name == "nt", reason="no POSIX file modes")
@pytest.mark.parametrize("mode, warned", [(0o644, True), (0o640, True), (0o600, False)],
                         ids=["644", "640", "600"])
def test_kaggle_json_readable_by_others_is_warned_about(tmp_path, capsys, mode, warned):
    path = tmp_path / "kaggle.json"
    path.write_text(json.dumps({"username": "bob", "key": KEY}))
    path.chmod(mode)
    assert download.find_credentials(path).key == KEY
    err = capsys.readouterr().err
    assert err == (f"warning: {path} is readable by other users: run chmod 600 {path}\n" if warned else "")


@pytest.mark.parametrize("kind", ["dict", "bytes", "path", "colab"])
def test_install_kaggle_json_writes_mode_600(tmp_path, isolated, capsys, kind):
    content = {"username": "carol", "key": KEY}
    raw = json.dumps(content).encode()
    src = tmp_path / "upload.json"
    src.write_bytes(raw)
    target = isolated / ".kaggle" / "kaggle.json"
    target.parent.mkdir()
    target.write_text("old")
    target.chmod(0o644)  # a looser existing file must be tightened
    arg = {"dict": content, "bytes": raw, "path": str(src), "colab": {"kaggle.json": raw}}[kind]
    assert download.install_kaggle_json(arg) == target
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert json.loads(target.read_text()) == content
    assert download.find_credentials().key == KEY
    assert KEY not in capsys.readouterr().out


def test_install_kaggle_json_honours_config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "cfg"))
    path = download.install_kaggle_json({"username": "d", "key": KEY})
    assert path == tmp_path / "cfg" / "kaggle.json" and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_main_rejects_unknown_dataset(capsys):
    with pytest.raises(SystemExit) as exit_:
        download.main(["flickr9k"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "invalid choice" in err


class HTTPError(Exception):
    def __init__(self, status):
        super().__init__(f"HTTP {status}")
        self.response = types.SimpleNamespace(status_code=status)


@pytest.mark.parametrize("error, message", [
    (ConnectionError("Name or service not known"), "Could not reach Kaggle (network unavailable"),
    (TimeoutError(), "Could not reach Kaggle"),
    (HTTPError(401), "did not accept the credentials from KAGGLE_USERNAME/KAGGLE_KEY (HTTP 401)"),
    (SystemExit(1), "did not accept the credentials"),
    (HTTPError(500), "Kaggle answered HTTP 500"),
])
def test_fetch_failures_become_one_clear_sentence(tmp_path, creds, capsys, error, message):
    def failing(*a):
        raise error

    with pytest.raises(DownloadError, match=re.escape(message)) as err:
        download.download("flickr8k", tmp_path / "data", fetch=failing)
    assert "kaggle.com/datasets/adityajn105/flickr8k" in str(err.value)
    assert leftovers(tmp_path / "data", "flickr8k") == []  # no empty download folder left
    assert str(err.value).count(". ") == 0 and KEY not in str(err.value)


def test_real_fetch_hands_credentials_to_the_kaggle_api(tmp_path, monkeypatch):
    """kaggle_fetch against a stand-in `kaggle` package (import-time authenticate included)."""
    seen = {}

    class KaggleApi:
        def authenticate(self):
            seen["env"] = (os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY"))

        def dataset_download_files(self, dataset, path=None, force=False, quiet=True, unzip=False):
            seen["call"] = (dataset, unzip)
            kaggle_zip(Path(path) / (dataset.split("/")[1] + ".zip"), "flickr8k")

    ext = types.ModuleType("kaggle.api.kaggle_api_extended")
    ext.KaggleApi = KaggleApi
    for mod, obj in [("kaggle", types.ModuleType("kaggle")),
                     ("kaggle.api", types.ModuleType("kaggle.api")),
                     ("kaggle.api.kaggle_api_extended", ext)]:
        monkeypatch.setitem(sys.modules, mod, obj)
    download.kaggle_fetch("adityajn105/flickr8k", tmp_path, download.Credentials("kaggle.json", "erin", KEY))
    assert seen == {"env": ("erin", KEY), "call": ("adityajn105/flickr8k", False)}
    assert "KAGGLE_KEY" not in os.environ and "KAGGLE_USERNAME" not in os.environ  # restored
    assert (tmp_path / "flickr8k.zip").is_file()


@pytest.mark.parametrize("missing,hint", [("six", "needs the module 'six'"),
                                           ("kaggle", "The kaggle package is not installed")])
def test_kaggle_import_failure_names_the_real_cause(tmp_path, monkeypatch, missing, hint):
    """kaggle 2.2 imports `six` without declaring it: an installed kaggle that fails to import
    must not be reported as "not installed"."""
    for mod in [m for m in sys.modules if m == "kaggle" or m.startswith("kaggle.")]:
        monkeypatch.delitem(sys.modules, mod)
    real_import = __import__

    def failing_import(name, *args, **kwargs):
        if name.startswith("kaggle"):
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", failing_import)
    with pytest.raises(DownloadError) as err:
        download.kaggle_fetch("adityajn105/flickr8k", tmp_path, download.Credentials("kaggle.json", "erin", KEY))
    install = 'pip install "clip-foundation[kaggle]"' if missing == "kaggle" else f"pip install {missing}"
    assert hint in str(err.value) and install in str(err.value)


def test_interrupted_download_is_kept_for_resume_but_never_extracted(tmp_path, creds):
    def interrupted(slug, out_dir, credentials):
        (Path(out_dir) / "flickr8k.zip").write_bytes(b"PK\x03\x04 partial")
        raise ConnectionError("connection reset")

    dest = tmp_path / "data"
    with pytest.raises(DownloadError, match="Could not reach Kaggle"):
        download.download("flickr8k", dest, fetch=interrupted)
    assert (dest / ".flickr8k-download" / "flickr8k.zip").is_file() and not (dest / "flickr8k").exists()
    download.download("flickr8k", dest, fetch=Fetch("flickr8k"))  # kaggle resumes into the same folder
    assert leftovers(dest, "flickr8k") == []
