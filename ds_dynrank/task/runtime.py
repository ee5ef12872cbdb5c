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


def return_freed_memory(device_name: str) -> None:
    """On the CPU (glibc), allocations of 1 MiB and more are mapped on their own, so a freed weight goes back to
    the system. ZeRO-3 gathers each layer's full weights and frees them again at every forward and backward; in
    glibc's heap those frees stay resident (Qwen2.5-0.5B shape, 2 processes: 2.7 GB per rank between steps instead
    of 1.5 GB), and a partitioned model would look no smaller than a whole one. Accelerators have their own
    allocators; other C libraries are left alone."""
    if device_name != "cpu":
        return
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return
    if mallopt is not None and name and "libc.so" in name:
        m_mmap_threshold = -3  # glibc's M_MMAP_THRESHOLD; setting it also stops its dynamic raising
        mallopt(m_mmap_threshold, 1 << 20)
