"""Every extension point takes a new entry from outside the package: each test registers one here
(removed again afterwards) and drives it through the real command on the tiny fixtures of conftest.py."""
import pytest


# ---- engines

from clip_foundation.engines import registry as engine_registry  # noqa: E402
from clip_foundation.evaluate.command import main as evaluate_main  # noqa: E402


class CountingEncoder(engine_registry.Encoder):
    """An engine the package has never heard of: torch's encodings, each tower's calls counted."""
    name = "counting"
    made: list = []  # every instance, so the test sees the one the command used

    def __init__(self, model, part="embed", folder=None):
        super().__init__(model, part, folder)
        self.calls = {"image": 0, "text": 0}
        type(self).made.append(self)

    def _run(self, tower, inputs):
        self.calls[tower] += 1
        return super()._run(tower, inputs)


@pytest.fixture
def counting_engine(monkeypatch):
    """CountingEncoder registered as --engine=counting for one test (into a copy of the registry)."""
    monkeypatch.setattr(engine_registry, "ENCODERS", dict(engine_registry.ENCODERS))
    monkeypatch.setattr(CountingEncoder, "made", [])
    return engine_registry.register_engine(CountingEncoder)


def test_a_registered_engine_encodes_for_the_evaluate_command(tiny_run, counting_engine, tmp_path, capsys):
    data, run_dir, _ = tiny_run
    args = ["--checkpoint", str(run_dir), "--data", str(data), "--split", "test"]
    with_torch = evaluate_main([*args, "--engine=torch", "--out", str(tmp_path / "torch.json")])
    assert counting_engine.made == []
    result = evaluate_main([*args, "--engine=counting", "--out", str(tmp_path / "counting.json")])
    (encoder,) = counting_engine.made
    assert encoder.calls["image"] > 0 and encoder.calls["text"] > 0  # every embedding went through it
    for key in ("text_to_image_R@1", "text_to_image_R@5", "image_to_text_R@1", "text_to_image_median_rank"):
        assert result[key] == pytest.approx(with_torch[key], abs=1e-6)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        evaluate_main(["--help"])
    assert "| torch | openvino | onnxruntime | counting" in capsys.readouterr().out  # its help lists it too


def test_an_unknown_engine_is_refused_naming_the_registered_ones(counting_engine, capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate_main(["--checkpoint=runs/x", "--engine=nope"])
    assert exit.value.code == 2
    assert "--engine='nope': must be auto | torch | openvino | onnxruntime | counting" in capsys.readouterr().err
