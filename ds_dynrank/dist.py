"""The only module that talks to the process group (through DeepSpeed's own comm).

Every function degrades to a no-op at world size 1, so the same code runs as plain `python`.
"""

from __future__ import annotations

import os
from datetime import timedelta

import deepspeed
import deepspeed.comm as dscomm
import torch

from ds_dynrank.errors import UserInputError

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def check_launch_env(env: dict[str, str] | None = None) -> None:
    """Fail fast, never hang, when a launcher left the rendezvous half-described."""
    env = dict(os.environ) if env is None else env
    present = [v for v in _LAUNCH_VARS if v in env]
    if present and len(present) < len(_LAUNCH_VARS):
        missing = ", ".join(v for v in _LAUNCH_VARS if v not in env)
        raise UserInputError(f"distributed launch: {', '.join(present)} set but {missing} missing")
    if present:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        if not 0 <= rank < world:
            raise UserInputError(f"distributed launch: RANK={rank} is outside WORLD_SIZE={world}")


def init(timeout_s: float = 600.0) -> None:
    """Join the process group if a launcher started us; stay single-process otherwise."""
    if dscomm.is_initialized():
        return
    check_launch_env()
    if "WORLD_SIZE" not in os.environ and not any(k.startswith("OMPI_COMM_WORLD") for k in os.environ):
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_initialized() -> bool:
    return dscomm.is_initialized()


def rank(group=None) -> int:
    """This process's rank in `group` (the world by default)."""
    if not dscomm.is_initialized():
        return 0
    return dscomm.get_rank(group=group) if group is not None else dscomm.get_rank()


def world_size() -> int:
    return dscomm.get_world_size() if dscomm.is_initialized() else 1


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


def broadcast(t: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    if world_size() > 1:
        dscomm.broadcast(t, src=src, group=group)
    return t
