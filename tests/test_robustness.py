"""Probed defects of the entry points: damaged or read-only run folders, concurrent runs, resume
with a changed model, corrupt images in an evaluated split, stale prebuilt indexes."""
import json
import multiprocessing
import shutil
from pathlib import Path

import pytest

from clip_foundation.evaluate import command as evaluate
from clip_foundation.search import command as search
from clip_foundation.search import gallery
from clip_foundation import training as train
from conftest import TINY_MODEL


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from clip_foundation.data.synthetic import SyntheticConfig, generate
    root = tmp_path_factory.mktemp("robust")
    return generate(root / "data", SyntheticConfig(n_train=60, n_val=10, n_test=12), progress=False), root


def run_args(small_data, *extra):
    data, root = small_data
    return [f"--data={data}", f"--out_dir={root / 'runs'}", "--epochs=1", "--batch_size=20",
            "--warmup_steps=2", "--progress=false", "--tensorboard=false", f"--cache_dir={root / 'cache'}",
            *TINY_MODEL, *extra]


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A private copy of the session's trained run, free to damage."""
    data, run_dir, _ = tiny_run
    return data, Path(shutil.copytree(run_dir, tmp_path / "run"))


# ---------------------------------------------------------------- evaluate.py

def test_evaluate_refuses_a_checkpoint_corrupted_in_place(run_copy, capsys):
    data, run = run_copy
    weights = run / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # the probe: 4 KB overwritten mid-file, size unchanged
        f.seek(size // 2)
        f.write(b"\xff" * 4096)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", str(run), "--data", str(data), "--split", "test"])
    assert str(run) in str(exc.value) and "non-finite" in str(exc.value)
    assert "R@1" not in capsys.readouterr().out and not (run / "eval_test.json").exists()


def test_evaluate_names_a_corrupt_image_in_the_split_and_can_skip_it(run_copy, tmp_path, capsys):
    data, run = run_copy
    data = Path(shutil.copytree(data, tmp_path / "data"))
    rows = (data / "captions.csv").read_text().splitlines()
    victim = next(r.split(",")[0] for r in rows[1:] if r.endswith(",test") or ",test," in r)
    (data / victim).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    args = ["--checkpoint", str(run), "--data", str(data), "--split", "test", "--out", str(tmp_path / "m.json")]
    with pytest.raises(SystemExit) as exc:
        evaluate.main(args)
    assert Path(victim).name in str(exc.value) and "--skip_bad" in str(exc.value)
    metrics = evaluate.main(args + ["--skip-bad"])
    assert metrics["images"] == len({r.split(",")[0] for r in rows[1:] if ",test" in r}) - 1


@pytest.mark.parametrize("files, hint", [
    ({"notes.txt": "no dataset here"}, False),  # no known layout
    ({"captions.csv": "image,caption,caption\nimages/a.png,a,b\n"}, False),  # a repeated column
    ({"captions.csv": "image,caption\nimages/gone.png,a red circle\n"}, True)],  # a missing image
    ids=["layout", "header", "missing-image"])
def test_evaluate_offers_skip_bad_only_for_what_it_skips(run_copy, tmp_path, files, hint):
    _, run = run_copy
    data = tmp_path / "data"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", str(run), "--data", str(data), "--split", "all"])
    assert ("--skip_bad" in str(exc.value)) == hint, str(exc.value)


def test_evaluate_prints_the_metrics_even_when_it_cannot_write_them(run_copy, monkeypatch, capsys):
    data, run = run_copy
    real_write = Path.write_text

    def read_only(path, *args, **kwargs):
        if Path(path).parent == run:
            raise PermissionError(13, "Permission denied", str(path))
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    metrics = evaluate.main(["--checkpoint", str(run), "--data", str(data), "--split", "test"])
    out = capsys.readouterr()
    assert "text -> image" in out.out and metrics["text_to_image_R@1"] > 0
    assert "could not write" in out.err and "Permission denied" in out.err and "--out" in out.err


# ---------------------------------------------------------------- train.py: run folders

def _train_in_process(argv):
    from clip_foundation import training as entry
    _, run_dir, _ = entry.main(argv)
    return str(run_dir)


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_folders(small_data):
    argv = run_args(small_data, "--epochs=1")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        folders = pool.map(_train_in_process, [argv, argv])
    assert folders[0] != folders[1]
    for folder in map(Path, folders):
        assert (folder / "model.safetensors").is_file()
        for line in (folder / "log.jsonl").read_text().splitlines():
            json.loads(line)  # one record a line, never two fused


@pytest.mark.slow
def test_an_existing_run_is_never_replaced_without_a_flag(small_data):
    first = train.main(run_args(small_data, "--run_name=keep"))[1]
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit) as exc:
        train.main(run_args(small_data, "--run_name=keep"))
    message = str(exc.value)
    assert "already exists" in message and "--resume" in message and "--overwrite" in message
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    again = train.main(run_args(small_data, "--run_name=keep", "--overwrite"))[1]
    assert again == first and (first / "model.safetensors").stat().st_mtime_ns != stamp


@pytest.mark.slow
def test_a_run_folder_in_use_is_never_taken_over(small_data):
    # the probe: a second run with the same --run_name --overwrite deleted the first's folder mid-run
    refused = []

    def second_run(history, run_dir):
        if refused:
            return
        for extra in (["--run_name=busy", "--overwrite"], ["--run_name=busy"], [f"--resume={run_dir}"]):
            with pytest.raises(SystemExit) as exc:
                train.main(run_args(small_data, *extra))
            refused.append(str(exc.value))

    args = run_args(small_data, "--run_name=busy", "--epochs=2")
    _, run_dir, metrics = train.run(train.resolve_config(args), on_epoch=second_run)
    assert len(refused) == 3 and metrics["text_to_image_R@1"] >= 0  # the first run finished whole
    for message in refused:
        assert message.count("\n") == 0 and str(run_dir) in message and "another run" in message, message
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "matches.png").is_file()


@pytest.mark.slow
def test_a_killed_run_leaves_no_stale_lock(small_data):
    import signal
    import subprocess
    import sys
    folder = small_data[1] / "runs" / "killed"
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from clip_foundation.training.checkpoint import "
                               f"hold_run; lock = hold_run({str(folder)!r}); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(SystemExit, match="another run"):
        train.main(run_args(small_data, "--run_name=killed", "--overwrite"))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert train.main(run_args(small_data, "--run_name=killed", "--overwrite"))[1] == folder


@pytest.fixture(scope="module")
def shape_run(small_data):
    return train.main(run_args(small_data, "--run_name=shape"))[1]


@pytest.mark.parametrize("change", ["--image.width=32", "--projection_dim=32", "--text.kind=hf",
                                    "--image.image_size=48"])
@pytest.mark.slow
def test_resume_refuses_a_changed_model_shape(shape_run, change):
    run = shape_run
    with pytest.raises(SystemExit) as exc:
        train.main([f"--resume={run}", change, "--progress=false"])
    key = change[2:].split("=")[0]
    assert "cannot change the model" in str(exc.value) and key in str(exc.value)


@pytest.mark.slow
def test_resume_accepts_training_options(small_data):
    run = small_data[1] / "runs" / "options"
    train.main(run_args(small_data, "--run_name=options"))
    _, run_dir, _ = train.main([f"--resume={run}", "--epochs=2", "--lr=5e-4", "--progress=false"])
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["epochs"] == 2 and saved["train"]["lr"] == 5e-4


# ---------------------------------------------------------------- search.py and its index

def test_search_prints_results_first_when_indexed_images_are_gone(run_copy, tmp_path, capsys):
    data, run = run_copy
    data = Path(shutil.copytree(data, tmp_path / "data"))
    index_dir = tmp_path / "idx"
    search.main(["--build-index", "--checkpoint", str(run), "--data", str(data), "--out", str(index_dir)])
    query = ["a red circle", "--index", str(index_dir), "-n", "4", "--json", "--out", str(tmp_path / "g.png")]
    best = search.main(query)
    gone = Path(best[0].path)
    gone.unlink()  # moved or deleted after the index was built
    capsys.readouterr()
    results = search.main(query)
    out = capsys.readouterr()
    printed = json.loads(out.out)
    assert [m["path"] for m in printed["matches"]] == [m.path for m in results] and len(results) == 4
    assert printed["missing"] == [str(gone)] and str(gone) in out.err and "rebuild" in out.err
    assert not (tmp_path / "g.png").exists()  # --json draws nothing
    search.main([a for a in query if a != "--json"])
    assert "is stale" in capsys.readouterr().err
    assert (tmp_path / "g.png").is_file()  # drawn from the images still there


def test_truncated_index_file_is_rebuilt(run_copy, capsys):
    data, run = run_copy
    args = ["a blue square", "--checkpoint", str(run), "--data", str(data), "-n", "3"]
    first = search.main(args)
    for f in (run / "index").glob("images-*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    assert [m.path for m in search.main(args)] == [m.path for m in first]


def test_search_falls_back_to_the_user_cache_when_the_checkpoint_is_read_only(run_copy, tmp_path,
                                                                               monkeypatch, capsys):
    from clip_foundation.search import index as index_module
    data, run = run_copy
    shutil.rmtree(run / "index", ignore_errors=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_save = index_module.save_index

    def read_only(index, stem):
        if Path(stem).is_relative_to(run):
            raise PermissionError(13, "Permission denied", str(stem))
        return real_save(index, stem)

    monkeypatch.setattr(gallery, "save_index", read_only)
    args = ["a green triangle", "--checkpoint", str(run), "--data", str(data), "-n", "3",
            "--out", str(tmp_path / "g.png")]
    results = search.main(args)
    out = capsys.readouterr()
    assert len(results) == 3 and results[0].path in out.out and "Permission denied" in out.err
    saved = list((tmp_path / "cache" / "clip-foundation" / "index").glob("*/images-*.json"))
    assert len(saved) == 1
    stamp = saved[0].stat().st_mtime_ns
    search.main(args)  # found in the user cache: not rebuilt
    assert saved[0].stat().st_mtime_ns == stamp and "could not save" not in capsys.readouterr().err


# ---------------------------------------------------------------- checkpoints: disk full, damaged state

def test_disk_full_while_saving_last_is_one_clear_error(small_data, monkeypatch):
    import errno

    from clip_foundation.training import checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(SystemExit) as exc:
        train.main(run_args(small_data, "--run_name=full"))
    message = str(exc.value)
    assert "No space left on device" in message and "last" in message and "Traceback" not in message
    assert not (small_data[1] / "runs" / "full" / "last.tmp").exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_trainer_state_names_the_file(small_data, damage):
    run = small_data[1] / "runs" / f"state-{damage}"
    train.main(run_args(small_data, f"--run_name=state-{damage}"))
    state = run / "last" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:200] if damage == "truncate" else b"not a checkpoint")
    with pytest.raises(SystemExit) as exc:
        train.main([f"--resume={run}", "--epochs=2", "--progress=false"])
    assert "trainer_state.pt" in str(exc.value) and "corrupt" in str(exc.value)


@pytest.mark.slow
@pytest.mark.parametrize("text,problem", [("{\n", "not valid JSON"), ('{"train": {}}', 'no "model"')])
def test_broken_run_config_names_the_file_on_resume(small_data, text, problem):
    run = small_data[1] / "runs" / "badconfig"
    if not run.exists():
        train.main(run_args(small_data, "--run_name=badconfig"))
    (run / "last" / "config.json").write_text(text)
    with pytest.raises(SystemExit) as exc:
        train.main([f"--resume={run}", "--progress=false"])
    assert "config.json" in str(exc.value) and problem in str(exc.value)
