"""Training throughput of the seed CLIP (HF ViT-B/16 + DistilBERT, 224 px, 64 tokens, projection
256) vs open_clip ViT-B-16, and of the data path feeding it: pairs/s, FLOPs, MFU, peak memory.

    python -m benchmarks.train_throughput                        # every variant, one GPU
    python -m benchmarks.train_throughput --variants seed_bf16_sdpa,open_clip_bf16 --steps 20
    python -m benchmarks.train_throughput --device cpu --batch_sizes 8 --steps 3 --warmup 1 --images 32
    python -m benchmarks.train_throughput --tiny                 # tiny towers: a CPU smoke run

Models are built from configs with random weights; nothing is downloaded. A step is forward
both towers under autocast, loss.clip_loss, backward, grad-norm clip at 1, AdamW, zero_grad,
on synthetic tensors already on the device ("model step alone"). FLOPs: one step counted
with torch.utils.flop_counter.FlopCounterMode (forward + backward). MFU = counted FLOPs x
steps/s / a peak measured here: bf16 8192^2 matmuls on CUDA, fp32 matmuls on a CPU.
The data section decodes real JPEG files (--jpeg_dir, or generated 500x375 ~80 KB photo-like
JPEGs) through each data path, alone (images/s) and feeding the fastest seed variant (pairs/s,
vs the step alone timed just before), each over one full pass of --images after a warm-up.
Prints tables and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
from benchmarks.data_path import DirectImages, make_jpegs  # noqa: E402
from clip_foundation.data.cache import load_images  # noqa: E402
from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig, train_tokenizer  # noqa: E402
from clip_foundation.data.splits import UniqueImageBatchSampler, token_batch
from clipModel import to_model_input  # noqa: E402
from clipModel import clip_loss  # noqa: E402
from clip_foundation.data.records import Record  # noqa: E402


def variant(model, bf16=True, attn="sdpa", fused=False, compile=False, batch=256, engine=False):
    return dict(model=model, bf16=bf16, attn=attn, fused=fused, compile=compile, batch=batch, engine=engine)


VARIANTS = {  # in order of optimisation; open_clip gets the same step, loss, optimizer and autocast
    "seed_fp32_eager": variant("seed", bf16=False, attn="eager", batch=32),  # the seed as written
    "seed_fp32_sdpa": variant("seed", bf16=False, batch=32),  # isolates the attention kernel
    "seed_bf16_sdpa": variant("seed"),
    "seed_bf16_sdpa_fused": variant("seed", fused=True),
    # stepped by the project's own engine.contrastive_backward + engine.optimizer_step
    "seed_bf16_sdpa_fused_engine": variant("seed", fused=True, engine=True),
    "seed_bf16_sdpa_fused_compile": variant("seed", fused=True, compile=True),
    "open_clip_fp32": variant("open_clip", bf16=False, batch=32),
    "open_clip_bf16": variant("open_clip"),
    "open_clip_bf16_fused_compile": variant("open_clip", fused=True, compile=True),
}
GiB = 2**30
# PyTorch has FLOP formulas for the CUDA attention kernels only: without these two the CPU
# flash kernel counts as 0 FLOPs and SDPA rows would show ~4% less than eager ones.
CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def hardware(device) -> dict:
    import transformers
    info = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else cpu_name(), "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # a shared machine?
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}  # fp32 rows use TF32 tensor cores if True
    if importlib.util.find_spec("open_clip"):
        import open_clip
        info["open_clip"] = open_clip.__version__
    return info


def matmul_peak(device, tiny: bool) -> dict:
    """Best FLOP/s of square matmuls: bf16 on CUDA (the tensor-core peak MFU is quoted against),
    fp32 on a CPU (where autocast bf16 is rarely faster)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512 if tiny else 2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    reps, best = (10 if device.type == "cuda" else 3), 0.0
    for trial in range(6):
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        if trial:  # the first is warm-up
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return {"tflops": best / 1e12, "kind": f"{str(dtype).split('.')[1]} matmul {n}x{n}, best of 5"}


# ---------------------------------------------------------------- models and the step

def seed_model(folder: Path, tiny: bool) -> CLIPModel:
    """The seed architecture with random weights, built from configs saved to a local folder."""
    from transformers import DistilBertConfig, ViTConfig
    vit, bert = ViTConfig(), DistilBertConfig()  # defaults: ViT-B/16 at 224 px, distilbert-base
    if tiny:
        vit = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        image_size=32, patch_size=8)
        bert = DistilBertConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=2, hidden_dim=128)
    vit.save_pretrained(folder / "vit")
    bert.save_pretrained(folder / "distilbert")
    cfg = CLIPConfig(image=ImageEncoderConfig(kind="hf", name=str(folder / "vit"), pretrained=False,
                                              mean=(0.5,) * 3, std=(0.5,) * 3),  # ViTImageProcessor's
                     text=TextEncoderConfig(kind="hf", name=str(folder / "distilbert"), pretrained=False,
                                            max_length=16 if tiny else 64), projection_dim=256)
    # Token ids are random, so any tokenizer will do; this one is built offline in milliseconds.
    return CLIPModel(cfg, tokenizer=train_tokenizer(["a photo of a dog"], 100))


def build(spec: dict, folder: Path, tiny: bool, device):
    """-> (model, forward(images, ids, mask) -> loss, image side, text length, vocab size)."""
    if spec["model"] == "seed":
        model = seed_model(folder, tiny)
        for tower in (model.image_encoder.model, model.text_encoder.model):  # read at every forward
            if hasattr(tower, "set_attn_implementation"):
                tower.set_attn_implementation(spec["attn"])
            else:
                tower.config._attn_implementation = spec["attn"]
        model = model.to(device).train()

        def forward(images, ids, mask):
            return clip_loss(model.encode_image(images), model.encode_text(ids, mask), model.scale())
        text = model.text_encoder.model.config
        return model, forward, model.config.image.image_size, model.config.text.max_length, text.vocab_size
    import open_clip
    model = open_clip.create_model("ViT-B-16", pretrained=None) if not tiny else open_clip.model.CLIP(
        64, dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
        dict(context_length=16, vocab_size=1000, width=64, heads=2, layers=2))
    model = model.to(device).train()

    def forward(images, ids, mask):  # its text tower is causal, no padding mask; 77 tokens
        return clip_loss(*model(images, ids)[:3])
    return model, forward, model.visual.image_size[0], model.context_length, model.vocab_size


def make_step(model, forward, spec: dict, device):
    """One training step: autocast forward + loss, backward, clip at 1, AdamW step, zero_grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},  # decay matrices only
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=spec["fused"] or None)
    if spec["engine"]:
        return engine_step(model, optimizer, spec, device)
    compiled = torch.compile(forward) if spec["compile"] else forward  # forward + loss; backward via AOT

    def step(images, ids, mask):
        with torch.autocast(device.type, torch.bfloat16, enabled=spec["bf16"]):
            loss = compiled(images, ids, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def engine_step(model, optimizer, spec: dict, device):
    """The seed model stepped by the project's training engine, as train.py steps it."""
    from clip_foundation.training import step as engine
    precision = "bf16" if spec["bf16"] else "fp32"
    scaler = engine.grad_scaler(precision, device)

    def embed(images, ids, mask):
        return model.encode_image(images), model.encode_text(ids, mask)

    def step(images, ids, mask):
        loss = engine.contrastive_backward(embed, [(images, ids, mask)], model.scale, clip_loss, precision, device)
        engine.optimizer_step(model, optimizer, scaler, 1.0)
        return loss
    return step


def count_flops(model, forward, spec: dict, inputs, device) -> int:
    """FLOPs of one forward + backward, counted eagerly (a compiled graph does the same math)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        with torch.autocast(device.type, torch.bfloat16, enabled=spec["bf16"]):
            loss = forward(*inputs)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(name, spec, batch, args, device, peak, folder, data=None) -> tuple[dict, list[dict]]:
    """One row of the model table (+ the end-to-end rows when `data` is given)."""
    model, forward, side, length, vocab = build(spec, folder, args.tiny, device)
    images = torch.randn(batch, 3, side, side, device=device)
    ids = torch.randint(1, vocab, (batch, length), device=device)
    mask = torch.ones_like(ids)
    flops = count_flops(model, forward, spec, (images, ids, mask), device)
    step = make_step(model, forward, spec, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):  # includes compilation for the compile variants
        step(images, ids, mask)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step(images, ids, mask)
    sync(device)
    seconds = time.perf_counter() - start
    rate = batch * args.steps / seconds
    row = {"variant": name, **spec, "batch": batch, "precision": "bf16 autocast" if spec["bf16"] else "fp32",
           "image_size": side, "text_tokens": length, "pairs_per_s": rate, "step_ms": 1e3 * seconds / args.steps,
           "flops_per_step": flops, "gflop_per_pair": flops / batch / 1e9, "tflops": flops * rate / batch / 1e12,
           "mfu": flops * rate / batch / 1e12 / peak["tflops"], "loss": float(loss),
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None,
           "rss_high_water_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB}
    return row, (end_to_end(step, data, batch, side, ids, device) if data else [])


# ---------------------------------------------------------------- data path

class TorchvisionJpegs(Dataset):
    """torchvision.io.decode_jpeg (libjpeg-turbo) + resize + center crop, per item on the CPU."""

    def __init__(self, paths, side):
        from torchvision.transforms import v2
        self.paths, self.prepare = paths, v2.Compose([v2.Resize(side, antialias=True), v2.CenterCrop(side)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from torchvision.io import ImageReadMode, decode_jpeg, read_file
        return self.prepare(decode_jpeg(read_file(str(self.paths[i])), mode=ImageReadMode.RGB))


class JpegBytes(TorchvisionJpegs):
    """Only the file bytes: decoding happens on the GPU (nvjpeg), a whole batch at once."""

    def __getitem__(self, i):
        from torchvision.io import read_file
        return read_file(str(self.paths[i]))


def feeds(data, batch, side, device) -> dict:
    """Name -> factory of an `epoch()` function returning an iterator over one pass of uint8
    (B, 3, S, S) image batches on `device`. Factories, so one path's workers run at a time."""
    paths, cache, n, cuda = data["paths"], data["cache"], len(data["paths"]), device.type == "cuda"

    def to_device(x):
        return x.to(device, non_blocking=True)

    def workers(dataset, finish=to_device, collate=None):
        dl = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=data["workers"],
                        persistent_workers=data["workers"] > 0, pin_memory=cuda, collate_fn=collate)
        return lambda: map(finish, iter(dl))  # iter() right away: a new pass starts before the timer

    def nvjpeg(files):
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as TF
        decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)  # one batched nvjpeg call
        return torch.stack([TF.center_crop(TF.resize(im, [side], antialias=True), [side]) for im in decoded])

    def cached():  # train.py's path: unique-image batches of memmapped cache rows, pinned, to the device
        sampler = UniqueImageBatchSampler([1] * n, batch)

        def rows(b):
            x = cache[torch.tensor([i for i, _ in b])]
            return to_device(x.pin_memory() if cuda else x)
        return lambda: map(rows, sampler)

    def resident():  # the whole uint8 cache in device memory: no loader, no host-to-device copy
        images = cache.to(device)
        return lambda: (images[i] for i in torch.randperm(n, device=device).split(batch) if len(i) == batch)

    records = [Record(image=p, captions=["x"]) for p in paths]
    out = {"PIL + resize, DataLoader (project direct path)": lambda: workers(DirectImages(records, side)),
           "torchvision decode_jpeg + resize, DataLoader": lambda: workers(TorchvisionJpegs(paths, side))}
    if cuda:
        out["nvjpeg GPU batch decode + resize"] = lambda: workers(JpegBytes(paths, side), nvjpeg, collate=list)
    return {**out, "project uint8 cache (memmap rows)": cached, "device-resident uint8 cache": resident}


def one_pass(epoch, consume, device, warmup: int = 2) -> float:
    """Warm up on a first pass (workers, nvjpeg handles) and drop it, then time one full pass
    -> items/s. A whole pass: batches prefetched during the warm-up can't flatter the rate."""
    for images in itertools.islice(epoch(), warmup):
        consume(images)
    batches, seen = epoch(), 0
    sync(device)
    start = time.perf_counter()
    for images in batches:
        consume(images)
        seen += len(images)
    sync(device)
    return seen / (time.perf_counter() - start)


def end_to_end(step, data, batch, side, ids, device) -> list[dict]:
    """Pairs/s of the model step fed by each data path, with the project's batched augmentation
    and normalisation on the device (clipModel.to_model_input) and pre-tokenized ids trimmed per
    batch (data.token_batch), as train.py does; each against the step alone on synthetic
    images, timed just before over as many steps (a shared machine's load drifts)."""
    tokens = {"input_ids": ids.cpu(), "attention_mask": torch.ones_like(ids.cpu())}
    synthetic, mask = torch.randn(batch, 3, side, side, device=device), torch.ones_like(ids)

    def consume(images):
        t, m = token_batch(tokens, torch.randperm(len(images)))
        step(to_model_input(images, (0.5,) * 3, (0.5,) * 3, augment=True),
             t.to(device, non_blocking=True), m.to(device, non_blocking=True))
    rows = []
    for name, make in feeds(data, batch, side, device).items():
        alone = one_pass(lambda: itertools.repeat(synthetic, len(data["paths"]) // batch),
                         lambda images: step(images, ids, mask), device)
        rate = one_pass(make(), consume, device)
        rows.append({"path": name, "pairs_per_s": rate, "model_step_pairs_per_s": alone,
                     "fraction_of_model_step": rate / alone})
    return rows


def data_section(args, device, folder: Path, name: str, batch: int, peak: dict) -> dict:
    side = 32 if args.tiny else 224
    jpeg_dir = Path(args.jpeg_dir) if args.jpeg_dir else make_jpegs(folder / "jpegs", min(args.images, 512))
    for i in range(512, 0 if args.jpeg_dir else args.images):  # decoding costs per file: links of the
        os.link(jpeg_dir / "images" / f"{i % 512}.jpg", jpeg_dir / "images" / f"{i}.jpg")  # 512 will do
    paths = sorted(p for p in jpeg_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:args.images]
    if len(paths) < 2 * batch:
        raise ValueError(f"{len(paths)} JPEGs under {jpeg_dir}: need at least 2 batches of {batch}")
    start = time.perf_counter()
    cache, _ = load_images([Record(image=p, captions=["x"]) for p in paths], side, folder / "cache", progress=False)
    data = {"paths": paths, "cache": cache, "workers": args.workers}
    decode = [{"path": "project cache build (one-off, thread pool)",
               "images_per_s": len(paths) / (time.perf_counter() - start)}]
    decode += [{"path": k, "images_per_s": one_pass(make(), lambda images: None, device)}
               for k, make in feeds(data, batch, side, device).items()]
    row, e2e = measure(name, VARIANTS[name], batch, args, device, peak, folder, data)
    return {"images": len(paths), "jpeg_dir": str(jpeg_dir), "workers": args.workers,
            "mean_jpeg_kb": sum(p.stat().st_size for p in paths) / len(paths) / 1024,
            "e2e_variant": name, "e2e_batch": batch, "model_step_pairs_per_s": row["pairs_per_s"],
            "decode": decode, "end_to_end": e2e}


def guarded(measurement, device, context: dict) -> dict:
    """Run one measurement; a failure (e.g. out of memory at one batch size) becomes a row with
    its error, and the other measurements go on."""
    try:
        return measurement()
    except Exception as e:
        error = f"{type(e).__name__}: {e}"[:300]
        print(f"    failed: {error}")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {**context, "error": error}


# ---------------------------------------------------------------- report and main

def print_tables(result):
    hw, peak = result["hardware"], result["peak"]
    print(f"\n{hw['device_name']} ({hw['device']}), peak {peak['tflops']:.3g} TFLOP/s measured ({peak['kind']})")
    print("{:<30}{:>6}  {:<14}{:>9}{:>11}{:>9}{:>7}{:>10}".format(
        "variant", "batch", "precision", "pairs/s", "GFLOP/pair", "TFLOP/s", "MFU %", "peak GiB"))
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['variant']:<30}{r['batch']:>6}  failed: {r['error']}")
            continue
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        print(f"{r['variant']:<30}{r['batch']:>6}  {r['precision']:<14}{r['pairs_per_s']:>9.4g}"
              f"{r['gflop_per_pair']:>11.4g}{r['tflops']:>9.3g}{100 * r['mfu']:>7.3g}{mem:>10}")
    data = result.get("data_path")
    if data and "error" in data:
        print(f"\ndata path failed: {data['error']}")
    elif data:
        print(f"\ndata path: {data['images']} JPEGs ({data['mean_jpeg_kb']:.0f} KB mean) from {data['jpeg_dir']}, "
              f"{data['workers']} workers; feeding {data['e2e_variant']} batch {data['e2e_batch']} "
              f"({data['model_step_pairs_per_s']:.4g} pairs/s alone)")
        e2e = {r["path"]: r for r in data["end_to_end"]}
        print(f"{'path':<50}{'images/s':>10}{'e2e pairs/s':>13}{'step alone':>12}{'% of step':>11}")
        for r in data["decode"]:
            e = e2e.get(r["path"])
            tail = f"{e['pairs_per_s']:>13.4g}{e['model_step_pairs_per_s']:>12.4g}" \
                   f"{100 * e['fraction_of_model_step']:>10.0f}%" if e else ""
            print(f"{r['path']:<50}{r['images_per_s']:>10.0f}{tail}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) or a torch device")
    p.add_argument("--tiny", action="store_true", help="tiny towers, few steps: a CPU smoke run in seconds")
    p.add_argument("--variants", default="", help=f"comma list of {', '.join(VARIANTS)}; "
                   "default: all on CUDA; on a CPU no compile, and fp32 only unless --tiny")
    p.add_argument("--batch_sizes", default="", help="comma list run for every variant; default: each variant's own")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 2 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 with --tiny)")
    p.add_argument("--skip_open_clip", action="store_true")
    p.add_argument("--skip_data", action="store_true", help="model step only: no JPEG data path")
    p.add_argument("--jpeg_dir", default="", help="folder of real JPEGs, searched recursively; "
                   "default: generate --images 500x375 photo-like JPEGs")
    p.add_argument("--images", type=int, default=None, help="JPEGs per pass (default 4096; 32 with --tiny)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers for decoding")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default (1 with --tiny, "
                   "where starting threads costs more than the work on a busy machine)")
    p.add_argument("--e2e_variant", default="", help="variant fed by the data path; default: the fastest seed row")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "train_throughput.json"))
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.images = args.images or (32 if args.tiny else 4096)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.tiny else threads))
    try:
        return run(args, device)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a longer-lived process (the tests)


def run(args, device) -> dict:
    # On a CPU by default no compile (minutes of compiling) and, at full size, no bf16 (AVX2 CPUs
    # emulate it: 0.3 vs 25 GFLOP/s on the 2-core machine of benchmarks/NOTES.md).
    names = [v for v in args.variants.split(",") if v] or [v for v in VARIANTS if device.type == "cuda" or (
        not VARIANTS[v]["compile"] and (args.tiny or not VARIANTS[v]["bf16"]))]
    unknown = set(names) - set(VARIANTS) | ({args.e2e_variant} - set(VARIANTS) - {""})
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if not args.skip_open_clip and importlib.util.find_spec("open_clip") is None:
        print("open_clip is not installed (pip install open_clip_torch): skipping its rows")
        args.skip_open_clip = True
    if args.skip_open_clip:
        names = [n for n in names if VARIANTS[n]["model"] != "open_clip"]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b] or ([8] if args.tiny else None)

    result = {"hardware": hardware(device), "peak": matmul_peak(device, args.tiny), "rows": [], "args": vars(args)}
    if device.type != "cuda":
        result["memory_note"] = "no CUDA: peak_mem_gib is null; rss_high_water_gib is the process ru_maxrss so far"
    print(f"{result['hardware']['device_name']}: peak {result['peak']['tflops']:.3g} TFLOP/s ({result['peak']['kind']})")
    folder = Path(tempfile.mkdtemp(prefix="train_throughput_"))
    try:
        for name in names:
            for batch in batch_sizes or [VARIANTS[name]["batch"]]:
                print(f"  {name} batch {batch} ...", flush=True)
                result["rows"].append(guarded(
                    lambda: measure(name, VARIANTS[name], batch, args, device, result["peak"], folder)[0],
                    device, {"variant": name, "model": VARIANTS[name]["model"], "batch": batch}))
                if VARIANTS[name]["compile"]:
                    torch._dynamo.reset()  # compiled graphs would keep this row's model alive
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        seed = [r for r in result["rows"] if r["model"] == "seed" and "error" not in r]
        best = max(seed, key=lambda r: r["pairs_per_s"], default=None)  # the seed row worth feeding
        e2e = (args.e2e_variant, (batch_sizes or [VARIANTS[args.e2e_variant]["batch"]])[0]) if args.e2e_variant \
            else (best["variant"], best["batch"]) if best else None
        if e2e and not args.skip_data:
            print(f"  data path, feeding {e2e[0]} batch {e2e[1]} ...", flush=True)
            result["data_path"] = guarded(lambda: data_section(args, device, folder, *e2e, result["peak"]),
                                          device, {"e2e_variant": e2e[0], "e2e_batch": e2e[1]})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_tables(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
