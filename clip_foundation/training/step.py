"""Training mechanics: which parameters train and how fast, mixed precision, and one
optimizer step over a batch split into micro-batches. train.py composes these."""
from __future__ import annotations

import contextlib
import math
import random

import torch

from clip_foundation.common import cpu
from clipModel import CLIPModel, check

SCHEDULES = ("cosine", "plateau", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class NonFiniteLoss(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite."""


# ---------------------------------------------------------------- what trains

def freeze_towers(model: CLIPModel, freeze_image: bool, freeze_text: bool,
                  image_blocks: int = 0, text_blocks: int = 0):
    """Freeze whole towers, or all of a frozen tower but its last N blocks (and what follows them)."""
    for encoder, frozen, keep in ((model.image_encoder, freeze_image, image_blocks),
                                  (model.text_encoder, freeze_text, text_blocks)):
        encoder.requires_grad_(not frozen)
        if frozen and keep > 0:
            blocks, tail = encoder.blocks()
            if keep > len(blocks):
                raise ValueError(f"the {encoder.kind} tower has {len(blocks)} blocks; cannot train the last {keep}")
            for p in [p for block in blocks[-keep:] for p in block] + tail:
                p.requires_grad_(True)


def no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """Biases, norm weights (all 1-d) and the temperature are not decayed (as in CLIP and open_clip)."""
    return p.ndim < 2 or name.endswith(".bias") or "logit_scale" in name


def param_groups(model: CLIPModel, weight_decay: float, lr: float, image_lr: float = 0.0,
                 text_lr: float = 0.0) -> list[dict]:
    """AdamW groups: each tower with its own learning rate (0 = `lr`), heads and temperature
    at `lr`; weight decay on weight matrices only."""
    tower_lr = {"image_encoder": image_lr or lr, "text_encoder": text_lr or lr}
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = name.split(".")[0]
        part = part if part in tower_lr else "heads"
        decayed = not no_decay(name, p)
        group = groups.setdefault((part, decayed), {
            "name": f"{part}{'' if decayed else ' (no decay)'}", "params": [],
            "lr": tower_lr.get(part, lr), "weight_decay": weight_decay if decayed else 0.0})
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(model: CLIPModel, device: torch.device, lr: float, weight_decay: float,
                    image_lr: float = 0.0, text_lr: float = 0.0) -> torch.optim.AdamW:
    """AdamW over `param_groups` (a tower's lr of 0 means `lr`)."""
    groups = param_groups(model, weight_decay, lr, image_lr, text_lr)
    # the fused kernel updates every parameter in one call, on a GPU and on a CPU (there the step and
    # clipping take 2.4x less time than with the one-tensor-at-a-time loop)
    return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"))


def warmup_cosine(warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


def build_scheduler(optimizer, schedule: str, total_steps: int, warmup_steps: int = 0,
                    plateau_factor: float = 0.8, plateau_patience: int = 1):
    """Stepped every optimizer step (cosine, constant) or every epoch on val mean recall (plateau)."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))
    check(schedule == "plateau", "schedule", schedule, " | ".join(SCHEDULES))
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=plateau_factor,
                                                      patience=plateau_patience)


# ---------------------------------------------------------------- precision

def resolve_precision(name: str, device: torch.device, towers_train: bool = True) -> str:
    """auto: bf16 on GPUs that support it, fp16 (with a grad scaler) on older ones; on a CPU bf16 when it
    has bf16 units and a tower trains (the default run's step: ~1.5x fp32's on 2 cores), fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        # frozen towers leave only the heads' small matmuls, whose recall was measured in fp32; without
        # bf16 units bf16 is emulated, 10x slower than fp32
        return "bf16" if device.type == "cpu" and towers_train and cpu.has("bf16") else "fp32"
    check(name in PRECISIONS, "precision", name, " | ".join(PRECISIONS))
    return name


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device):
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


# ---------------------------------------------------------------- random state

def rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------- one optimizer step

def contrastive_backward(embed, micro_batches: list, scale_fn, loss_fn, precision: str,
                         device: torch.device, no_sync=contextlib.nullcontext) -> torch.Tensor:
    """Backpropagate the contrastive loss of a whole batch given as micro-batches -> the loss.

    `embed(*micro_batch)` -> (image features, text features). With one micro-batch this is a
    plain forward and backward. With several, the gradients equal the whole batch's (every
    pair still sees every negative): pass 1 embeds all micro-batches without a graph; pass 2
    re-embeds each with its graph (replaying the random state, so dropout masks match),
    splices it into the cached features and backpropagates the full loss through it alone
    (the GradCache method; Gao et al., 2021). Memory is that of one micro-batch.
    """
    if len(micro_batches) == 1:
        with autocast(precision, device):
            image_f, text_f = embed(*micro_batches[0])
            loss = loss_fn(image_f.float(), text_f.float(), scale_fn())
        _check_finite(loss)
        loss.backward()
        return loss.detach()
    states, cached = [], []
    with torch.no_grad():
        for mb in micro_batches:
            states.append(rng_state(device))
            with autocast(precision, device):
                cached.append([f.float() for f in embed(*mb)])
    all_images = torch.cat([c[0] for c in cached])  # (B, D)
    all_texts = torch.cat([c[1] for c in cached])  # (B, D)
    start, loss = 0, None
    for j, mb in enumerate(micro_batches):
        set_rng_state(states[j], device)
        last = j == len(micro_batches) - 1
        with (contextlib.nullcontext() if last else no_sync()):
            with autocast(precision, device):
                image_f, text_f = (f.float() for f in embed(*mb))
                end = start + len(image_f)
                images = torch.cat([all_images[:start], image_f, all_images[end:]])
                texts = torch.cat([all_texts[:start], text_f, all_texts[end:]])
                # the temperature's gradient is counted once, in the pass DDP synchronises
                scale = scale_fn() if last else scale_fn().detach()
                loss = loss_fn(images, texts, scale)
            if j == 0:
                _check_finite(loss)
            loss.backward()
        start = end
    return loss.detach()


def _check_finite(loss: torch.Tensor):
    from clip_foundation.common import distributed
    value = distributed.mean(loss.detach())  # every rank decides alike
    if not torch.isfinite(value):
        raise NonFiniteLoss(f"the loss became {value.item()}")


def optimizer_step(model: CLIPModel, optimizer, scaler, grad_clip: float) -> float:
    """Unscale, clip, step; -> the gradient norm. A non-finite norm stops the run (fp32/bf16) or
    makes the fp16 grad scaler skip the step and lower its scale, as it is designed to."""
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if not scaler.is_enabled() and not torch.isfinite(norm):
        raise NonFiniteLoss(f"the gradient norm became {norm.item()}")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)
