"""Process-level settings shared by the entry points."""

from __future__ import annotations

import os

import torch


def share_cpu_threads(device_name: str, local_world_size: int) -> None:
    """On the CPU, give each local process its share of the cores unless the user set OMP_NUM_THREADS:
    oversubscribed processes run slower than one thread each."""
    if device_name == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world_size)))


def local_world_size(default: int) -> int:
    return int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", default)))
