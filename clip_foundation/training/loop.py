"""The training loop: data, model and inputs prepared, the epochs (steps, logs, checkpoints, validation,
the best model kept), and the best model tested. The command line around it: `training.command`.
"""
from __future__ import annotations

import contextlib
import json
import random
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from clip_foundation.common import distributed
from clip_foundation.data import shards
from clip_foundation.data.records import DataError, DataWarning
from clip_foundation.data.sources import source_of
from clip_foundation.data.splits import all_captions, check_captions, decode_images, load_splits, split_manifest, train_sampler
from clip_foundation.engines.options import resolve_device
from clip_foundation.evaluate import querybank
from clip_foundation.evaluate.metrics import format_metrics
from clip_foundation.evaluate.modelcard import write_model_card
from clip_foundation.training.checkpoint import (STATE_FILE, check_run_name, find_resume, hold_run, last_checkpoint,
                                                 load_last, new_run_dir, save_last)
from clip_foundation.training.config import RunConfig
from clip_foundation.training.features import calibration_sample
from clip_foundation.training.inputs import (Embedder, Inputs, TrainingInputs, TrainInputs, set_train_mode,
                                             split_recall, tower_trains)
from clip_foundation.training.runlog import CurvesFile, RunLogger, progress_bar
from clip_foundation.training.streaming import StreamInputs
from clip_foundation.training.step import (NonFiniteLoss, build_optimizer, build_scheduler, contrastive_backward,
                                           freeze_towers, grad_scaler, optimizer_step, resolve_precision,
                                           rng_state, set_rng_state)
from clipModel import CLIPModel, check, clip_loss, gathered_clip_loss, siglip_loss


def _streamed(cfg: RunConfig) -> bool:
    # the training set's source streams it (WebDataset shards) rather than reading it into records
    return bool(cfg.data.path) and source_of(cfg.data.path, cfg.data.layout).streams


def prepare_data(cfg: RunConfig):
    """Resolve the dataset folder (generating the synthetic set if needed) and split it."""
    if _streamed(cfg):  # streamed train set; val/test from their own folders
        return shards.streamed_splits(cfg.data, cfg.stream)
    if not cfg.data.path:
        from clip_foundation.data.synthetic import SyntheticConfig, ensure_synthetic
        ensure_synthetic(cfg.data.synthetic_dir, SyntheticConfig(), progress=cfg.train.progress)
        cfg.data.path = cfg.data.synthetic_dir
    splits = load_splits(cfg.data)
    if not splits["train"]:
        raise DataError(f"{cfg.data.path}: the train split is empty")
    return splits


def build_model(cfg: RunConfig, splits, device, resume_from: Path | None):
    """A fresh model, or the one in the checkpoint being resumed (with its trainer state)."""
    tc = cfg.train
    if resume_from is not None:
        model, state = load_last(resume_from, device)
    else:
        model, state = CLIPModel(cfg.model, captions=all_captions(splits["train"])).to(device), None
    freeze_towers(model, tc.freeze_image, tc.freeze_text, tc.train_image_blocks, tc.train_text_blocks)
    if tc.grad_checkpointing:
        for encoder in (model.image_encoder, model.text_encoder):
            encoder.set_grad_checkpointing(True)  # each tower adapter knows its own API
    return model, state


def train(cfg: RunConfig, on_epoch=None, on_tested=None) -> tuple[CLIPModel, Path, dict]:
    """Train, keep the best model by validation recall, test it; return (model, run dir, metrics).

    on_epoch(history, run_dir), if given, runs after each epoch (e.g. to redraw live curves);
    history is the list of log entries so far (the lines of log.jsonl). on_tested(model, run_dir,
    records, inputs), if given, runs once the best model is tested, with the tested split's records
    and decoded inputs (what `python train.py` indexes and draws: `training.command.present`).
    Under torchrun each process trains its share of every batch; only rank 0 logs, evaluates and saves.
    """
    with contextlib.ExitStack() as held:  # the run folder's lock (checkpoint.hold_run), released however it ends
        return _train(cfg, on_epoch, on_tested, held)


def _train(cfg: RunConfig, on_epoch, on_tested, held: contextlib.ExitStack) -> tuple[CLIPModel, Path, dict]:
    cfg.validate()  # resolve_config did for the command line; Python callers get the same one-line errors
    cfg.data, cfg.stream = cfg.data.absolute(), cfg.stream.absolute()  # saved so: the run folder works anywhere
    tc = cfg.train
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    rank, world, device = distributed.setup(resolve_device(tc.device))
    main_rank = distributed.is_main()
    image_trains = tower_trains(tc.freeze_image, tc.train_image_blocks)
    text_trains = tower_trains(tc.freeze_text, tc.train_text_blocks)
    # 1. the run to continue, if any, held before any work
    resume_from = find_resume(tc.resume, tc.out_dir, tc.run_name) if tc.resume else None
    if resume_from is None:
        check_run_name(tc.out_dir, tc.run_name, tc.overwrite)
    elif main_rank:  # before any work: no other run may write in the folder from here on
        held.enter_context(hold_run(resume_from.parent))
    # 2. data, model and inputs
    with distributed.main_first():  # rank 0 generates data and fills the caches; the others read them
        splits = prepare_data(cfg)
        model, state = build_model(cfg, splits, device, resume_from)
        splits = {s: check_captions(recs, model.tokenizer, cfg.data.skip_bad) for s, recs in splits.items()}
        cfg.model = model.config  # resolved: image size and normalisation filled in
        stream = rng_state(device)  # training's random draws must not depend on what computing the
        inputs = build_inputs(cfg, model, splits, rank, world)  # inputs drew (int8 calibration does)
        set_rng_state(stream, device)  # or skipped (features read from the cache)
    train_inputs: TrainingInputs = inputs["train"]
    if world > 1 and resume_from is None:  # a scratch tokenizer trained in each process numbers tokens its own way
        model.tokenizer = distributed.broadcast_object(model.tokenizer)
        train_inputs.refresh_tokens(model)
    if world > 1:
        torch.manual_seed(tc.seed + rank)  # different augmentation and dropout on each rank
    # 3. the run folder
    if resume_from is not None:
        run_dir = resume_from.parent
    else:  # claimed only now, so a run that fails while preparing its data leaves no folder
        run_dir, lock = new_run_dir(tc.out_dir, tc.run_name, tc.overwrite) if main_rank else (None, None)
        if lock is not None:
            held.enter_context(lock)
        run_dir = distributed.broadcast_object(run_dir)
    if main_rank:
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        (run_dir / "split.json").write_text(json.dumps({**split_manifest(splits), "train": train_inputs.manifest()}))
    # 4. optimization: optimizer, schedule, precision, and where a resumed run left them
    train_inputs.move_rows(device, tc.images_on_device)
    if (tc.batch_size // world) % tc.accum_steps:
        raise ValueError(f"batch_size {tc.batch_size} does not split into {world} x {tc.accum_steps} equal micro-batches")
    total_steps = tc.epochs * len(train_inputs)
    precision = resolve_precision(tc.precision, device, image_trains or text_trains)
    optimizer = build_optimizer(model, device, tc.lr, tc.weight_decay, tc.image_lr, tc.text_lr)
    scheduler = build_scheduler(optimizer, tc.schedule, total_steps, tc.warmup_steps, tc.plateau_factor,
                                tc.plateau_patience)
    scaler = grad_scaler(precision, device)
    position = {"epoch": 0, "batch": 0, "step": 0, "best": -1.0, "history": []}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], device)
        position = {k: state[k] for k in position}
        train_inputs.restore(state.get("stream"))
    if tc.compile:
        model.image_encoder.compile()
        model.text_encoder.compile()
    step_module = Embedder(model, train_inputs, tc.augment)
    if world > 1:
        step_module = torch.nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None)
    if model.config.loss == "siglip":
        if world > 1:
            raise ValueError("--loss=siglip trains on one process for now; use the default clip loss with torchrun")
        loss_fn = lambda image_f, text_f, scale: siglip_loss(image_f, text_f, scale, model.logit_bias)  # noqa: E731
    else:
        loss_fn = gathered_clip_loss if world > 1 else clip_loss
    no_sync = getattr(step_module, "no_sync", contextlib.nullcontext)
    extra = {"data": asdict(cfg.data), "stream": asdict(cfg.stream), "train": asdict(tc)}
    logger = RunLogger(run_dir, position["history"], tc.tensorboard) if main_rank else None
    curves = CurvesFile(run_dir / "curves.png")
    if main_rank:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"training on {device}{f' x {world} processes' if world > 1 else ''} ({precision}): "
              f"{len(splits['train'])} images, {total_steps} steps, {trainable / 1e6:.1f}M of "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters trained -> {run_dir}"
              + (f" (resumed at epoch {position['epoch'] + 1}, step {position['step']})" if state else ""))

    def checkpoint(epoch, batch, stream_state=None):
        state = {"stream": stream_state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "rng": rng_state(device), "epoch": epoch, "batch": batch,
                 "step": step, "best": best, "history": history}
        save_last(run_dir, model, state, extra)

    # 5. the epochs: steps, logs, checkpoints, validation, the best model kept
    history, step, best = position["history"], position["step"], position["best"]
    for epoch in range(position["epoch"], tc.epochs):
        set_train_mode(model, image_trains, text_trains)
        start = position["batch"] if epoch == position["epoch"] else 0
        train_inputs.set_epoch(epoch, start)
        bar = progress_bar(train_inputs.batches(device),
                        tc.progress and main_rank, f"epoch {epoch + 1}/{tc.epochs}", len(train_inputs), start)
        tick, pairs = time.perf_counter(), 0
        for batch, (rows, caption_index) in enumerate(bar, start=start + 1):
            rows = rows.to(device, non_blocking=True)
            micro = list(zip(rows.chunk(tc.accum_steps), caption_index.chunk(tc.accum_steps)))
            try:
                loss = contrastive_backward(step_module, micro, model.scale, loss_fn, precision, device, no_sync)
                grad_norm = optimizer_step(model, optimizer, scaler, tc.grad_clip)
            except NonFiniteLoss as e:
                last = last_checkpoint(run_dir)
                raise NonFiniteLoss(
                    f"{e} at step {step + 1} (epoch {epoch + 1}): training stopped. "
                    + (f"The last good checkpoint is {last} (step {torch.load(last / STATE_FILE, weights_only=True)['step']}); "
                       f"resume with a lower learning rate: python train.py --resume={run_dir} --lr={tc.lr / 3:.1e}"
                       if last else "No checkpoint was saved yet; restart with a lower --lr.")) from None
            if tc.schedule != "plateau":
                scheduler.step()
            step, pairs = step + 1, pairs + len(rows) * world
            if step % tc.log_every == 0 or batch == len(train_inputs):
                loss_value = distributed.mean(loss).item()  # a collective: every rank joins
                if main_rank:
                    rate = pairs / (time.perf_counter() - tick)
                    entry = {"step": step, "epoch": epoch + 1, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                             "temperature": 1 / model.scale().item(), "grad_norm": grad_norm, "pairs_per_s": rate}
                    history.append(entry)
                    logger.log(entry)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{entry['lr']:.1e}", pairs_s=f"{rate:.0f}")
                    tick, pairs = time.perf_counter(), 0
            if tc.save_every and step % tc.save_every == 0 and batch < len(train_inputs):
                stream_state = train_inputs.state()  # a collective: every rank joins
                if main_rank:
                    checkpoint(epoch, batch, stream_state)
                distributed.barrier()
        entry = {"epoch": epoch + 1, "step": step, "epoch_end": True}
        if main_rank and "val" in inputs:
            val = split_recall(model, inputs["val"])
            entry.update({f"val_{k}": v for k, v in val.items()})
            print(f"epoch {epoch + 1}: val text->image R@1 {val['text_to_image_R@1']:.1f} "
                  f"R@5 {val['text_to_image_R@5']:.1f}, mean recall {val['mean_recall']:.1f}")
        score = distributed.broadcast_float(entry.get("val_mean_recall", float(epoch)))  # no val split: keep the latest
        if tc.schedule == "plateau":
            scheduler.step(score)
        stream_state = train_inputs.state()  # a collective: every rank joins
        if main_rank:
            history.append(entry)
            logger.log(entry)
            if score > best:
                model.save_pretrained(run_dir, extra_config=extra)
                write_model_card(run_dir)  # README.md: what the saved model is, its validation recall so far
            best = max(best, score)
            checkpoint(epoch + 1, 0, stream_state)
            curves.epoch_end(history, last=epoch + 1 == tc.epochs)
            if on_epoch is not None:
                on_epoch(history, run_dir)
        distributed.barrier()
    if (skips := train_inputs.report()) and main_rank:  # a collective: every rank joins
        warnings.warn(skips, DataWarning)
    if not main_rank:
        return model, run_dir, {}
    logger.close()
    # 6. the best model, tested (and handed to the caller's next step while its inputs are at hand)
    model, split, metrics = test_best(cfg, model, run_dir, splits, inputs, device)
    if on_tested is not None:
        on_tested(model, run_dir, splits[split], inputs[split])
    return model, run_dir, metrics


def build_inputs(cfg: RunConfig, model: CLIPModel, splits, rank: int = 0, world: int = 1) -> dict:
    """Each split ready for the model: "train" as `TrainingInputs` (streamed from shards, or decoded
    images / cached tower features drawn by the unique-image sampler), val and test (rank 0 only)
    decoded once, with frozen towers' features computed once."""
    tc, main_rank = cfg.train, distributed.is_main()
    kinds = dict(image_trains=tower_trains(tc.freeze_image, tc.train_image_blocks),
                 text_trains=tower_trains(tc.freeze_text, tc.train_text_blocks),
                 augment=tc.augment, cache_dir=cfg.data.cache_dir, progress=tc.progress, engine=tc.engine)
    inputs = {}
    if _streamed(cfg):  # no decoded cache of the train set: batches stream from its shards
        check(tc.feature_dropout == 0, "feature_dropout", tc.feature_dropout,
              "0 when the training set streams (its image features are computed per batch, never cached)")
        inputs["train"] = StreamInputs(model, cfg.data.path, cfg.stream, tc.batch_size, tc.seed, rank, world)
    for s in sorted((s for s in splits if splits[s] and (s == "train" or main_rank) and s not in inputs),
                    key=lambda s: s != "train"):  # train first: its images calibrate an int8 frozen tower
        images, splits[s] = decode_images(splits[s], model.config.image.image_size, cfg.data.cache_dir,
                                          cfg.data.skip_bad, tc.progress and main_rank)
        if s == "train":
            kinds["calibration"] = calibration_sample(images)  # the same for every split (used in int8 alone)
            sampler = train_sampler(splits[s], tc.batch_size, tc.captions_per_epoch, tc.seed, rank, world)
            inputs[s] = TrainInputs(model, splits[s], images, sampler, tc.feature_dropout, **kinds)
        else:
            inputs[s] = Inputs(model, splits[s], images, **kinds)
    return inputs


def test_best(cfg: RunConfig, model: CLIPModel, run_dir: Path, splits, inputs, device):
    """Reload the best model, save its querybank, test it and write metrics.json and the model card."""
    model = CLIPModel.from_pretrained(run_dir, device=device)
    split = "test" if splits["test"] else "val"
    (run_dir / querybank.FILE).unlink(missing_ok=True)  # a resumed run's bank described its earlier model
    if cfg.train.querybank and not isinstance(inputs["train"], Inputs):
        warnings.warn("--querybank needs the training captions at hand; a streamed run keeps none, "
                      "so no querybank was saved")
    elif cfg.train.querybank:
        querybank.save_bank(run_dir, querybank.caption_bank(model, inputs["train"], cfg.train.querybank,
                                                            cfg.train.seed), querybank.ALPHA, querybank.BETA)
    bank = querybank.load_bank(run_dir)  # as saved (float16), so evaluate.py reproduces these figures
    metrics = {"split": split, **split_recall(model, inputs[split], querybank=bank)}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"{split} split:\n{format_metrics(metrics)}")
    write_model_card(run_dir)  # now with the test metrics
    return model, split, metrics


