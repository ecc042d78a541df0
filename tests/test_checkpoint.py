"""checkpoint.py and train.py's resume: atomic saves, exact continuation, NaN stops."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clip_foundation import training as train
from clip_foundation.training import loop
from clip_foundation.training.checkpoint import find_resume, last_checkpoint, load_last, save_last
from clipModel import CLIPModel
from conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def same_tokenizer_for_same_captions():
    """tokenizers' WordPiece trainer breaks frequency ties in hash order, so two fresh runs on one
    seed can get different vocabularies (and so different runs). A resumed run reloads its saved
    tokenizer; only the separately started reference run needs the same one pinned."""
    import clipModel
    made, train_tokenizer = {}, clipModel.train_tokenizer

    def pinned(captions, *args, **kwargs):
        key = (tuple(captions), args, tuple(sorted(kwargs.items())))
        return made.setdefault(key, train_tokenizer(captions, *args, **kwargs))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clipModel, "train_tokenizer", pinned)
        yield


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from clip_foundation.data.synthetic import SyntheticConfig, generate
    root = tmp_path_factory.mktemp("resume")
    return generate(root / "data", SyntheticConfig(n_train=120, n_val=20, n_test=20), progress=False), root


@pytest.fixture(scope="module")
def whole_run(tiny_data):
    """The uninterrupted run that the resumed ones must reproduce."""
    train.main(args(tiny_data, "whole", "--save_every=2"))
    return tiny_data[1] / "runs" / "whole"


def args(tiny_data, name, *extra):
    data, root = tiny_data
    return [f"--data={data}", f"--out_dir={root / 'runs'}", f"--run_name={name}", "--epochs=2",
            "--batch_size=20", "--warmup_steps=3", "--progress=false", "--log_every=1",
            f"--cache_dir={root / 'cache'}", *TINY_MODEL, *extra]


class Killed(Exception):
    pass


def kill_at(monkeypatch, step):
    """Make train.py's optimizer step raise on its `step`-th call, like a kill mid-epoch."""
    real, calls = loop.optimizer_step, []

    def step_or_die(*a, **kw):
        calls.append(1)
        if len(calls) == step:
            raise Killed
        return real(*a, **kw)
    monkeypatch.setattr(loop, "optimizer_step", step_or_die)


def model_state(folder):
    model, state = load_last(folder, "cpu")
    return model.state_dict(), state


@pytest.mark.slow
@pytest.mark.parametrize("kill_step", [5, 9])  # 6 steps per epoch: mid epoch 1, mid epoch 2
def test_resume_continues_to_the_uninterrupted_result(tiny_data, whole_run, monkeypatch, kill_step):
    with monkeypatch.context() as m:
        kill_at(m, kill_step)
        with pytest.raises(Killed):
            train.main(args(tiny_data, f"cut{kill_step}", "--save_every=3"))
    run = tiny_data[1] / "runs" / f"cut{kill_step}"
    saved_step = torch.load(last_checkpoint(run) / "trainer_state.pt", weights_only=True)["step"]
    assert saved_step == kill_step - 1 - (kill_step - 1) % 3  # the last save before the kill
    assert saved_step < kill_step - 1  # so steps logged after that save must not appear twice
    train.main(["--resume=" + str(run), "--progress=false"])

    whole, whole_state = model_state(whole_run / "last")
    resumed, resumed_state = model_state(run / "last")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], msg=name)
    assert resumed_state["step"] == whole_state["step"] == 12
    torch.testing.assert_close(resumed_state["optimizer"]["state"][0]["exp_avg"],
                               whole_state["optimizer"]["state"][0]["exp_avg"])
    # the log continues where it stopped: the losses of the two runs agree step by step
    logged = lambda r: [(e["step"], e["loss"]) for e in map(json.loads, open(r / "log.jsonl")) if "loss" in e]  # noqa: E731
    whole_log, resumed_log = logged(whole_run), logged(run)
    assert [s for s, _ in resumed_log] == [s for s, _ in whole_log] == list(range(1, 13))
    assert [loss for _, loss in resumed_log] == pytest.approx([loss for _, loss in whole_log], rel=1e-5)


@pytest.mark.slow
def test_resume_latest_and_extending_epochs(tiny_data, whole_run):
    shutil.copytree(whole_run, whole_run.parent / "extend")
    model, run_dir, _ = train.main(["--resume=latest", f"--out_dir={tiny_data[1] / 'runs'}", "--run_name=extend",
                                    "--epochs=3", "--progress=false"])
    assert run_dir == tiny_data[1] / "runs" / "extend"
    state = torch.load(run_dir / "last" / "trainer_state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (3, 18)
    assert json.loads((run_dir / "config.json").read_text())["train"]["epochs"] == 3


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_resume("latest", str(tmp_path))
    with pytest.raises(SystemExit, match="not a run folder"):
        train.main([f"--resume={tmp_path}"])


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, monkeypatch):
    real, calls = loop.clip_loss, []

    def loss_turning_nan(*a):
        calls.append(1)
        return real(*a) * (float("nan") if len(calls) >= 8 else 1.0)
    monkeypatch.setattr(loop, "clip_loss", loss_turning_nan)
    with pytest.raises(SystemExit) as stop:
        train.main(args(tiny_data, "nan", "--save_every=3"))
    message = str(stop.value)
    assert "nan at step 8" in message and "last good checkpoint" in message and "--resume=" in message
    run = tiny_data[1] / "runs" / "nan"
    model, state = load_last(last_checkpoint(run), "cpu")
    assert state["step"] == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    CLIPModel.from_pretrained(run)  # the best model (epoch 1) is intact too


def _tiny_model():
    from clipModel import CLIPConfig, ImageEncoderConfig, TextEncoderConfig
    from conftest import TINY_CAPTIONS
    cfg = CLIPConfig(image=ImageEncoderConfig(kind="scratch", image_size=32, width=32, depth=1, heads=2),
                     text=TextEncoderConfig(kind="scratch", width=32, depth=1, heads=2, vocab_size=100))
    return CLIPModel(cfg, captions=TINY_CAPTIONS)


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _tiny_model()
    save_last(tmp_path, model, {"step": 1}, {})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.logit_scale.add_(1.0)

    def torn_write(obj, path, *a, **kw):
        Path(path).write_bytes(b"\x80half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(KeyboardInterrupt):
        save_last(tmp_path, model, {"step": 2}, {})
    monkeypatch.undo()
    loaded, state = load_last(find_resume(str(tmp_path), ""), "cpu")
    assert state["step"] == 1
    torch.testing.assert_close(loaded.state_dict()["logit_scale"], before["logit_scale"])
    (tmp_path / "last").rename(tmp_path / "last.old")  # killed between the two renames
    assert find_resume(str(tmp_path), "") == tmp_path / "last.old"


def test_best_model_file_is_replaced_atomically(tmp_path, monkeypatch):
    import safetensors.torch
    model = _tiny_model()
    model.save_pretrained(tmp_path)

    def torn(module, filename, *a, **kw):
        Path(filename).write_bytes(b"torn")
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_model", torn)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    CLIPModel.from_pretrained(tmp_path)  # the previous file is whole


SAVER = """
import sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_checkpoint import _tiny_model
from clip_foundation.training.checkpoint import save_last
model = _tiny_model()
print("ready", flush=True)
for step in range(10**6):
    save_last({run!r}, model, {{"step": step, "payload": torch.randn(200_000)}}, {{}})
"""


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.1, 0.5])
def test_sigkill_during_saves_never_leaves_a_torn_checkpoint(tmp_path, delay):
    code = SAVER.format(root=str(ROOT), tests=str(ROOT / "tests"), run=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert child.stdout.readline().strip() == "ready"
    deadline = time.time() + 30
    while last_checkpoint(tmp_path) is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    model, state = load_last(find_resume(str(tmp_path), ""), "cpu")
    assert state["step"] >= 0 and state["payload"].shape == (200_000,)
