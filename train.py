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
                  to_model_input, train_loader)
from evaluate import evaluate_records, format_metrics
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


def train(cfg: RunConfig) -> tuple[CLIPModel, Path, dict]:
    """Train, keep the best model by validation recall, test it; return (model, run dir, metrics)."""
    tc = cfg.train
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    device = default_device() if tc.device == "auto" else torch.device(tc.device)
    splits = prepare_data(cfg)
    run_dir = Path(tc.out_dir) / (tc.run_name or time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)

    model = CLIPModel(cfg.model, captions=all_captions(splits["train"])).to(device)
    splits = {s: check_captions(recs, model.tokenizer, cfg.data.skip_bad) for s, recs in splits.items()}
    cfg.model = model.config  # resolved: image size and normalisation filled in
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    image_cfg, images = model.config.image, {}
    for s in [s for s in splits if splits[s]]:
        images[s], splits[s] = decode_images(splits[s], image_cfg.image_size, cfg.data.cache_dir,
                                             cfg.data.skip_bad, tc.progress)
    (run_dir / "split.json").write_text(json.dumps(split_manifest(splits)))
    tokens = model.tokenize(all_captions(splits["train"]))
    loader = train_loader(splits["train"], images["train"], tokens, tc.batch_size, tc.captions_per_epoch,
                          tc.seed, cfg.data.num_workers)
    total_steps = tc.epochs * len(loader)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc.warmup_steps, total_steps))
    print(f"training on {device}: {len(splits['train'])} images, {total_steps} steps, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {run_dir}")

    history, best, step = [], -1.0, 0
    log = open(run_dir / "log.jsonl", "w")
    for epoch in range(tc.epochs):
        model.train()
        loader.batch_sampler.set_epoch(epoch)
        bar = _progress(loader, tc.progress, f"epoch {epoch + 1}/{tc.epochs}")
        tick, pairs = time.perf_counter(), 0
        for batch_images, ids, mask in bar:
            pixels = to_model_input(batch_images.to(device), image_cfg.mean, image_cfg.std, tc.augment)
            image_f, text_f, scale = model(pixels, ids.to(device), mask.to(device))
            loss = clip_loss(image_f, text_f, scale)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
            step, pairs = step + 1, pairs + len(batch_images)
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
        if splits["val"]:
            val = evaluate_records(model, splits["val"], images["val"])
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
    log.close()
    return _finish(cfg, model, run_dir, splits, images, device)


def _finish(cfg: RunConfig, model: CLIPModel, run_dir: Path, splits, images, device):
    """Reload the best model, test it, draw retrieval grids, write metrics.json."""
    model = CLIPModel.from_pretrained(run_dir, device=device)
    split = "test" if splits["test"] else "val"
    metrics = {"split": split, **evaluate_records(model, splits[split], images[split])}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"{split} split:\n{format_metrics(metrics)}")
    from plots import query_grids
    from search import find_matches, load_or_build_index
    index = load_or_build_index(model, run_dir, splits[split], images=images[split])
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


USAGE = "usage: python train.py [--key=value ...]   (e.g. --epochs=5 --data=DIR --image.kind=timm)"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = RunConfig()
    if "-h" in argv or "--help" in argv:
        print(cli.help_text(cfg, USAGE))
        return None
    try:
        cli.apply_overrides(cfg, argv, aliases={"data": "data.path"})
    except cli.ConfigError as e:
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
