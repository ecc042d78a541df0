"""The options every command that loads a saved model shares, declared and checked once.

`evaluate.py`, `search.py`, `app.py` and `clip_foundation.embed` configs inherit `ModelOptions`
(--checkpoint, --device, --engine); the export command inherits `CheckpointOption`; training keeps
its own --device and --engine (`engine_field`) and checks them with `check_model_options` too.
A dataclass puts inherited fields first: `cli.parse` fills positional fields by name, so a bare
argument still lands where it did.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from clip_foundation.common import cli
from clip_foundation.engines.registry import engine_help, engine_names
from clipModel import ConfigError, check, default_device


def engine_field(purpose: str = "encodes"):
    """An --engine option (default auto) whose --help lists the engines registered when it is shown."""
    return field(default="auto", metadata={"help": lambda: engine_help(purpose)})


@dataclass
class CheckpointOption:
    """--checkpoint: the saved model a command reads."""
    checkpoint: str = ""  # the run folder written by train.py (any save_pretrained folder)

    def validate(self) -> None:
        """Raise ConfigError for a value out of range (a subclass adds its own checks)."""


@dataclass
class ModelOptions(CheckpointOption):
    """--checkpoint, --device and --engine: a saved model, where it runs and what encodes with it."""
    device: str = "auto"  # auto (cuda, then mps, then cpu), or a torch device name
    engine: str = engine_field()

    def validate(self) -> None:
        """Raise ConfigError for an unknown --engine or a --device this machine does not have."""
        check_model_options(self)


def check_model_options(args) -> None:
    """ConfigError (one line: the option, its value, what it may be) unless `args.engine` is a
    registered engine (or auto) and `args.device` a device this machine has."""
    check(args.engine in engine_names(), "engine", args.engine, " | ".join(engine_names()))
    resolve_device(args.device)


def resolve_device(name: str) -> torch.device:
    """--device=NAME -> the device: "auto" picks one (clipModel.default_device); any other name
    must exist on this machine (cuda:7 with one GPU is a ConfigError, not a crash mid-run)."""
    if name == "auto":
        return default_device()
    gpus = torch.cuda.device_count()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # not a device name at all
        device = torch.device("meta")
    exists = ((device.type == "cpu" and not device.index)  # one CPU device: cpu:5 is none of this machine's
              or (device.type == "cuda" and (device.index or 0) < gpus)
              or (device.type == "mps" and mps and not device.index))
    check(exists, "device", name, "auto, cpu" + (f", cuda:0 to cuda:{gpus - 1}" if gpus else "")
          + (", mps" if mps else "") + " (the devices this machine has)")
    return device


def checked_device(args, usage: str) -> torch.device:
    """`args.validate()` (every option in its range, --engine and --device included), then the torch
    device `args.device` names; a usage error (exit 2) naming the option otherwise."""
    try:
        args.validate()
        return resolve_device(args.device)  # cuda:7 on a one-GPU machine is refused here
    except ConfigError as e:
        cli.usage_error(str(e), usage)
