"""training/step.py: parameter groups, freezing, precision, accumulation, checkpointing of activations."""
import re

import pytest
import torch

from clipModel import CLIPConfig, CLIPModel, ImageEncoderConfig, TextEncoderConfig
from conftest import TINY_CAPTIONS
from clip_foundation.training import step
from clip_foundation.training.step import (NonFiniteLoss, build_scheduler, contrastive_backward, freeze_towers, grad_scaler,
                                    optimizer_step, param_groups, resolve_precision)
from clipModel import clip_loss


def tiny_model(dropout=0.0, stem="linear", seed=0) -> CLIPModel:
    torch.manual_seed(seed)
    cfg = CLIPConfig(image=ImageEncoderConfig(kind="scratch", image_size=32, width=32, depth=3, heads=2, stem=stem),
                     text=TextEncoderConfig(kind="scratch", width=32, depth=2, heads=2, vocab_size=100, pooling="mean"),
                     projection_dim=16, dropout=dropout)
    return CLIPModel(cfg, captions=TINY_CAPTIONS * 5)


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    ids = torch.randint(5, 60, (n, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, 5:] = 0  # some padding
    return images, ids, mask


def embed_fn(model):
    return lambda images, ids, mask: (model.encode_image(images), model.encode_text(ids, mask))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("image_lr, text_lr", [(0.0, 0.0), (1e-4, 1e-5)])
def test_param_groups_lrs_and_decay_exclusions(image_lr, text_lr):
    model = tiny_model()
    groups = param_groups(model, weight_decay=0.2, lr=1e-3, image_lr=image_lr, text_lr=text_lr)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())  # every parameter exactly once
    expect_lr = {"image_encoder": image_lr or 1e-3, "text_encoder": text_lr or 1e-3}
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            assert g["lr"] == expect_lr.get(name.split(".")[0], 1e-3), name
            exempt = p.ndim < 2 or name.endswith(".bias") or name == "logit_scale"
            assert g["weight_decay"] == (0.0 if exempt else 0.2), name
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    assert by_name["logit_scale"]["weight_decay"] == 0.0
    assert by_name["image_projection.layer_norm.weight"]["weight_decay"] == 0.0
    assert by_name["image_projection.projection.weight"]["weight_decay"] == 0.2


def test_tutorial_preset_gives_three_learning_rates():
    from clip_foundation import training as train
    cfg = train.resolve_config(["--preset=tutorial"])
    assert (cfg.train.lr, cfg.train.image_lr, cfg.train.text_lr) == (1e-3, 1e-4, 1e-5)
    assert cfg.train.schedule == "plateau"


@pytest.mark.parametrize("kind", ["scratch", "hf"])
@pytest.mark.parametrize("keep", [0, 1])
def test_freeze_all_but_last_blocks(kind, keep, tiny_hf):
    if kind == "hf":
        cfg = CLIPConfig(image=ImageEncoderConfig(kind="hf", name=str(tiny_hf / "vit")),
                         text=TextEncoderConfig(kind="hf", name=str(tiny_hf / "bert")))
        model, last = CLIPModel(cfg), 1
    else:
        model, last = tiny_model(), 2
    block = lambda i: re.compile(rf"(^|\.)(layer|layers|blocks)\.{i}\.")  # noqa: E731 (transformers renamed layer -> layers)
    freeze_towers(model, freeze_image=True, freeze_text=False, image_blocks=keep)
    trains = {n for n, p in model.image_encoder.model.named_parameters() if p.requires_grad}
    assert any(block(last).search(n) for n in trains) == bool(keep)
    assert not any(block(0).search(n) for n in trains)
    assert any("embed" in n for n, _ in model.image_encoder.model.named_parameters())
    assert not any("embed" in n for n in trains)
    assert all(p.requires_grad for p in model.text_encoder.parameters())
    assert all(p.requires_grad for p in model.image_projection.parameters())
    with pytest.raises(ValueError, match="blocks"):
        freeze_towers(model, True, True, image_blocks=99)


@pytest.mark.parametrize("micro", [2, 4])
def test_accumulation_equals_the_large_batch(micro):
    images, ids, mask = batch(8)
    results = []
    for k in (1, micro):
        model = tiny_model()
        chunks = list(zip(images.chunk(k), ids.chunk(k), mask.chunk(k)))
        loss = contrastive_backward(embed_fn(model), chunks, model.scale, clip_loss, "fp32", torch.device("cpu"))
        results.append((loss, grads(model)))
    (loss_1, g_1), (loss_k, g_k) = results
    torch.testing.assert_close(loss_k, loss_1)
    assert g_1.keys() == g_k.keys() and "logit_scale" in g_1
    for name in g_1:
        torch.testing.assert_close(g_k[name], g_1[name], atol=1e-6, rtol=1e-4, msg=name)


def test_accumulation_replays_dropout_masks():
    """With dropout on, pass 2 must see pass 1's masks, or the spliced features would not match."""
    images, ids, mask = batch(8)
    model = tiny_model(dropout=0.5)
    chunks = list(zip(images.chunk(2), ids.chunk(2), mask.chunk(2)))
    torch.manual_seed(3)
    loss = contrastive_backward(embed_fn(model), chunks, model.scale, clip_loss, "fp32", torch.device("cpu"))
    torch.manual_seed(3)  # the same masks again, all features with a graph: the reference loss
    with torch.no_grad():
        feats = [embed_fn(model)(*c) for c in chunks]
    reference = clip_loss(torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats]), model.scale())
    torch.testing.assert_close(loss, reference)


@pytest.mark.parametrize("kind", ["scratch", "hf"])
def test_grad_checkpointing_gives_the_same_gradients(kind, tiny_hf):
    images, ids, mask = batch(4)
    results = []
    for checkpointing in (False, True):
        if kind == "hf":
            torch.manual_seed(0)
            model = CLIPModel(CLIPConfig(image=ImageEncoderConfig(kind="hf", name=str(tiny_hf / "vit")),
                                         text=TextEncoderConfig(kind="hf", name=str(tiny_hf / "bert")), dropout=0.0))
            ids = ids.clamp(max=10)
        else:
            model = tiny_model()
        model.train()
        for encoder in (model.image_encoder, model.text_encoder):
            encoder.set_grad_checkpointing(checkpointing)
        contrastive_backward(embed_fn(model), [(images, ids, mask)], model.scale, clip_loss, "fp32", torch.device("cpu"))
        results.append(grads(model))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], msg=name)


def test_precision_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(step.cpu, "has", lambda unit: unit != "bf16")
    assert resolve_precision("auto", cpu) == "fp32"  # no bf16 units: bf16 would be emulated, 10x slower
    assert resolve_precision("bf16", cpu) == "bf16"  # asked for: granted
    monkeypatch.setattr(step.cpu, "has", lambda unit: True)
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("auto", cpu, towers_train=False) == "fp32"  # only the heads train: fp32 as measured
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", torch.device("mps")) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", cpu)


def test_adamw_is_fused_on_a_cpu_too():
    """One fused call updates every parameter: the step and clipping took 2.4x less time on a CPU."""
    model = tiny_model()
    optimizer = step.build_optimizer(model, torch.device("cpu"), lr=1e-3, weight_decay=0.1)
    assert optimizer.defaults["fused"] is True
    before = model.logit_scale.detach().clone()
    model.logit_scale.grad = torch.tensor(1.0)
    optimizer.step()
    assert model.logit_scale.item() < before.item()


def test_scratch_attention_under_cpu_autocast_matches_sdpa():
    """Under a CPU's bf16 autocast the scratch blocks' attention is written out (bf16 matmuls, fp32
    softmax; SDPA's CPU kernels are slow there): the same values and gradients as SDPA, masks included."""
    import scratch_towers
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 8, generator=g, requires_grad=True) for _ in range(3))
    keep = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    keep[0, ..., 4:] = False  # a padded caption
    for mask in (None, keep):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = scratch_towers.attention(q, k, v, mask)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(y.float(), want, atol=3e-2, rtol=3e-2)  # bf16 matmuls
        got_grads = torch.autograd.grad(y.float().sum(), (q, k, v))
        want_grads = torch.autograd.grad(want.sum(), (q, k, v))
        for got, expected in zip(got_grads, want_grads):
            torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)
    assert torch.equal(scratch_towers.attention(q, k, v, keep),  # no autocast: SDPA itself
                       torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep))


def test_bf16_autocast_step_runs_and_learns_on_cpu():
    images, ids, mask = batch(8)
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = grad_scaler("bf16", torch.device("cpu"))
    losses = []
    for _ in range(5):
        losses.append(contrastive_backward(embed_fn(model), [(images, ids, mask)], model.scale, clip_loss,
                                           "bf16", torch.device("cpu")).item())
        optimizer_step(model, opt, scaler, grad_clip=1.0)
    assert losses[-1] < losses[0]


def test_non_finite_loss_and_gradients_raise():
    images, ids, mask = batch(4)
    model = tiny_model()
    nan_loss = lambda i, t, s: clip_loss(i, t, s) * float("nan")  # noqa: E731
    with pytest.raises(NonFiniteLoss, match="nan"):
        contrastive_backward(embed_fn(model), [(images, ids, mask)], model.scale, nan_loss, "fp32", torch.device("cpu"))
    model.logit_scale.grad = torch.tensor(float("inf"))
    with pytest.raises(NonFiniteLoss, match="gradient norm"):
        optimizer_step(model, torch.optim.AdamW(model.parameters()), grad_scaler("fp32", torch.device("cpu")), 1.0)


def test_plateau_schedule_lowers_lr_when_recall_stalls():
    model = tiny_model()
    opt = torch.optim.AdamW(param_groups(model, 0.1, 1e-3), lr=1e-3)
    sched = build_scheduler(opt, "plateau", total_steps=10, plateau_factor=0.5, plateau_patience=1)
    for score in (10.0, 20.0, 20.0, 20.0):
        sched.step(score)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="schedule"):
        build_scheduler(opt, "linear", 10)


@pytest.mark.long
def test_compiled_towers_match_eager():
    """--compile: torch.compile (inductor; needs a C++ compiler on CPU) gives the eager loss and gradients."""
    images, ids, mask = batch(8)
    results = []
    for compiled in (False, True):
        model = tiny_model()
        if compiled:
            model.image_encoder.compile()
            model.text_encoder.compile()
        loss = contrastive_backward(embed_fn(model), [(images, ids, mask)], model.scale, clip_loss, "fp32",
                                    torch.device("cpu"))
        results.append((loss, grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    for name in results[0][1]:
        torch.testing.assert_close(results[1][1][name], results[0][1][name], atol=1e-5, rtol=1e-3, msg=name)
