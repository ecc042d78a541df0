"""training/runlog.py: when curves.png is redrawn."""
from clip_foundation.training import runlog


def test_curves_are_redrawn_after_the_first_epoch_then_every_30_s_and_after_the_last(monkeypatch, tmp_path):
    drawn, now = [], [0.0]
    monkeypatch.setattr(runlog, "draw_curves", lambda history, path: drawn.append((len(history), path)))
    curves = runlog.CurvesFile(tmp_path / "curves.png", every=30.0, clock=lambda: now[0])
    ends = [(4.0 * epoch, epoch == 16) for epoch in range(1, 17)]  # a default run: 16 epochs of ~4 s
    history = []
    for at, last in ends:
        now[0] = at
        history.append({"epoch_end": True})
        curves.epoch_end(history, last=last)
    # epoch 1 (a picture early), then each epoch ending >= 30 s after the last drawing, then the last
    assert [n for n, _ in drawn] == [1, 9, 16]
    assert {path for _, path in drawn} == {tmp_path / "curves.png"}


def test_a_resumed_run_draws_after_its_first_epoch(monkeypatch, tmp_path):
    drawn = []
    monkeypatch.setattr(runlog, "draw_curves", lambda history, path: drawn.append(len(history)))
    assert runlog.CurvesFile(tmp_path / "curves.png", clock=lambda: 1e6).epoch_end([{}] * 7, last=False)
    assert drawn == [7]


def test_curves_file_is_a_png(tmp_path):
    history = [{"step": 10, "epoch": 1, "loss": 3.0, "temperature": 0.07},
               {"epoch": 1, "step": 10, "epoch_end": True, "val_text_to_image_R@1": 5.0}]
    runlog.CurvesFile(tmp_path / "curves.png").epoch_end(history, last=True)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
