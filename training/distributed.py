"""The process group for training under ``torchrun`` (DistributedDataParallel), and nothing when run alone.

    torchrun --standalone --nproc-per-node=2 -m training.train --model cnn64 --threads 1

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process it starts; without them (a plain
``python -m training.train``) every helper here is a no-op and the run is the single-process one.
"""

from __future__ import annotations

import os
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that evaluates, logs and writes files."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group when there is more than one process: NCCL on CUDA (one GPU per process,
    ``cuda:LOCAL_RANK``), gloo on CPU. Returns the device this process trains on (``device`` when alone)."""
    if world_size() == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def backend() -> str:
    return dist.get_backend() if dist.is_initialized() else "none"


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel when in a process group (gradients averaged over ranks; rank 0's
    weights and buffers broadcast on construction), else ``module`` itself. DDP syncs the parameters that
    require gradients when it is built: wrap again after freezing or unfreezing layers."""
    if not dist.is_initialized():
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(array: np.ndarray) -> np.ndarray:
    """Every rank's ``array`` concatenated in rank order, on every rank."""
    if not dist.is_initialized():
        return array
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)


def rank_seed(seed: int, epoch: int) -> int:
    """A seed of its own for each (run seed, epoch, rank): ranks draw different augmentations and dropout, and
    a resumed run draws what it would have drawn without saving every rank's generator state."""
    return int(np.random.SeedSequence([seed, epoch, rank()]).generate_state(1)[0])
