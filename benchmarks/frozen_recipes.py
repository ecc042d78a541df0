"""Recipes on frozen towers' cached features, each in seconds: the routes the field reports for
frozen unimodal towers on small paired data, measured with the flickr8k-pretrained preset's
protocol (trained on train minus 500 images, the epoch picked on those 500 by mean recall,
reported on the held-out split: Flickr8k's official dev split).

    python benchmarks/frozen_recipes.py --data=data/flickr8k                       # the preset's heads
    python benchmarks/frozen_recipes.py --data=data/flickr8k --recipes=base,fusemix,hardneg
    python benchmarks/frozen_recipes.py --data=data/flickr8k --seeds=0,1,2 --recipes=base

The features are the preset's own (the towers' outputs the real run caches, so a first call
encodes them once); `--towers=lite0,lite2` adds other pip-packaged towers' features side by side
and `flip` views are encoded once more with the images mirrored; `--towers=preset` reads the preset's
own tower's features exactly as its run caches them (the three Lites in one graph, int8 where the CPU
has VNNI units). Each recipe trains the two
projection heads and the temperature exactly as the real loop does (the unique-image sampler,
AdamW, warmup + cosine, `clip_loss`), changing one thing. A research script: it prints a table
and saves nothing but feature caches; the results are in docs/results.md.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from clip_foundation.data.splits import batch_indices, caption_offsets, train_sampler
from clip_foundation.evaluate.querybank import ALPHA, BETA, recall_with_bank
from clip_foundation.training.config import resolve_config
from clip_foundation.training.loop import build_inputs, build_model, prepare_data
from clip_foundation.training.presets import expand_preset
from clip_foundation.training.step import no_decay, warmup_cosine
from clipModel import ProjectionHead, clip_loss

TOWERS = {"lite0": "tf_efficientnet_lite0", "lite1": "tf_efficientnet_lite1", "lite2": "tf_efficientnet_lite2"}


# ---------------------------------------------------------------- features

def preset_features(data: str, tower: str = "lite2", flip: bool = False, size: int = 0,
                    cache_dir: str = "data/cache") -> dict:
    """{split: (image features (N, d), text features (M, 384), records)} for train/val/test, as
    the preset's run caches them; `flip`: the image features of the mirrored images; tower "preset":
    the preset's own image tower."""
    own = [] if tower == "preset" else [f"--image.name={TOWERS[tower]}", f"--image.image_size={size}"]
    argv = expand_preset(["--preset=flickr8k-pretrained", f"--data={data}", f"--cache_dir={cache_dir}",
                          "--engine=auto", *own])
    cfg = resolve_config(argv)
    splits = prepare_data(cfg)
    model, _ = build_model(cfg, splits, torch.device("cpu"), None)
    cfg.model = model.config
    if flip:  # a separate cache: the features of the images mirrored left to right
        return {s: (_flipped(model, cfg, s, recs), None, recs) for s, recs in splits.items() if recs}
    inputs = build_inputs(cfg, model, splits)
    return {s: (i.image_features, i.text_features, i.records) for s, i in inputs.items()}


def _flipped(model, cfg, split, records) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    from clip_foundation.data.splits import decode_images
    from clip_foundation.training.features import image_tower_features
    path = Path(cfg.data.cache_dir) / "recipes" / f"{model.config.image.name}-{split}-{len(records)}-flip.safetensors"
    if path.is_file():
        return load_file(path)["features"]
    images, _ = decode_images(records, model.config.image.image_size, cfg.data.cache_dir, False, True)
    features = image_tower_features(model, records, images.flip(-1), None, engine=cfg.train.engine)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": features.contiguous()}, path)
    return features


# ---------------------------------------------------------------- one recipe

class Heads(torch.nn.Module):
    """The preset's trainable part: two projection heads and the temperature."""

    def __init__(self, d_image: int, d_text: int, dim: int = 512, dropout: float = 0.3, temperature: float = 0.07):
        super().__init__()
        self.image, self.text = ProjectionHead(d_image, dim, dropout), ProjectionHead(d_text, dim, dropout)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def forward(self, x_image, x_text):
        return F.normalize(self.image(x_image), dim=-1), F.normalize(self.text(x_text), dim=-1)

    def scale(self):
        return self.logit_scale.clamp(max=math.log(100)).exp()


def hardest_negative_loss(image_f, text_f, margin: float = 0.2) -> torch.Tensor:
    """VSE++'s max-violation hinge (Faghri et al., 2018): each positive against its hardest in-batch negative."""
    sims = image_f @ text_f.T  # (B, B)
    positive = sims.diag()
    off = sims - 2 * torch.eye(len(sims))  # the positives never win the max
    return ((margin + off.max(1).values - positive).clamp(min=0) + (margin + off.max(0).values - positive).clamp(min=0)).mean()


def all_captions_loss(image_f, text_f, owner, scale) -> torch.Tensor:
    """Every caption of the batch's images at once: each caption's image among the batch's images
    (text -> image), and each image's captions all positive among every caption (image -> text)."""
    logits = scale * image_f @ text_f.T  # (B, M): M captions of the B images
    t2i = F.cross_entropy(logits.T, owner)
    positive = owner[None, :] == torch.arange(len(image_f))[:, None]  # (B, M)
    i2t = (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~positive, -torch.inf), 1)).mean()
    return (t2i + i2t) / 2


def fit(feats: dict, recipe: dict, seed: int = 0) -> dict:
    """Train heads on the train split's features with `recipe`'s changes; -> the best epoch's
    (by val mean recall) metrics on the test split, plain and with the querybank."""
    torch.manual_seed(seed)
    (xi, xt, records), (vi, vt, vrec) = feats["train"], feats["val"]
    flips = feats.get("flip")
    epochs, batch = recipe.get("epochs", 8), recipe.get("batch", 2048)
    heads = Heads(xi.shape[1], xt.shape[1], recipe.get("dim", 512), recipe.get("dropout", 0.3),
                  recipe.get("init_temperature", 0.07))
    decay = [p for n, p in heads.named_parameters() if not no_decay(n, p)]  # as the real loop's param_groups
    rest = [p for n, p in heads.named_parameters() if no_decay(n, p)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.get("wd", 0.1)},
                                   {"params": rest, "weight_decay": 0.0}], lr=recipe.get("lr", 3e-3))
    sampler = train_sampler(records, batch, recipe.get("captions", 5), seed)
    total = epochs * len(sampler)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(5, total))
    ema = copy.deepcopy(heads) if recipe.get("ema") else None  # judged and kept instead of the heads
    best, best_state, step = -1.0, None, 0
    offsets = caption_offsets(records)
    for epoch in range(epochs):
        heads.train()
        sampler.set_epoch(epoch)
        for image_index, caption_index in batch_indices(sampler, records):
            x_image, x_text = xi[image_index].float(), xt[caption_index].float()
            if flips is not None and recipe.get("flip_aug"):  # each image mirrored with probability 1/2
                mirrored = torch.rand(len(image_index)) < 0.5
                x_image = torch.where(mirrored[:, None], flips["train"][image_index].float(), x_image)
            if recipe.get("fusemix"):  # mixup of the pairs in the towers' feature spaces (FuseMix)
                lam = torch.distributions.Beta(recipe["fusemix"], recipe["fusemix"]).sample((len(x_image), 1))
                perm = torch.randperm(len(x_image))
                x_image, x_text = lam * x_image + (1 - lam) * x_image[perm], lam * x_text + (1 - lam) * x_text[perm]
            if recipe.get("feature_dropout"):  # as --feature_dropout: a fraction of the cached image features dropped
                x_image = F.dropout(x_image, recipe["feature_dropout"])
            if recipe.get("text_dropout"):
                x_text = F.dropout(x_text, recipe["text_dropout"])
            if recipe.get("feature_noise"):
                x_image = x_image + recipe["feature_noise"] * x_image.std(0) * torch.randn_like(x_image)
            scale = heads.scale() if not recipe.get("temperature") else torch.tensor(1 / recipe["temperature"])
            if recipe.get("allcaps"):  # every caption of the batch's images, not one each
                owner = torch.cat([torch.full((offsets[i + 1] - offsets[i],), k) for k, i in enumerate(image_index.tolist())])
                rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in image_index.tolist()])
                image_f, text_f = heads(x_image, xt[rows].float())
                loss = all_captions_loss(image_f, text_f, owner, scale)
            elif recipe.get("label_smoothing"):
                image_f, text_f = heads(x_image, x_text)
                logits, labels = scale * image_f @ text_f.T, torch.arange(len(image_f))
                loss = (F.cross_entropy(logits, labels, label_smoothing=recipe["label_smoothing"])
                        + F.cross_entropy(logits.T, labels, label_smoothing=recipe["label_smoothing"])) / 2
            else:
                image_f, text_f = heads(x_image, x_text)
                loss = clip_loss(image_f, text_f, scale)
            if recipe.get("hardneg"):
                loss = loss + recipe["hardneg"] * hardest_negative_loss(image_f, text_f)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            if ema is not None:  # an exponential moving average of the heads' weights
                with torch.no_grad():
                    for kept, p in zip(ema.parameters(), heads.parameters()):
                        kept.lerp_(p, 1 - recipe["ema"])
        if flips is not None and recipe.get("flip_tta"):  # test-time: the mean of both views' features
            vi = (feats["val"][0] + flips["val"]) / 2
        judged = heads if ema is None else ema
        score = evaluate(judged, vi, vt, vrec)["mean_recall"]
        if score > best:
            best, best_state, best_epoch = score, copy.deepcopy(judged.state_dict()), epoch + 1
    heads.load_state_dict(best_state)
    if flips is not None and recipe.get("flip_tta"):
        feats = {**feats, "test": ((feats["test"][0] + flips["test"]) / 2, *feats["test"][1:])}
    return {"epoch": best_epoch, "heads": heads, **test_metrics(heads, feats)}


@torch.no_grad()
def embed(heads, x_image, x_text):
    heads.eval()
    return heads(x_image.float(), x_text.float())


def evaluate(heads, x_image, x_text, records, bank=None) -> dict:
    image_f, text_f = embed(heads, x_image, x_text)
    return recall_with_bank(image_f, text_f, records, bank)


@torch.no_grad()
def bank_of(heads, feats, size: int = 10_000, seed: int = 0):
    xt = feats["train"][1]
    pick = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed))[:size]
    heads.eval()
    return F.normalize(heads.text(xt[pick].float()), dim=-1).half().float(), ALPHA, BETA


def test_metrics(heads, feats) -> dict:
    ti, tt, trec = feats["test"]
    return evaluate(heads, ti, tt, trec, bank_of(heads, feats))


def ensemble_metrics(members: list, feats) -> dict:
    """Several heads as one model: each one's normalised embeddings side by side (scaled so the
    cosine is the members' mean cosine); the querybank is built the same way."""
    ti, tt, trec = feats["test"]
    outs = [embed(h, ti, tt) for h in members]
    image_f = torch.cat([o[0] for o in outs], 1) / math.sqrt(len(outs))
    text_f = torch.cat([o[1] for o in outs], 1) / math.sqrt(len(outs))
    banks = [bank_of(h, feats)[0] for h in members]
    bank = (torch.cat(banks, 1) / math.sqrt(len(banks)), ALPHA, BETA)
    return recall_with_bank(image_f, text_f, trec, bank)


# ---------------------------------------------------------------- the table

RECIPES = {
    "base": {},
    "fusemix": {"fusemix": 1.0},
    "fusemix0.4": {"fusemix": 0.4},
    "hardneg": {"hardneg": 0.5},
    "hardneg0.2": {"hardneg": 0.2},
    "noise": {"feature_noise": 0.3},
    "flip_aug": {"flip_aug": True},
    "flip_tta": {"flip_tta": True},
    "flip_aug+tta": {"flip_aug": True, "flip_tta": True},
    "temp0.05": {"temperature": 0.05},
    "temp0.03": {"temperature": 0.03},
    "batch1024": {"batch": 1024},
    "epochs16": {"epochs": 16},
    "lr1e-3x16": {"lr": 1e-3, "epochs": 16},
    "dim1024": {"dim": 1024},
    "dim256": {"dim": 256},
    "init0.05": {"init_temperature": 0.05},
    "init0.04": {"init_temperature": 0.04},
    "dim256+temp0.05": {"dim": 256, "temperature": 0.05},
    "dropout0.5": {"dropout": 0.5},
    "allcaps": {"allcaps": True, "captions": 1, "epochs": 16},
    "allcaps5": {"allcaps": True, "captions": 5, "epochs": 8},
    "allcaps5+temp0.05": {"allcaps": True, "captions": 5, "temperature": 0.05},
    "dim1024+temp0.05": {"dim": 1024, "temperature": 0.05},
    "fdrop0.1": {"feature_dropout": 0.1},
    "fdrop0.2": {"feature_dropout": 0.2},
    "fdrop0.3": {"feature_dropout": 0.3},
    "fdrop0.2+tdrop0.1": {"feature_dropout": 0.2, "text_dropout": 0.1},
    "ls0.1": {"label_smoothing": 0.1},
    "ema0.9": {"ema": 0.9},
    "wd0.5": {"wd": 0.5},
    "init0.05+fdrop0.2": {"init_temperature": 0.05, "feature_dropout": 0.2},  # the preset's
    "init0.05+fdrop0.3": {"init_temperature": 0.05, "feature_dropout": 0.3},
    "init0.05+fdrop0.2+ls0.1": {"init_temperature": 0.05, "feature_dropout": 0.2, "label_smoothing": 0.1},
}


def mean_of(results: list) -> dict:
    """The seeds' mean of each figure `row` prints."""
    mean = {k: sum(r[k] for r in results) / len(results) for k in
            ("text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "image_to_text_R@1", "image_to_text_R@5")}
    return {**mean, "querybank": {"text_to_image_R@1": sum(r["querybank"]["text_to_image_R@1"] for r in results) / len(results)}}


def row(name: str, m: dict, seconds: float, epoch="") -> str:
    q = m.get("querybank", {})
    return (f"| {name} | {epoch} | {m['text_to_image_R@1']:.1f} | {m['text_to_image_R@5']:.1f} | "
            f"{m['text_to_image_R@10']:.1f} | {q.get('text_to_image_R@1', float('nan')):.1f} | "
            f"{m['image_to_text_R@1']:.1f} | {m['image_to_text_R@5']:.1f} | {seconds:.0f} s |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--towers", default="lite2", help="comma-separated: their features side by side (lite0, lite1, lite2), or preset: the preset's own tower")
    p.add_argument("--cache_dir", default="data/cache", help="the runs' cache folder (decoded images, features)")
    p.add_argument("--size", type=int, default=0, help="every tower's input side (0: each one's own)")
    p.add_argument("--flip", action="store_true", help="encode mirrored images too (flip_aug and test-time averaging)")
    p.add_argument("--recipes", default="base", help=f"comma-separated, of: {', '.join(RECIPES)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--ensemble", type=int, default=0, help="also: the first N seeds' heads as one model")
    args = p.parse_args(argv)
    towers = args.towers.split(",")
    parts = [preset_features(args.data, t, size=args.size, cache_dir=args.cache_dir) for t in towers]
    feats = {s: (torch.cat([f[s][0].float() for f in parts], 1), parts[0][s][1], parts[0][s][2]) for s in parts[0]}
    if args.flip:
        flipped = [preset_features(args.data, t, flip=True, size=args.size, cache_dir=args.cache_dir) for t in towers]
        feats["flip"] = {s: torch.cat([f[s][0].float() for f in flipped], 1) for s in flipped[0]}
    print(f"features: image {feats['train'][0].shape[1]}-d ({'+'.join(towers)}), text {feats['train'][1].shape[1]}-d; "
          f"{len(feats['train'][2])} train / {len(feats['val'][2])} val / {len(feats['test'][2])} test images")
    print("| recipe | epoch | t→i R@1 | R@5 | R@10 | + querybank R@1 | i→t R@1 | R@5 | time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.recipes.split(","):
        members, results = [], []
        for seed in [int(s) for s in args.seeds.split(",")]:
            start = time.perf_counter()
            result = fit(feats, RECIPES[name], seed)
            members.append(result.pop("heads"))
            results.append(result)
            print(row(f"{name} seed {seed}", result, time.perf_counter() - start, result["epoch"]), flush=True)
        if len(results) > 1:
            print(row(f"{name}: mean of {len(results)} seeds", mean_of(results), 0), flush=True)
        if args.ensemble:
            print(row(f"{name}: {args.ensemble} heads as one", ensemble_metrics(members[:args.ensemble], feats), 0),
                  flush=True)


if __name__ == "__main__":
    main()
