"""Retrieval evaluation: embed images and captions, then recall@K both ways, every image
counted once with all its captions (CLIP_benchmark's protocol)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from clipModel import CLIPModel

from clip_foundation.data.splits import all_captions, decode_images, token_batch
from clip_foundation.engines.registry import encoder_of
from clip_foundation.common.modes import eval_mode, image_layout  # noqa: F401 - their home before modes.py; callers import them from here


RECALL_AT = (1, 5, 10)  # the field's recall@K, both ways; "mean_recall" is their mean
DIRECTIONS = {"text_to_image": "text -> image", "image_to_text": "image -> text"}  # the key's head -> words


@dataclass(frozen=True)
class RankMetric:
    """A figure computed from one direction's ranks (1-based, a tie counted against the query): it
    lands in metrics.json as `<direction>_<name>`, and in every table that reads the metrics."""
    name: str  # the key's tail, e.g. "median_rank" -> text_to_image_median_rank
    of_ranks: Callable[[torch.Tensor], float]  # (N,) long ranks -> the figure
    column: str  # its heading in format_metrics' table
    fmt: str = "8.1f"  # format_metrics' cell format (its width fits the heading)
    title: str = ""  # its heading in the model card; empty = the name in words


METRICS: dict[str, RankMetric] = {}  # the one table of rank metrics beside recall@K, in column order


def register_metric(metric: RankMetric) -> RankMetric:
    """Add a rank metric: every evaluation computes it and every writer (format_metrics, the model card)
    shows it. Recall@K is built in (RECALL_AT)."""
    METRICS[metric.name] = metric
    return metric


register_metric(RankMetric("mean_rank", lambda rank: rank.float().mean().item(), "mean r"))
register_metric(RankMetric("median_rank", lambda rank: rank.float().median().item(), "med r", "7.0f"))


def metric_keys(metrics: dict) -> list[tuple[str, str]]:
    """(key tail, heading) of every figure of a direction that `metrics` holds: recall@K, then each
    registered rank metric, in the table's column order."""
    keys = [(f"R@{k}", f"R@{k}") for k in RECALL_AT]
    keys += [(m.name, m.title or m.name.replace("_", " ")) for m in METRICS.values()
             if f"text_to_image_{m.name}" in metrics]
    return keys


class NonFiniteFeatures(ValueError):
    """Embeddings with NaN or inf: recall computed from them would be meaningless."""


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: torch.Tensor, ks=RECALL_AT, chunk: int = 1024) -> dict:
    """Recall@K (in %) and every registered rank metric (METRICS: mean/median rank), text->image
    and image->text.

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
        for metric in METRICS.values():
            metrics[f"{name}_{metric.name}"] = metric.of_ranks(rank)
    metrics["mean_recall"] = sum(metrics[f"{d}_R@{k}"] for d in DIRECTIONS for k in ks) / (2 * len(ks))
    return metrics


def length_order(model: CLIPModel, captions: list[str]) -> list[int]:
    """Caption indices sorted by token count: batches of similar lengths pad little (Flickr
    captions run from 8 to 40 tokens; a random batch pads all of them to the longest)."""
    if len(captions) < 2:  # a query: nothing to order
        return list(range(len(captions)))
    captions = list(captions)  # tokens each, truncated as encoded (model.tokenize: a lazily loaded model's too)
    lengths = [n for s in range(0, len(captions), 4096)
               for n in model.tokenize(captions[s:s + 4096])["attention_mask"].sum(1).tolist()]
    return sorted(range(len(captions)), key=lambda i: lengths[i])


@torch.no_grad()
def embed_images(model: CLIPModel, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Decoded uint8 images (N, 3, S, S) -> normalised features (N, D), by the model's engine
    (`engines.use_engine`; torch by default). On a CPU at most 32 are encoded at once: larger
    batches spend their time in page faults (benchmarks/encode_speed.py)."""
    return encoder_of(model).encode_images(images, batch_size)


def in_length_order(model: CLIPModel, captions: list[str], encode, width: int, batch_size: int,
                    desc: str | None = None) -> torch.Tensor:
    """encode(list of captions) -> (b, width) run on batches of similar-length captions; the
    rows (M, width) come back on the CPU in the captions' order. `desc`: a progress bar."""
    return _in_order(length_order(model, captions), lambda chunk: encode([captions[i] for i in chunk]), width,
                     batch_size, desc)


def _in_order(order, encode, width: int, batch_size: int, desc: str | None = None) -> torch.Tensor:
    # encode(row indices) -> (b, width) on consecutive batches of `order`; -> (M, width) on the CPU, by row
    from tqdm.auto import tqdm
    out = torch.empty(len(order), width)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
        chunk = order[s:s + batch_size]
        out[chunk] = encode(chunk).float().cpu()  # (b, width)
    return out


@torch.no_grad()
def embed_texts(model: CLIPModel, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """Captions -> normalised features (M, D), in the captions' order, by the model's engine."""
    encoder = encoder_of(model)
    return in_length_order(model, captions, lambda batch: encoder.encode_texts(**model.tokenize(batch)),
                           model.config.projection_dim, batch_size).to(model.device)


@torch.no_grad()
def embed_tokens(model: CLIPModel, tokens: dict[str, torch.Tensor], batch_size: int = 256) -> torch.Tensor:
    """Captions already tokenized (`model.tokenize`'s input_ids and attention_mask) -> normalised
    features (M, D) in their order: `embed_texts` without tokenizing again, in the same batches."""
    encoder = encoder_of(model)
    order = tokens["attention_mask"].sum(1).argsort(stable=True)  # length_order's, from the tokens at hand
    return _in_order(order, lambda chunk: encoder.encode_texts(*token_batch(tokens, chunk)),
                     model.config.projection_dim, batch_size).to(model.device)


def records_metrics(image_features: torch.Tensor, text_features: torch.Tensor, records) -> dict:
    """`retrieval_metrics` for embeddings of `records`' images and (flattened) captions."""
    text_to_image = torch.tensor([i for i, r in enumerate(records) for _ in r.captions])
    metrics = retrieval_metrics(image_features, text_features, text_to_image)
    return {**metrics, "images": len(image_features), "captions": len(text_features)}


def embed_records(model: CLIPModel, records, images: torch.Tensor | None = None, batch_size: int = 256,
                  skip_bad: bool = False) -> tuple[torch.Tensor, torch.Tensor, list]:
    """-> normalised (image embeddings (N, D), caption embeddings (M, D), the records kept) of
    `records` (decoded here unless `images` are given; with `skip_bad` undecodable images are
    left out instead of raising DataError)."""
    with eval_mode(model):
        if images is None:
            images, records = decode_images(records, model.config.image.image_size, skip_bad=skip_bad)
        return embed_images(model, images, batch_size), embed_texts(model, all_captions(records)), records


def evaluate_records(model: CLIPModel, records, images: torch.Tensor | None = None,
                     batch_size: int = 256, skip_bad: bool = False) -> dict:
    """Recall metrics of `model` on `records` (see `embed_records`)."""
    return records_metrics(*embed_records(model, records, images, batch_size, skip_bad))


def format_metrics(m: dict) -> str:
    """The metrics as a table people read: a row per direction (and the querybank's text -> image),
    recall@K then each registered rank metric the metrics hold."""
    extra = [metric for metric in METRICS.values() if f"text_to_image_{metric.name}" in m]
    rows = [f"{'':17}" + "".join(f"{f'R@{k}':>7}" for k in RECALL_AT)
            + "".join(f"{metric.column:>{metric.fmt.split('.')[0]}}" for metric in extra)]
    for d, label, source in (("text_to_image", DIRECTIONS["text_to_image"], m),
                             ("text_to_image", " + querybank", m.get("querybank")),
                             ("image_to_text", DIRECTIONS["image_to_text"], m)):
        if source is not None:  # querybank normalisation changes text -> image only
            rows.append(f"{label:17}" + "".join(f"{source[f'{d}_R@{k}']:7.1f}" for k in RECALL_AT)
                        + "".join(f"{source[f'{d}_{metric.name}']:{metric.fmt}}" for metric in extra))
    return "\n".join(rows) + f"\n({m['images']} images, {m['captions']} captions)"


