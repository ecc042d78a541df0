"""What a training run is: `RunConfig` (model, data, streaming and training options, each checked
before any work), the presets it starts from, and the config a run folder saves."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from clip_foundation.common import cli
from clip_foundation.data.records import caption_fault
from clip_foundation.data.splits import DataConfig
from clip_foundation.engines.options import check_model_options, engine_field
from clip_foundation.training.presets import PRESETS, expand_preset
from clip_foundation.training.streaming import StreamConfig
from clip_foundation.training.step import PRECISIONS, SCHEDULES
from clip_foundation.training.checkpoint import check_run_name_text, find_resume
from clipModel import CLIPConfig, ImageEncoderConfig, TextEncoderConfig, check


@dataclass
class TrainConfig:
    run_name: str = ""  # the run folder is OUT_DIR/RUN_NAME; empty = a timestamp (made unique)
    overwrite: bool = False  # allow --run_name of an existing run: its folder is deleted first
    out_dir: str = "runs"  # where run folders go
    epochs: int = 15  # passes over the training images (15 x 2,000 synthetic: ~75 s on 2 CPU cores with bf16 units)
    batch_size: int = 64  # pairs per optimizer step, over all GPUs and micro-batches: the negatives each pair sees
    captions_per_epoch: int = 1  # captions seen per image per epoch (each in its own round)
    lr: float = 1e-3  # peak AdamW learning rate of the projection heads and temperature (and towers by default)
    image_lr: float = 0.0  # image tower's learning rate; 0 = lr (pretrained towers want ~1e-4)
    text_lr: float = 0.0  # text tower's learning rate; 0 = lr (pretrained towers want ~1e-5)
    weight_decay: float = 0.1  # AdamW decay on weight matrices (never on biases, norms, temperature)
    schedule: str = "cosine"  # cosine (warmup, then cosine decay per step) | plateau (x plateau_factor when val recall stalls) | constant
    warmup_steps: int = 100  # linear warmup steps (cosine and constant schedules)
    plateau_factor: float = 0.8  # plateau schedule: lr multiplier when val mean recall stops improving
    plateau_patience: int = 1  # plateau schedule: epochs without improvement before lowering the lr
    augment: bool = True  # random resized crops (no flips: captions say "left of")
    freeze_image: bool = False  # keep the image tower fixed; without augment its features are computed once
    feature_dropout: float = 0.0  # dropout on a frozen image tower's cached features while training: the augmentation cached features allow
    freeze_text: bool = False  # keep the text tower fixed; its caption features are computed once
    train_image_blocks: int = 0  # with freeze_image: still train the image tower's last N blocks
    train_text_blocks: int = 0  # with freeze_text: still train the text tower's last N blocks
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    precision: str = "auto"  # auto (GPU: bf16, else fp16 + scaler; CPU with bf16 units, a tower trained: bf16, 1.4-1.7x faster steps; else fp32) | fp32 | bf16 | fp16
    accum_steps: int = 1  # split each batch into this many micro-batches: same gradients, less memory
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    compile: bool = False  # torch.compile both towers (faster steps on GPUs after a slow first one)
    images_on_device: str = "auto"  # keep decoded training images on the GPU: auto (if they fit in half its free memory) | on | off
    seed: int = 0  # seeds model init, sampling and augmentation
    device: str = "auto"  # auto (cuda, then mps, then cpu), or a torch device name
    engine: str = engine_field("encodes frozen towers' features")
    log_every: int = 10  # steps between log lines in log.jsonl
    save_every: int = 0  # steps between last/ checkpoints; 0 = at each epoch end only
    resume: str = ""  # continue a run: its folder, its last/ folder, or "latest"
    tensorboard: bool = True  # also log to RUN/tensorboard when the tensorboard package is installed
    querybank: int = 0  # keep N training captions' embeddings to lower "hub" images' scores at test time (querybank.py); 0 = off
    queries: tuple[str, ...] = ()  # text queries drawn in matches.png; empty = ones that suit the dataset
    progress: bool = True  # tqdm progress bars

    def validate(self) -> None:
        """Raise ConfigError (one line: the key, the value, the allowed range) for a value out of
        range, so a nonsense value (--lr=-1: gradient ascent) stops the run before any work."""
        check_run_name_text(self.run_name)
        check(bool(self.out_dir), "out_dir", self.out_dir, "a folder path")
        for key in ("epochs", "captions_per_epoch", "accum_steps", "log_every"):
            check(getattr(self, key) >= 1, key, getattr(self, key), ">= 1")
        check(self.batch_size >= 2, "batch_size", self.batch_size, ">= 2 (each pair needs others as negatives)")
        check(self.batch_size % self.accum_steps == 0, "accum_steps", self.accum_steps,
              f"a divisor of --batch_size={self.batch_size} (equal micro-batches)")
        for key in ("warmup_steps", "plateau_patience", "train_image_blocks", "train_text_blocks", "save_every",
                    "querybank"):
            check(getattr(self, key) >= 0, key, getattr(self, key), ">= 0")
        check(0 < self.lr < math.inf, "lr", self.lr, "a finite number > 0")
        for key in ("image_lr", "text_lr", "weight_decay", "grad_clip"):
            check(0 <= getattr(self, key) < math.inf, key, getattr(self, key), "a finite number >= 0")
        check(0 <= self.feature_dropout < 1, "feature_dropout", self.feature_dropout, "in [0, 1)")
        cached = self.freeze_image and not self.augment and self.train_image_blocks == 0
        check(cached or self.feature_dropout == 0, "feature_dropout", self.feature_dropout,
              "0 unless the image tower's features are cached (--freeze_image --augment=false)")
        check(0 < self.plateau_factor < 1, "plateau_factor", self.plateau_factor, "between 0 and 1 (exclusive)")
        check(self.schedule in SCHEDULES, "schedule", self.schedule, " | ".join(SCHEDULES))
        check(self.precision in PRECISIONS, "precision", self.precision, " | ".join(PRECISIONS))
        check(self.images_on_device in ("auto", "on", "off"), "images_on_device", self.images_on_device,
              "auto | on | off")
        check(0 <= self.seed < 2**32, "seed", self.seed, "in [0, 2**32)")
        check_model_options(self)  # --engine and --device, as every command checks them
        for query in self.queries:
            fault = caption_fault(query.strip())
            check(fault is None, "queries", query, f"captions ({fault and fault[1]})")



@dataclass
class RunConfig:
    # the default run's small CLIP: 3 image blocks, the last on a 2x2-pooled token grid, and 2 text blocks
    # train in ~55% of the step of 4 + 3 full blocks with the same test recall (docs/results.md)
    model: CLIPConfig = field(default_factory=lambda: CLIPConfig(
        image=ImageEncoderConfig(kind="scratch", depth=3, merge_after=2),
        text=TextEncoderConfig(kind="scratch", pooling="mean", depth=2)))
    data: DataConfig = field(default_factory=DataConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)  # used when --data names shards
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """Check every model, data, streaming and training value (ConfigError names the first one out of range)."""
        self.model.validate()
        self.data.validate()
        self.stream.validate()
        self.train.validate()

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """The inverse of asdict, as saved in a run's config.json; unknown keys are ignored."""
        def build(kind, values):
            known = {f.name: f for f in fields(kind)}
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})
        return cls(CLIPConfig.from_dict(d["model"]), build(DataConfig, d.get("data", {})),
                   build(StreamConfig, d.get("stream", {})), build(TrainConfig, d.get("train", {})))


USAGE = ("usage: python train.py [--preset=NAME] [--key=value ...]   (e.g. --epochs=5 --data=DIR --image.kind=timm)\n"
         f"presets: {', '.join(PRESETS)}")


def resolve_config(argv: list[str]) -> RunConfig:
    """--key=value options (after any --preset) applied to the defaults or, with --resume, to
    the resumed run's saved config, so `--resume=runs/x --epochs=30` extends run x."""
    argv = expand_preset(argv)
    cfg = cli.apply_overrides(RunConfig(), argv, aliases=ALIASES)
    if not cfg.train.resume:
        cfg.validate()
        return cfg
    folder = find_resume(cfg.train.resume, cfg.train.out_dir, cfg.train.run_name)
    saved = read_run_config(folder)
    before = cli.leaves_values(saved.model)
    cli.apply_overrides(saved, argv, aliases=ALIASES)
    after = cli.leaves_values(saved.model)
    changed = [f"model.{k}: {before[k]!r} -> {after[k]!r}" for k in before if after[k] != before[k]]
    if changed:  # the checkpoint's weights have the saved shape: the change would be ignored
        raise cli.ConfigError("--resume cannot change the model (" + "; ".join(changed) + "); training "
                              "and data options may change. Start a new run for another model.")
    saved.train.resume = str(folder)
    saved.validate()
    return saved


def read_run_config(folder: Path) -> RunConfig:
    """The RunConfig saved in FOLDER/config.json; a broken file is an error naming it."""
    saved = CLIPConfig.saved(folder)  # CheckpointError for invalid JSON or no "model" entry
    try:
        return RunConfig.from_dict(saved)
    except (TypeError, ValueError, AttributeError) as e:
        raise cli.ConfigError(f"{Path(folder) / 'config.json'}: invalid run config ({e})") from None


ALIASES = {"data": "data.path"}
