"""Beyond frozen heads on a CPU: train the image tower's last layers on cached activations, or the
heads on several augmented views per image, and print recall on the held-out split per epoch.

    python benchmarks/beyond_heads.py --data=data/flickr8k                    # heads only (the preset)
    python benchmarks/beyond_heads.py --data=data/flickr8k --level=head       # + conv_head and its BN
    python benchmarks/beyond_heads.py --data=data/flickr8k --level=block      # + the last stage too
    python benchmarks/beyond_heads.py --data=data/flickr8k --views=2          # 3 views, one drawn per epoch
    python benchmarks/beyond_heads.py --data=data/flickr8k --text_layers=2    # LiT: MiniLM's last 2 layers train

The data, text tower and split are the flickr8k-pretrained preset's (with EfficientNet-Lite0 alone + MiniLM,
trained on train minus 500 images, the epoch picked on those 500, reported on the dataset's
val split, which for Flickr8k is the official dev split). The frozen part of the image tower
runs once per view: its activations at the input of the last stage (192x7x7 for Lite0 at
224 px) are cached in CACHE_DIR/features, so each step runs only what trains; with
`--text_layers=N` the text tower's hidden states at the input of its last N layers are kept in
memory the same way (locked-image tuning, LiT: the image side frozen). A research
script: it prints figures and saves nothing else; the results are in docs/results.md.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch

from clip_foundation import training as train  # noqa: E402
from clip_foundation.data.splits import all_captions, decode_images  # noqa: E402
from clip_foundation.training.features import text_tower_features  # noqa: E402
from clip_foundation.evaluate.metrics import records_metrics  # noqa: E402
from clipModel import clip_loss, to_model_input  # noqa: E402


def stem(m, x):
    """timm EfficientNet up to the input of its last stage."""
    x = m.bn1(m.conv_stem(x))
    for stage in m.blocks[:-1]:
        x = stage(x)
    return x


@torch.no_grad()
def stage_inputs(model, images, view: int, path: Path, batch_size: int = 32) -> torch.Tensor:
    """(N, C, h, w) fp16 activations at the last stage's input of view `view` (0: the plain
    center crop; 1, 2, ...: seeded random resized crops), cached at `path`."""
    from safetensors.torch import load_file, save_file
    if path.is_file():
        return load_file(path)["x"]
    torch.manual_seed(view)
    cfg, m, out = model.config.image, model.image_encoder.model.eval(), []
    m.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    for s in range(0, len(images), batch_size):
        x = to_model_input(images[s:s + batch_size], cfg.mean, cfg.std, augment=view > 0)
        out.append(stem(m, x.contiguous(memory_format=torch.channels_last)).half())
    print(f"view {view}: {len(images)} images at {len(images) / (time.perf_counter() - start):.1f}/s", flush=True)
    x = torch.cat(out).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": x}, str(path))
    return x


@torch.no_grad()
def text_states(model, captions: list[str], layers: int, batch_size: int = 256):
    """-> (states (M, T, C) fp16 at the input of the text tower's last `layers` layers, padded
    to the longest caption, and the attention mask (M, T)), computed in length-sorted batches."""
    from clip_foundation.evaluate.metrics import length_order
    bert = model.text_encoder.model.eval()
    tokens = model.tokenize(captions)  # (M, T) padded to the longest caption
    order = length_order(model, captions)
    states = torch.zeros(*tokens["input_ids"].shape, bert.config.hidden_size, dtype=torch.float16)
    for s in range(0, len(captions), batch_size):
        chunk = torch.tensor(order[s:s + batch_size])
        mask = tokens["attention_mask"][chunk]
        t = int(mask.sum(1).max())
        out = bert(input_ids=tokens["input_ids"][chunk, :t], attention_mask=mask[:, :t], output_hidden_states=True)
        states[chunk, :t] = out.hidden_states[-layers - 1].half()  # the input of the last `layers` layers
    return states, tokens["attention_mask"]


def text_top(model, states, mask, layers: int) -> torch.Tensor:
    """The text tower's last `layers` layers + mean pooling on cached states (B, T, C) -> (B, C)."""
    bert = model.text_encoder.model
    t = int(mask.sum(1).max())
    h, mask = states[:, :t].float(), mask[:, :t]
    extended = bert._create_attention_masks(attention_mask=mask, encoder_attention_mask=None, embedding_output=h,
                                            encoder_hidden_states=None, cache=None)[0]
    for layer in bert.encoder.layer[len(bert.encoder.layer) - layers:]:
        h = layer(h, attention_mask=extended)
        h = h[0] if isinstance(h, tuple) else h
    weights = mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
    return (h * weights).sum(1) / weights.sum(1).clamp(min=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--cache_dir", default="cache")
    p.add_argument("--level", default="none", choices=["none", "head", "block"],
                   help="none: heads only; head: + conv_head/bn2; block: + the last stage")
    p.add_argument("--views", type=int, default=0, help="augmented views of each training image besides the center crop")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=3e-3, help="heads and temperature")
    p.add_argument("--tower_lr", type=float, default=1e-4, help="the trained image layers")
    p.add_argument("--text_layers", type=int, default=0, help="MiniLM's last N layers train on cached states (LiT)")
    p.add_argument("--text_lr", type=float, default=2e-5, help="the trained text layers")
    p.add_argument("--captions_per_epoch", type=int, default=5)
    p.add_argument("--weight_decay", type=float, default=0.1)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    random.seed(0)
    cfg = train.resolve_config(["--preset=flickr8k-pretrained", f"--data={args.data}", f"--cache_dir={args.cache_dir}",
                                "--image.name=tf_efficientnet_lite0"])  # one network: its last stage trains
    splits = train.prepare_data(cfg)
    model, _ = train.build_model(cfg, splits, torch.device("cpu"), None)
    m = model.image_encoder.model
    size = model.config.image.image_size
    folder = Path(args.cache_dir) / "features"
    acts, text, train_views = {}, {}, []
    for split in ("train", "val", "test"):
        images, splits[split] = decode_images(splits[split], size, args.cache_dir)
        tag = f"{Path(args.data).name}-{split}-{len(images)}-{size}"
        acts[split] = stage_inputs(model, images, 0, folder / f"stage-input-{tag}-v0.safetensors")
        if split == "train":
            train_views = [acts[split]] + [stage_inputs(model, images, v, folder / f"stage-input-{tag}-v{v}.safetensors")
                                           for v in range(1, args.views + 1)]
        if args.text_layers:
            text[split] = text_states(model, all_captions(splits[split]), args.text_layers)
        else:
            text[split] = text_tower_features(model, all_captions(splits[split]), args.cache_dir)

    trained = {"none": [], "head": [m.conv_head, m.bn2], "block": [m.blocks[-1], m.conv_head, m.bn2]}[args.level]
    m.requires_grad_(False)
    for module in trained:
        module.requires_grad_(True)

    @torch.no_grad()
    def frozen_part(x):  # runs once per view: what does not train
        out = []
        for s in range(0, len(x), 256):
            h = x[s:s + 256].float().contiguous(memory_format=torch.channels_last)
            h = m.blocks[-1](h) if args.level != "block" else h
            out.append((m.forward_head(m.bn2(m.conv_head(h))) if args.level == "none" else h).half())
        return torch.cat(out)

    def trained_part(x):  # runs every step, with gradients
        x = x.float()
        if args.level == "none":
            return x
        x = x.contiguous(memory_format=torch.channels_last)
        x = m.blocks[-1](x) if args.level == "block" else x
        return m.forward_head(m.bn2(m.conv_head(x)))  # (B, 1280)

    acts = {s: frozen_part(x) for s, x in acts.items()}
    train_views = torch.stack([frozen_part(x) for x in train_views])  # (V, N, ...)
    bert = model.text_encoder.model
    bert.requires_grad_(False)
    text_params = []
    for layer in bert.encoder.layer[len(bert.encoder.layer) - args.text_layers:] if args.text_layers else []:
        layer.requires_grad_(True)
        text_params += list(layer.parameters())

    def text_features(split, index):  # (B, d_text): cached features, or the trained layers on cached states
        if not args.text_layers:
            return text[split][index]
        states, mask = text[split]
        return text_top(model, states[index], mask[index], args.text_layers)
    tower_params = [q for module in trained for q in module.parameters()]
    head_params = [*model.image_projection.parameters(), *model.text_projection.parameters(), model.logit_scale]
    trains = ((head_params, args.lr), (tower_params, args.tower_lr), (text_params, args.text_lr))
    groups = [{"params": [q for q in ps if q.ndim >= 2], "lr": lr, "weight_decay": args.weight_decay} for ps, lr in
              trains] + \
             [{"params": [q for q in ps if q.ndim < 2], "lr": lr, "weight_decay": 0.0} for ps, lr in trains]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]])
    peak = [g["lr"] for g in optimizer.param_groups]
    n = len(splits["train"])
    caption_ranges, first = [], 0
    for r in splits["train"]:
        caption_ranges.append(range(first, first + len(r.captions)))
        first += len(r.captions)
    steps_per_epoch = args.captions_per_epoch * (n // args.batch_size)
    total, step = args.epochs * steps_per_epoch, 0

    @torch.no_grad()
    def recall(split):
        model.eval()
        image_f = torch.cat([trained_part(acts[split][s:s + 256]) for s in range(0, len(acts[split]), 256)])
        m_text = len(text[split][1]) if args.text_layers else len(text[split])
        text_f = torch.cat([text_features(split, torch.arange(s, min(s + 512, m_text))) for s in range(0, m_text, 512)])
        return records_metrics(model.project_image(image_f).float(), model.project_text(text_f).float(), splits[split])

    print(f"level={args.level} views={args.views + 1} text_layers={args.text_layers} batch={args.batch_size} lr={args.lr} tower_lr={args.tower_lr}: "
          f"{sum(q.numel() for q in tower_params) / 1e6:.2f}M image and {sum(q.numel() for q in text_params) / 1e6:.2f}M "
          f"text tower parameters trained")
    start = time.perf_counter()
    for epoch in range(args.epochs):
        pick = torch.randint(0, len(train_views), (n,))  # a view drawn per image per epoch
        source = train_views[pick, torch.arange(n)]
        model.train()
        m.eval()  # frozen BatchNorm statistics, as in the cached features
        bert.eval()  # no dropout in the text layers: their inputs were cached without it
        for _ in range(args.captions_per_epoch):
            order = torch.randperm(n)
            for b in range(n // args.batch_size):
                index = order[b * args.batch_size:(b + 1) * args.batch_size]
                captions = torch.tensor([random.choice(caption_ranges[i]) for i in index.tolist()])
                scale = min(1.0, (step + 1) / 5) * 0.5 * (1 + math.cos(math.pi * step / total))  # warmup, cosine
                for group, lr in zip(optimizer.param_groups, peak):
                    group["lr"] = lr * scale
                loss = clip_loss(model.project_image(trained_part(source[index])),
                                 model.project_text(text_features("train", captions)), model.scale())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
        val, test = recall("val"), recall("test")
        print(f"epoch {epoch + 1} ({time.perf_counter() - start:.0f} s): loss {loss.item():.3f}, val t->i R@1 "
              f"{val['text_to_image_R@1']:.1f}; held-out t->i R@1/5/10 {test['text_to_image_R@1']:.1f} "
              f"{test['text_to_image_R@5']:.1f} {test['text_to_image_R@10']:.1f}, i->t R@1/5/10 "
              f"{test['image_to_text_R@1']:.1f} {test['image_to_text_R@5']:.1f} {test['image_to_text_R@10']:.1f}",
              flush=True)


if __name__ == "__main__":
    main()
