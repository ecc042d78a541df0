"""A query from a shell: search.py draws a figure only when asked."""
import json
from pathlib import Path

from clip_foundation.search import command as search
from clip_foundation.search.gallery import gallery_records


def test_search_draws_a_figure_only_when_asked(tiny_run, checkpoint, tmp_path, capsys):
    data, _, _ = tiny_run
    base = [f"--checkpoint={checkpoint}", f"--data={data}", "-n", "4"]
    search.main(["a red circle", *base])
    assert not list(checkpoint.glob("*.png")) and "grid" not in capsys.readouterr().out
    search.main(["a red circle", *base, "--grid"])
    assert (checkpoint / "search_a_red_circle.png").stat().st_size > 1000
    assert f"grid: {checkpoint / 'search_a_red_circle.png'}" in capsys.readouterr().out
    search.main(["a red circle", *base, f"--out={tmp_path / 'mine.png'}"])  # a path asks for it too
    assert (tmp_path / "mine.png").is_file()
    capsys.readouterr()
    search.main(["a blue square", *base, "--json", "--grid"])
    assert json.loads(capsys.readouterr().out)["query"] == "a blue square"  # the JSON alone
    assert not (checkpoint / "search_a_blue_square.png").exists()
    image = gallery_records(checkpoint, str(data), "test")[0].image
    search.main(["--image", str(image), *base])
    assert not list(checkpoint.glob("captions_*.png"))
    search.main(["--image", str(image), *base, "--grid"])
    assert (checkpoint / f"captions_{Path(image).stem}.png").is_file()
