"""Multi-GPU training through torch.distributed: launched by torchrun, which sets the
RANK / WORLD_SIZE / LOCAL_RANK environment; a plain `python train.py` is a world of one."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the process group when launched by torchrun -> (rank, world size, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    return not active() or dist.get_rank() == 0


def barrier():
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. building a disk cache), then the others reuse its work."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all ranks (every rank gets the same number)."""
    if not active():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def broadcast_float(value: float) -> float:
    """Rank 0's value on every rank (e.g. the validation score that drives the lr schedule)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, 0)
    return float(t.item())


def broadcast_object(obj):
    """Rank 0's (picklable, small) object on every rank, e.g. the run folder it created."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]
