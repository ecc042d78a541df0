"""Frozen-tower encoding speed: images/s and captions/s per execution path, on this machine.

    python benchmarks/encode_speed.py                       # Lite0 + MiniLM, batch 64, CPU
    python benchmarks/encode_speed.py --image=tf_efficientnet_lite2 --batches=5

Paths: eager fp32 (contiguous), fp32 with channels-last tensors, and bf16 autocast (shown only
where it runs faster than a tenth of fp32: CPUs without bf16 units emulate it). Weights come
from the pip packages of requirements-pretrained.txt, so it runs offline. Prints one line per
path; nothing is written.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig, to_model_input  # noqa: E402
from clip_foundation.pretrained import text_model_folder  # noqa: E402


def rate(fn, items: int, batches: int) -> float:
    fn()  # warm-up: kernels chosen, memory allocated
    start = time.perf_counter()
    for _ in range(batches):
        fn()
    return items * batches / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image", default="tf_efficientnet_lite0", help="timm image tower")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=3, help="timed batches per path")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = CLIPConfig(image=ImageEncoderConfig(kind="timm", name=args.image),
                        text=TextEncoderConfig(kind="hf", name=text_model_folder(), pooling="mean"))
    model = CLIPModel(config).eval()
    S, cfg = model.config.image.image_size, model.config.image
    images = torch.randint(0, 256, (args.batch, 3, S, S), dtype=torch.uint8)
    tokens = model.tokenize(["a little girl in a pink dress is climbing the stairs of a wooden house"] * args.batch)
    tower, text = model.image_encoder, model.text_encoder
    print(f"{torch.__version__}, {torch.get_num_threads()} threads, {args.image} at {S} px, batch {args.batch}")
    with torch.inference_mode():
        x = to_model_input(images, cfg.mean, cfg.std)
        fp32 = rate(lambda: tower(x), args.batch, args.batches)
        print(f"images   fp32 contiguous      {fp32:8.1f}/s")
        tower.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        print(f"images   fp32 channels-last   {rate(lambda: tower(xc), args.batch, args.batches):8.1f}/s")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = rate(lambda: tower(xc), args.batch, 1)
        print(f"images   bf16 channels-last   {bf16:8.1f}/s" + ("  (emulated: no bf16 units)" if bf16 < fp32 / 10 else ""))
        tower.to(memory_format=torch.contiguous_format)
        print(f"captions fp32                 {rate(lambda: text(**tokens), args.batch, args.batches):8.1f}/s")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            print(f"captions bf16                 {rate(lambda: text(**tokens), args.batch, 1):8.1f}/s")


if __name__ == "__main__":
    main()
