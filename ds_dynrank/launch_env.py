"""What a launcher (deepspeed, torchrun, srun, mpirun) told this process, as pure functions of the environment:
no process group, no DeepSpeed. `ds_dynrank.dist` applies them when it joins the group.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ds_dynrank.errors import UserInputError

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_PORT = "29500"


def launch_env(env: Mapping[str, str]) -> dict[str, str]:
    """What to export so DeepSpeed's env:// rendezvous works under mpirun or srun (pure: env in, variables out).

    Empty when a launcher (deepspeed, torchrun) already set RANK, or when nothing says we are one of many.
    """
    if "RANK" in env:
        return {}
    if "OMPI_COMM_WORLD_SIZE" in env:
        found = _from_open_mpi(env)
    elif "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        found = _from_slurm(env)
    else:
        return {}
    if "WORLD_SIZE" in env and env["WORLD_SIZE"] != found["WORLD_SIZE"]:
        raise UserInputError(
            f"distributed launch: WORLD_SIZE={env['WORLD_SIZE']} but the launcher started {found['WORLD_SIZE']} tasks"
        )
    single_host = found["LOCAL_SIZE"] == found["WORLD_SIZE"]
    found["MASTER_ADDR"] = env.get("MASTER_ADDR") or ("127.0.0.1" if single_host else "")
    if not found["MASTER_ADDR"]:
        raise UserInputError(
            "distributed launch: MASTER_ADDR not set for a multi-node run "
            '(export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1))'
        )
    found["MASTER_PORT"] = env.get("MASTER_PORT", DEFAULT_PORT)
    return found


def _from_open_mpi(env: Mapping[str, str]) -> dict[str, str]:
    """mpirun (Open MPI) exports these to every process before it starts."""
    keys = {"RANK": "RANK", "WORLD_SIZE": "SIZE", "LOCAL_RANK": "LOCAL_RANK", "LOCAL_SIZE": "LOCAL_SIZE"}
    return {ours: env.get(f"OMPI_COMM_WORLD_{theirs}", "0") for ours, theirs in keys.items()}


def _from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    """srun exports these to every task of a step."""
    names = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    per_node = next((env[n] for n in names if env.get(n)), "1")
    counts = _expand_tasks_per_node(per_node)
    node = int(env.get("SLURM_NODEID", "0"))
    local_size = counts[node] if node < len(counts) else counts[-1]
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_SIZE": str(local_size),
    }


def _expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed list, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * int(repeat.rstrip(")") or 1)
    return counts


def check_launch_env(env: Mapping[str, str] | None = None) -> None:
    """Fail fast, never hang, when a launcher left the rendezvous half-described."""
    env = dict(os.environ) if env is None else dict(env)
    env.update(launch_env(env))
    present = [v for v in _LAUNCH_VARS if v in env]
    if present and len(present) < len(_LAUNCH_VARS):
        missing = ", ".join(v for v in _LAUNCH_VARS if v not in env)
        raise UserInputError(f"distributed launch: {', '.join(present)} set but {missing} missing")
    if present:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        if not 0 <= rank < world:
            raise UserInputError(f"distributed launch: RANK={rank} is outside WORLD_SIZE={world}")


def other_mpi(env: Mapping[str, str]) -> bool:
    """A multi-process MPI launcher we do not map ourselves (MPICH's or Intel MPI's hydra sets PMI_SIZE)."""
    return int(env.get("PMI_SIZE", "1")) > 1


def free_port() -> int:
    """A TCP port nobody listens on now (a rendezvous port for a run we start ourselves)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank as the launcher told it, before any process group exists (0 when started alone)."""
    env = os.environ if env is None else env
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if name in env:
            return int(env[name])
    return 0


def launch_world_size(env: Mapping[str, str] | None = None) -> int:
    """The number of processes the launcher started, before any process group exists."""
    env = dict(os.environ) if env is None else dict(env)
    env.update(launch_env(env))
    return int(env.get("WORLD_SIZE", "1"))
