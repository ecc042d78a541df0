"""The CLIP-Foundation library: data, training mechanics, retrieval, search and figures.

The model itself lives in `clipModel.py` beside this package; the scripts at the root
(`train.py`, `evaluate.py`, `search.py`, `download.py`) are thin command lines over both.
"""

# The project's repository: the notebook's Colab set-up cell clones it and the "Open in Colab"
# badges point at its notebook (tests/test_notebook.py checks each copy against this one).
REPO_URL = "https://github.com/CLIP-Foundation/clip-foundation"

from clip_foundation import pretrained  # noqa: E402,F401  registers the pip-packaged ImageNet weights with clipModel
