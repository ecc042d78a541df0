"""CLIP-Foundation: train, evaluate and search a CLIP (contrastive language-image pretraining) model.

    from clip_foundation import Gallery, RunConfig, train
    gallery = Gallery.from_run("runs/NAME")
    gallery.find_matches("a dog")

`__all__` is the public API (the README's API section); each name is imported from its room on first
use, so `import clip_foundation` stays light: it imports no torch (a text query from the shell may be
answered without it, search/quick.py). The model itself lives in `clipModel.py` beside this package.
The rooms, imports pointing down: common <- data <- engines <- evaluate <- embed <- search <- training
<- app; the commands at the root (`train.py`, `evaluate.py`, ...) run their `main`s.
"""
from clip_foundation.common.lazy import lazy_exports

# The project's repository: the notebook's Colab set-up cell clones it and the "Open in Colab"
# badges point at its notebook (tests/test_notebook.py checks each copy against this one).
REPO_URL = "https://github.com/CLIP-Foundation/clip-foundation"

_WHERE = {
    # data
    "Record": ".data.records", "DataError": ".data.records", "load_records": ".data.sources",
    "download": ".data.download",
    # training
    "RunConfig": ".training.config", "train": ".training.loop",
    # evaluation
    "evaluate_records": ".evaluate.metrics", "retrieval_metrics": ".evaluate.metrics", "classify": ".evaluate.zeroshot",
    # engines, search, the page, the Hub
    "use_engine": ".engines.registry",
    "Gallery": ".search.gallery", "find_matches": ".search.gallery", "find_captions": ".search.gallery",
    "SearchPage": ".app.page", "push_to_hub": ".hub",
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
