"""plots.py: figures draw without a screen (MPLBACKEND=Agg, set in conftest.py) and show every
image file upright, decoded the one way the loader does (readers.open_rgb)."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clip_foundation.evaluate import plots  # noqa: E402
from clip_foundation.data.records import DataError  # noqa: E402

RED, BLUE = (220, 0, 0), (0, 0, 220)


def rotated_jpeg(path: Path) -> Path:
    """A 40x20 photo stored sideways, as phones do: red left half, blue right half, and EXIF
    Orientation=6 (turn 90 degrees clockwise to show): upright it is 20x40, red on top."""
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif)
    return path


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plots._plt().close("all")


def _close(pixel, expect):  # JPEG blurs colours a little
    return all(abs(int(a) - b) <= 40 for a, b in zip(pixel, expect))


def test_image_files_are_shown_upright(tmp_path):
    pixels = plots._as_array(rotated_jpeg(tmp_path / "sideways.jpg"))
    assert pixels.shape == (40, 20, 3)
    assert _close(pixels[2, 10], RED) and _close(pixels[37, 10], BLUE)


def _match(path):
    return SimpleNamespace(path=path, score=0.5, caption="a red and blue card")


FIGURES = {  # every figure that takes image files: name -> draw(image file, save to)
    "image_grid": lambda p, out: plots.image_grid([_match(p)], title="q", path=out),
    "query_grids": lambda p, out: plots.query_grids({"a card": [_match(p)]}, path=out),
    "captions_figure": lambda p, out: plots.captions_figure(p, [_match(p)], path=out),
    "captioned_images": lambda p, out: plots.captioned_images([p], ["a card"], path=out),
    "class_probabilities": lambda p, out: plots.class_probabilities(
        [p], [[("card", 0.9), ("dog", 0.1)]], path=out),
}


@pytest.mark.parametrize("name", FIGURES)
def test_figures_draw_image_files_upright(tmp_path, name):
    out = tmp_path / "figs" / f"{name}.png"
    fig = FIGURES[name](rotated_jpeg(tmp_path / "sideways.jpg"), out)
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape[:2] == (40, 20) and _close(shown[2, 10], RED)
    assert out.stat().st_size > 0


@pytest.mark.parametrize("data", [None, b"not an image"], ids=["missing", "garbage"])
@pytest.mark.parametrize("name", ["image_grid", "captioned_images"])
def test_unreadable_image_file_names_the_file(tmp_path, name, data):
    path = tmp_path / "bad.jpg"
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(DataError, match=r"bad\.jpg: cannot decode image"):
        FIGURES[name](path, None)
