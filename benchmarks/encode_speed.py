"""Frozen-tower encoding speed: images/s and captions/s per execution path, on this machine.

    python benchmarks/encode_speed.py                       # Lite0 + MiniLM, CPU
    python benchmarks/encode_speed.py --image=tf_efficientnet_lite2 --batches=5
    python benchmarks/encode_speed.py --image=tf_efficientnet_lite2 --pool_blocks=2 --only_engines  # the preset's towers, per engine

Engines (`clip_foundation.engines.registry`: torch, ONNX Runtime, OpenVINO, each installed one): images/s of
decoded uint8 batches of `--small_batch` to normalised embeddings, with the minor page faults per
image, and captions/s of pre-tokenized length-sorted batches of `--engine_caption_batch`, each
through the Encoder every embedding path uses (graphs exported once into a temporary folder, and
checked against torch, before timing).

Image paths: eager fp32 (contiguous), fp32 channels-last at two batch sizes (with the minor page
faults per image: large batches allocate activations that glibc maps fresh from the kernel on
every layer, which shows up as system time), and bf16 autocast (marked emulated where the CPU
has no bf16 units). Caption paths: batches of captions of mixed lengths padded to the longest
(what a plain loop does), and the same captions in length-sorted batches (what
`clip_foundation.evaluate.metrics.length_order` gives every encoding path), with the token positions
computed per caption (padding included), which does not depend on the machine's load. Weights come from the pip
packages of requirements-pretrained.txt, so it runs offline. Prints one line per path.
"""
from __future__ import annotations

import argparse
import random
import resource
import time

import torch

from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig, to_model_input  # noqa: E402
from clip_foundation.common import cpu  # noqa: E402
from clip_foundation.pretrained import text_model_folder  # noqa: E402
from clip_foundation.evaluate.metrics import length_order  # noqa: E402


def rate(fn, items: int, batches: int) -> tuple[float, float]:
    """-> (items per second, minor page faults per item) over `batches` calls after a warm-up."""
    fn()  # warm-up: kernels chosen, memory allocated
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(batches):
        fn()
    seconds = time.perf_counter() - start
    return items * batches / seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (items * batches)


def mixed_captions(n: int, seed: int = 0) -> list[str]:
    """Captions of 4 to 30 words, like Flickr's (short ones common, long ones rare)."""
    words = "a dog man woman child runs jumps red blue on the in of with grass water street ball".split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(min(30, 4 + int(rng.expovariate(1 / 8)))))
            for _ in range(n)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image", default="tf_efficientnet_lite0", help="timm image tower")
    p.add_argument("--batch", type=int, default=128, help="images per batch (the large-batch rows)")
    p.add_argument("--small_batch", type=int, default=32, help="images per batch of the frozen-feature path")
    p.add_argument("--captions", type=int, default=1024, help="captions per timed pass")
    p.add_argument("--caption_batch", type=int, default=256, help="captions per batch")
    p.add_argument("--batches", type=int, default=2, help="timed batches (image rows) or passes (caption rows)")
    p.add_argument("--pool_blocks", type=int, default=0, help="the image tower's multi-scale blocks (the preset: 2)")
    p.add_argument("--engines", default="torch,onnxruntime,openvino", help="engines to time (those installed)")
    p.add_argument("--engine_caption_batch", type=int, default=64, help="captions per batch of the engine rows")
    p.add_argument("--only_engines", action="store_true", help="only the engine rows")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = CLIPConfig(image=ImageEncoderConfig(kind="timm", name=args.image, pool_blocks=args.pool_blocks),
                        text=TextEncoderConfig(kind="hf", name=text_model_folder(), pooling="mean"))
    model = CLIPModel(config).eval()
    S, cfg = model.config.image.image_size, model.config.image
    print(f"{torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.image} at {S} px")

    def images(n):
        return to_model_input(torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8), cfg.mean, cfg.std)

    def row(label, result):
        print(f"{label:40s}{result[0]:8.1f}/s {result[1]:8.0f} page faults per item")

    if not args.only_engines:
        torch_paths(args, model, images, row)
    engine_rows(args, model)


def torch_paths(args, model, images, row):
    """The torch execution paths: memory layouts, batch sizes, bf16, caption batching."""
    tower, text = model.image_encoder, model.text_encoder
    with torch.inference_mode():
        x = images(args.batch)
        fp32 = rate(lambda: tower(x), args.batch, args.batches)
        row(f"images   fp32 contiguous, batch {args.batch}", fp32)
        tower.to(memory_format=torch.channels_last)
        for n in (args.batch, args.small_batch):
            xc = images(n).contiguous(memory_format=torch.channels_last)
            row(f"images   fp32 channels-last, batch {n}", rate(lambda: tower(xc), n, max(1, args.batches * args.batch // n)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = rate(lambda: tower(xc), args.small_batch, 1)
        row(f"images   bf16 channels-last, batch {args.small_batch}"
            + (" (emulated)" if bf16[0] < fp32[0] / 10 else ""), bf16)
        tower.to(memory_format=torch.contiguous_format)
        captions = mixed_captions(args.captions)
        order = length_order(model, captions)

        B = args.caption_batch

        def encode(ordered):
            for s in range(0, len(ordered), B):
                text(**model.tokenize(ordered[s:s + B]))

        def padded(ordered):  # token positions computed per caption: load-independent
            return sum(model.tokenize(ordered[s:s + B])["input_ids"].numel()
                       for s in range(0, len(ordered), B)) / len(ordered)
        sorted_captions = [captions[i] for i in order]
        for label, ordered in (("mixed lengths", captions), ("length-sorted", sorted_captions)):
            speed = rate(lambda: encode(ordered), len(captions), args.batches)[0]
            print(f"{f'captions fp32, {label}, batch {B}':40s}{speed:8.1f}/s {padded(ordered):8.1f} tokens per caption")


def engine_rows(args, model):
    """images/s (with page faults per image) and captions/s per installed engine, same inputs; an
    engine that runs the image tower in int8 or bf16 here is timed in each lower precision too
    (CLIP_ENGINE_PRECISION); int8 is timed on the tower alone, calibrated on the random images it encodes."""
    import os
    import tempfile
    from clip_foundation.engines.registry import PRECISION_ENV, engine_class, installed, make_encoder
    S, n, B = model.config.image.image_size, args.small_batch, args.engine_caption_batch
    uint8 = torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8)
    captions = mixed_captions(args.captions)
    ordered = [captions[i] for i in length_order(model, captions)]
    batches = [model.tokenize(ordered[s:s + B]) for s in range(0, len(ordered), B)]
    print(f"CPU units: {cpu.units()}")
    print(f"{'engine':24s}{'images/s':>10s}{'faults/image':>14s}{'captions/s':>12s}  "
          f"(images: batch {n}; captions: sorted by length, batch {B})")
    with tempfile.TemporaryDirectory(prefix="encode-speed-") as folder:
        for name in args.engines.split(","):
            if not installed(name):
                print(f"{name:24s}  not installed")
                continue
            cls = engine_class(name)
            # what it picks here given images to calibrate on (int8) and without (bf16), then fp32 beside them
            for precision in dict.fromkeys([cls.precision("image", calibrated=True), cls.precision("image"), "fp32"]):
                os.environ[PRECISION_ENV] = "auto" if precision == "int8" else precision
                calibration = uint8 if precision == "int8" else None  # random pixels: for the speed only
                encoder = make_encoder(model, name, folder, part="features" if calibration is not None else "embed",
                                       calibration=calibration)
                image_speed, faults = rate(lambda: encoder.encode_images(uint8, n), n, args.batches)
                text_speed = rate(lambda: [encoder.encode_texts(**b) for b in batches], len(captions), args.batches)[0]
                print(f"{f'{encoder.name} (image {precision})':24s}{image_speed:10.1f}{faults:14.0f}{text_speed:12.1f}")
            os.environ.pop(PRECISION_ENV, None)


if __name__ == "__main__":
    main()
