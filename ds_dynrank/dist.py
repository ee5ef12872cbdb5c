"""The only module that talks to the process group (through DeepSpeed's own comm): joining it, collectives, and
counting the bytes they move.

Every function degrades to a no-op at world size 1, so the same code runs as plain `python`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import deepspeed
import deepspeed.comm as dscomm
import torch
import torch.distributed

from ds_dynrank.launch_env import check_launch_env, free_port, launch_env, launch_world_size, other_mpi


def init(timeout_s: float = 600.0) -> None:
    """Join the process group if a launcher started us; stay single-process otherwise."""
    if dscomm.is_initialized():
        return
    check_launch_env()
    os.environ.update(launch_env(os.environ))
    if "WORLD_SIZE" not in os.environ and not other_mpi(os.environ):
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    # other MPIs (MPICH, Intel MPI): DeepSpeed's own mpi4py discovery (auto_mpi_discovery, the default)
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    _unlink_shm_buffer()


def shutdown() -> None:
    """Leave the process group at the end of a job that finished, on every rank, while the interpreter is whole.

    Left to the interpreter's teardown, a rank that finishes first closes its connections while a peer may still
    have its last collective in flight, and the peer aborts (SIGABRT, "terminate called without an active
    exception"): CI saw a 2-process Trainer run that had saved everything fail so, and torchrun then reports the
    whole job failed. The barrier holds every rank until all are past their last collective (gloo's first waits
    for this rank's pending work); the destroy then stops the backend's threads before the teardown.
    Only on success: after an error a peer may never reach the barrier (torchtitan does likewise).
    """
    if not dscomm.is_initialized():
        return
    barrier()
    dscomm.destroy_process_group()


def shm_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU shared-memory all-reduce buffer of `rank` lives (ops/csrc/cpu/comm/shm.cpp names it after
    the user and the rendezvous address, as the environment gives it)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_buffer() -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory all-reduce buffer once every rank has mapped it.

    DeepSpeed (0.19.8) creates it (67 MB) at init and never unlinks it, so every CPU run leaks it: 19 GB of /dev/shm
    after a day of runs here, until the OOM killer stopped one. The mappings outlive the name, so the buffer works on
    and the memory goes back when the processes exit. Nothing to do where the buffer is not used (GPUs, ranks on
    several hosts).
    """
    if world_size() == 1:
        return
    barrier()  # past it, every rank has opened every other rank's buffer
    with suppress(FileNotFoundError):
        shm_buffer_path(rank()).unlink()


def is_initialized() -> bool:
    return dscomm.is_initialized()


def rank(group=None) -> int:
    """This process's rank in `group` (the world by default)."""
    if not dscomm.is_initialized():
        return 0
    return dscomm.get_rank(group=group) if group is not None else dscomm.get_rank()


def world_size() -> int:
    return dscomm.get_world_size() if dscomm.is_initialized() else 1


def expected_world_size() -> int:
    """The world size, also before the process group exists (as the launcher announced it)."""
    return world_size() if dscomm.is_initialized() else launch_world_size()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dscomm.barrier()


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place SUM across the group (returns t for chaining)."""
    if world_size() > 1:
        dscomm.all_reduce(t, op=dscomm.ReduceOp.SUM, group=group)
    return t


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's copy of `t` (same shape on all ranks), in rank order."""
    if world_size() == 1:
        return [t.clone()]
    out = [torch.empty_like(t) for _ in range(dscomm.get_world_size(group))]
    dscomm.all_gather(out, t, group=group)
    return out


def all_gather_object(obj, group=None) -> list:
    """Every rank's picklable `obj`, in rank order (small records only: it pickles through a byte tensor)."""
    if world_size() == 1:
        return [obj]
    out = [None] * dscomm.get_world_size(group)
    dscomm.all_gather_object(out, obj, group=group)
    return out


def broadcast(t: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    if world_size() > 1:
        dscomm.broadcast(t, src=src, group=group)
    return t


@dataclass
class ByteCount:
    """Filled in when a `counting_bytes` block ends."""

    bytes: int = 0
    ops: int = 0


def _logged() -> tuple[int, int]:
    """(bytes, ops) DeepSpeed's comms logger has recorded so far in this process."""
    from deepspeed.comm.comm import comms_logger

    sizes = [(size, entry[0]) for by_size in comms_logger.comms_dict.values() for size, entry in by_size.items()]
    return sum(size * count for size, count in sizes), sum(count for _, count in sizes)


@contextmanager
def counting_bytes() -> Iterator[ByteCount]:
    """Payload bytes this rank hands to DeepSpeed's collectives inside the block (ours, ZeRO's and the engine's), as
    DeepSpeed's own comms logger sizes them: the tensor of each op. Calls made straight to torch.distributed are not
    seen. The logger is switched on for the block only (it synchronises the device after each op)."""
    from deepspeed.comm.comm import comms_logger

    count = ByteCount()
    saved = (comms_logger.enabled, comms_logger.prof_all)
    comms_logger.enabled, comms_logger.prof_all = True, True
    start = _logged()
    try:
        yield count
    finally:
        comms_logger.enabled, comms_logger.prof_all = saved
        end = _logged()
        count.bytes, count.ops = end[0] - start[0], end[1] - start[1]


def ranks_where(flag: bool, device=None) -> list[int]:
    """The ranks on which `flag` is true, known to every rank (one all-gather of one value)."""
    mine = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    return [r for r, t in enumerate(all_gather(mine)) if int(t.item())]


def is_collective_failure(err: BaseException) -> bool:
    """A process-group error (a dead or hung peer), as gloo and NCCL report it, rather than a bug of ours."""
    signs = ("Connection closed by peer", "Connection reset by peer", "timed out", "Timed out", "NCCL error")
    return isinstance(err, torch.distributed.DistError) or any(sign in str(err) for sign in signs)
