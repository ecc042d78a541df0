"""build_model.ipynb: stored without outputs, holds no model code, and runs headless in QUICK mode.

The execution test runs every cell with nbclient on the CPU (synthetic data, small model, few
epochs) in a temporary folder, fails on any cell error, and checks that every cell tagged
"figure" drew an image. The executed notebook is never written back into the repository; set
CLIP_NOTEBOOK_OUT=PATH to keep a copy for inspection.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.notebook  # executes build_model.ipynb headless: about a minute

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "build_model.ipynb"
TOOL = ROOT / "tools" / "strip_notebook.py"


def strip_tool():
    spec = importlib.util.spec_from_file_location("strip_notebook", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cells(kind=None):
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    return [c for c in nb["cells"] if kind is None or c["cell_type"] == kind]


def source(cell) -> str:
    return "".join(cell["source"])


def test_notebook_is_stored_without_outputs():
    result = subprocess.run([sys.executable, str(TOOL), "--check", str(NOTEBOOK)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_strip_tool_strips_and_check_catches_outputs(tmp_path):
    strip_notebook = strip_tool()
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    nb["cells"][2]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]
    nb["cells"][2]["execution_count"] = 3
    nb["cells"][2]["metadata"]["scrolled"] = True
    nb["metadata"]["colab"]["provenance"] = [{"file_id": "x"}]
    dirty = tmp_path / "dirty.ipynb"
    dirty.write_text(json.dumps(nb, indent=2), encoding="utf-8")
    assert strip_notebook.main(["--check", str(dirty)]) == 1
    assert strip_notebook.main([str(dirty)]) == 0
    assert strip_notebook.main(["--check", str(dirty)]) == 0
    assert dirty.read_text(encoding="utf-8") == NOTEBOOK.read_text(encoding="utf-8")  # back to the stored bytes


def test_notebook_is_glue_not_model_code():
    code = "\n".join(source(c) for c in cells("code"))
    assert not re.search(r"^\s*class\s", code, re.MULTILINE), "model code lives in clipModel.py, not here"
    assert "nn.Module" not in code and "torch.optim" not in code and "backward(" not in code
    for query in ("dog", "plane", "Gloomy weather", "someone dunks on the basket"):  # the seed's searches
        assert f'gallery.show("{query}")' in code or f'gallery.find_matches("{query}")' in code
    assert not re.search(r"^\s*def find_matches", code, re.MULTILINE), "the library's Gallery searches"
    assert "colab.research.google.com/github/" in source(cells("markdown")[0])  # the Open in Colab badge


def test_repository_url_is_the_package_one_everywhere():
    """The Colab set-up cell clones, and every badge opens, the repository named in one place."""
    from clip_foundation import REPO_URL
    setup = next(source(c) for c in cells("code") if "REPO_URL =" in source(c))
    assert f'REPO_URL = "{REPO_URL}"' in setup
    badge = REPO_URL.replace("https://github.com/", "https://colab.research.google.com/github/")
    badge += "/blob/main/build_model.ipynb"
    for text in (source(cells("markdown")[0]), (ROOT / "README.md").read_text(encoding="utf-8")):
        links = re.findall(r"https://colab\.research\.google\.com/github/[^)\s]+", text)
        assert links and set(links) == {badge}


def run_notebook(tmp_path, monkeypatch, **env):
    """Execute every cell with nbclient on the CPU, writing under tmp_path -> the executed notebook."""
    import nbformat
    from nbclient import NotebookClient
    for key, value in {"CLIP_WORKDIR": str(tmp_path), "HF_HUB_OFFLINE": "1", **env}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the CPU path, as CI has it
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the notebook's %matplotlib inline decides

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=600, startup_timeout=120,
                            resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    finally:
        if os.environ.get("CLIP_NOTEBOOK_OUT"):
            nbformat.write(nb, os.environ["CLIP_NOTEBOOK_OUT"])

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    figures = [c for c in nb.cells if "figure" in c.metadata.get("tags", [])]
    assert len(figures) >= 7
    for cell in figures:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert images, f"no figure drawn by the cell:\n{cell.source[:300]}"
    # Everything the run wrote is under tmp_path, none of it in the repository's runs/ or data/.
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "model.safetensors").is_file() and (runs[0] / "metrics.json").is_file()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"model saved in {runs[0].resolve()}" in printed
    return runs[0], printed


def test_notebook_runs_headless_in_quick_mode(tmp_path, monkeypatch):
    # QUICK mode, smaller than a user's QUICK run
    run, _ = run_notebook(tmp_path, monkeypatch, CLIP_QUICK="1", CLIP_EPOCHS="2", CLIP_SYNTHETIC_IMAGES="256")
    assert (tmp_path / "data" / "synthetic" / "captions.csv").is_file() and (tmp_path / "data" / "cache").is_dir()
    assert json.loads((run / "config.json").read_text())["model"]["image"]["kind"] == "scratch"


@pytest.fixture
def tiny_flickr8k(tmp_path):
    """A small folder in the Kaggle Flickr8k layout: Images/*.jpg, captions.txt, splits/{train,dev,test}.txt."""
    from PIL import Image

    from clip_foundation.data.sources import read_caption_csv
    from clip_foundation.data.synthetic import SyntheticConfig, generate
    source = generate(tmp_path / "synthetic", SyntheticConfig(n_train=48, n_val=8, n_test=16), progress=False)
    root = tmp_path / "flickr8k"
    (root / "Images").mkdir(parents=True)
    (root / "splits").mkdir()
    rows, lists = ["image,caption"], {"train": [], "val": [], "test": []}
    for i, record in enumerate(read_caption_csv(source)):
        name = f"{1000 + i}_photo.jpg"
        Image.open(record.image).convert("RGB").save(root / "Images" / name, quality=95)
        rows += [f'{name},"{caption}"' for caption in record.captions]
        lists[record.split].append(name)
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    for split, file in (("train", "train.txt"), ("val", "dev.txt"), ("test", "test.txt")):
        (root / "splits" / file).write_text("\n".join(lists[split]) + "\n")
    return root


def test_notebook_main_path_with_hf_towers_on_a_flickr8k_folder(tmp_path, monkeypatch, tiny_hf, tiny_flickr8k):
    """The path a Colab user takes (QUICK off: Hugging Face ViT + DistilBERT on a Flickr dataset), with
    tiny towers saved as local folders and a small folder in the Kaggle Flickr8k layout."""
    work = tmp_path / "work"
    work.mkdir()
    run, printed = run_notebook(work, monkeypatch, CLIP_QUICK="0", CLIP_DATASET=str(tiny_flickr8k),
                                CLIP_IMAGE_ENCODER=str(tiny_hf / "vit"), CLIP_TEXT_ENCODER=str(tiny_hf / "bert"),
                                CLIP_EPOCHS="1", CLIP_BATCH_SIZE="16")
    model = json.loads((run / "config.json").read_text())["model"]
    assert (model["image"]["kind"], model["text"]["kind"]) == ("hf", "hf")
    assert model["image"]["name"] == str(tiny_hf / "vit") and model["text"]["pooling"] == "cls"
    assert "QUICK=False: " in printed and "hf image tower, hf text tower" in printed
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 48 and len(split["test"]) == 16  # the folder's official split lists
