"""benchmarks/zeroshot_speed.py runs the real `evaluate.py --zeroshot` per engine and prints its figures."""
import pytest

pytestmark = pytest.mark.slow  # four fresh evaluate.py processes


def test_the_zeroshot_speed_benchmark_times_each_engine_twice(checkpoint, capsys):
    from benchmarks import zeroshot_speed
    result = zeroshot_speed.main([f"--checkpoint={checkpoint}", "--images=20", "--engines=torch,onnxruntime"])
    out = capsys.readouterr().out
    assert "CPU: " in out and "load average" in out and "zero-shot of 20 images (10 classes)" in out
    assert set(result["runs"]) == {"torch", "onnxruntime"} and all(len(r) == 2 and min(r) > 0 for r in result["runs"].values())
    assert "--engine=onnxruntime" in out and out.count("run 2 ") == 2 and "x\n" in out


def test_the_class_folders_hold_every_image_once(tmp_path):
    from benchmarks.zeroshot_speed import CLASSES, class_folders
    class_folders(tmp_path, 23)
    files = sorted(tmp_path.rglob("*.png"))
    assert len(files) == 23 and {f.parent.name for f in files} == set(CLASSES)
