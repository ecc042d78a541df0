"""Retrieval evaluation: recall@K both ways, every image counted once with all its captions.

    python evaluate.py --checkpoint runs/NAME --data DIR --split test
    python evaluate.py --checkpoint runs/NAME --zeroshot DIR|cifar10:ROOT   # see zeroshot.py
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import cli
from clipModel import CLIPModel, default_device
from data import all_captions, decode_images, load_splits, run_data_config, to_model_input
from readers import DataError, DataWarning


class NonFiniteFeatures(ValueError):
    """Embeddings with NaN or inf: recall computed from them would be meaningless."""


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: torch.Tensor, ks=(1, 5, 10), chunk: int = 1024) -> dict:
    """Recall@K (in %) and mean/median rank, text->image and image->text.

    `image_features` (N_img, D) and `text_features` (N_txt, D) are L2-normalised;
    `text_to_image[t]` is the image index of caption t. A text query hits at k if its image
    ranks in the top k; an image query hits if any of its captions does (CLIP_benchmark's
    definition). Ranks are 1-based and a tie counts against the query: an item scoring
    exactly as high as the true one ranks above it, so a collapsed model (all embeddings
    equal) scores like chance's worst case, never 100%. Non-finite features raise ValueError.
    Works in chunks so large galleries fit in memory.
    """
    for which, features in (("image", image_features), ("text", text_features)):
        if not torch.isfinite(features).all():
            raise NonFiniteFeatures(f"non-finite {which} features (NaN or inf): the model's weights are "
                             "corrupt or training diverged; recall would be meaningless")
    n_img = len(image_features)
    text_to_image = text_to_image.to(image_features.device)
    t2i_rank = torch.empty(len(text_features), dtype=torch.long)
    for s in range(0, len(text_features), chunk):
        sims = text_features[s:s + chunk] @ image_features.T  # (c, N_img)
        true = sims.gather(1, text_to_image[s:s + chunk, None])  # (c, 1)
        t2i_rank[s:s + chunk] = (sims >= true).sum(1).cpu()  # the true image itself counts once
    i2t_rank = torch.empty(n_img, dtype=torch.long)
    for s in range(0, n_img, chunk):
        sims = image_features[s:s + chunk] @ text_features.T  # (c, N_txt)
        own = text_to_image[None, :] == torch.arange(s, s + len(sims), device=sims.device)[:, None]
        best_own = sims.masked_fill(~own, float("-inf")).max(1, keepdim=True).values  # (c, 1)
        i2t_rank[s:s + chunk] = ((sims >= best_own) & ~own).sum(1).cpu() + 1  # others tying count
    metrics = {}
    for name, rank in (("text_to_image", t2i_rank), ("image_to_text", i2t_rank)):
        for k in ks:
            metrics[f"{name}_R@{k}"] = 100.0 * (rank <= k).float().mean().item()
        metrics[f"{name}_mean_rank"] = rank.float().mean().item()
        metrics[f"{name}_median_rank"] = rank.float().median().item()
    metrics["mean_recall"] = sum(metrics[f"{d}_R@{k}"] for d in ("text_to_image", "image_to_text")
                                 for k in ks) / (2 * len(ks))
    return metrics


@torch.no_grad()
def embed_images(model: CLIPModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Decoded uint8 images (N, 3, S, S) -> normalised features (N, D)."""
    cfg, out = model.config.image, []
    for s in range(0, len(images), batch_size):
        batch = to_model_input(images[s:s + batch_size].to(model.device), cfg.mean, cfg.std)
        out.append(model.encode_image(batch).float())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model: CLIPModel, captions: list[str], batch_size: int = 1024) -> torch.Tensor:
    return torch.cat([model.encode_text(captions[s:s + batch_size]).float()
                      for s in range(0, len(captions), batch_size)])


def records_metrics(image_features: torch.Tensor, text_features: torch.Tensor, records) -> dict:
    """`retrieval_metrics` for embeddings of `records`' images and (flattened) captions."""
    text_to_image = torch.tensor([i for i, r in enumerate(records) for _ in r.captions])
    metrics = retrieval_metrics(image_features, text_features, text_to_image)
    return {**metrics, "images": len(image_features), "captions": len(text_features)}


def evaluate_records(model: CLIPModel, records, images: torch.Tensor | None = None,
                     batch_size: int = 256, skip_bad: bool = False) -> dict:
    """Recall metrics of `model` on `records` (decoded here unless `images` are given; with
    `skip_bad` undecodable images are left out and reported instead of raising DataError)."""
    was_training = model.training
    model.eval()
    if images is None:
        images, records = decode_images(records, model.config.image.image_size, skip_bad=skip_bad)
    metrics = records_metrics(embed_images(model, images, batch_size),
                              embed_texts(model, all_captions(records)), records)
    model.train(was_training)
    return metrics


def format_metrics(m: dict) -> str:
    rows = [f"{'':15}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'mean r':>8}{'med r':>7}"]
    for d, label in (("text_to_image", "text -> image"), ("image_to_text", "image -> text")):
        rows.append(f"{label:15}" + "".join(f"{m[f'{d}_R@{k}']:7.1f}" for k in (1, 5, 10))
                    + f"{m[f'{d}_mean_rank']:8.1f}{m[f'{d}_median_rank']:7.0f}")
    return "\n".join(rows) + f"\n({m['images']} images, {m['captions']} captions)"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Recall@K of a saved CLIP model on a dataset split, "
                                "or its zero-shot classification accuracy (--zeroshot).")
    p.add_argument("--checkpoint", required=True, help="folder written by train.py / save_pretrained")
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--data", help="dataset folder (retrieval recall@K)")
    task.add_argument("--zeroshot", metavar="DATA", help="zero-shot classification on class "
                      "folders DATA/<class>/*.jpg (test/ split if any) or cifar10:ROOT")
    p.add_argument("--templates", default=None, help="--zeroshot: file of prompt templates, one "
                   "per line with {} for the class name (default: zeroshot.TEMPLATES)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--layout", default="auto", help="dataset layout (default: detect)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--skip-bad", action="store_true", help="leave out images that cannot be decoded")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    p.add_argument("--out", default=None, help="JSON path (default: CHECKPOINT/eval_SPLIT.json, "
                   "or CHECKPOINT/zeroshot_NAME.json with a confusion-matrix PNG beside it)")
    args = p.parse_args(argv)
    try:
        device = default_device() if args.device == "auto" else torch.device(args.device)
        model = CLIPModel.from_pretrained(args.checkpoint, device=device)
        if args.zeroshot:
            return _zeroshot_main(model, args)
        records = load_splits(run_data_config(args.checkpoint, args.data, args.layout))[args.split]
        if not records:
            raise DataError(f"the {args.split} split of {args.data} is empty")
        metrics = evaluate_records(model, records, batch_size=args.batch_size, skip_bad=args.skip_bad)
    except NonFiniteFeatures as e:
        sys.exit(f"error: {args.checkpoint}: {e}")
    except DataError as e:
        sys.exit(f"error: {e}" + ("" if args.skip_bad else " (--skip-bad leaves such images out)"))
    except (FileNotFoundError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    metrics.update(checkpoint=str(args.checkpoint), data=str(args.data), split=args.split)
    print(format_metrics(metrics))  # first: a folder we cannot write to must not cost the result
    save_json(metrics, Path(args.out or Path(args.checkpoint) / f"eval_{args.split}.json"))
    return metrics


def save_json(obj: dict, out: Path, also: str = "") -> bool:
    """Write `obj` to `out` and say so; on failure (read-only folder, disk full) say why and go on."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(obj, indent=2))
    except OSError as e:
        print(f"warning: could not write {out} ({e.strerror or e}); pass --out PATH to save it elsewhere",
              file=sys.stderr)
        return False
    print(f"wrote {out}{also}")
    return True


def _zeroshot_main(model: CLIPModel, args) -> dict:
    import plots
    import zeroshot  # it imports evaluate: imported here, not at the top, to avoid a cycle
    templates = zeroshot.read_templates(args.templates) if args.templates else zeroshot.TEMPLATES
    data = zeroshot.load_labelled(args.zeroshot, model.config.image.image_size)
    metrics = zeroshot.zeroshot_evaluate(model, data, templates, args.batch_size)
    metrics.update(checkpoint=str(args.checkpoint), data=str(args.zeroshot))
    print(zeroshot.format_zeroshot(metrics))
    out = Path(args.out or Path(args.checkpoint) / f"zeroshot_{data.name}.json")
    if save_json(metrics, out, also=f" and {out.with_suffix('.png')}"):
        plots.confusion_matrix(metrics["confusion"], data.class_names, path=out.with_suffix(".png"),
                               title=f"zero-shot {data.name}: top-1 {metrics['top1']:.1f}%")
    return metrics


if __name__ == "__main__":
    with cli.reported_warnings(DataWarning):  # one plain line per data issue
        main()
