"""Checkpoints: DeepSpeed's own save/load, plus the allocator's and the loop's state, committed atomically.

Layout: `<root>/<tag>/` holds DeepSpeed's files (frozen base weights excluded: they come from the model source)
and `dynrank_allocation.json` (the ranks, read before the engine exists so the physical backend can rebuild the
adapters at their saved shapes). `<root>/latest` names the newest complete tag. It is written last, atomically,
after every rank has finished writing, so a crash during a save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ds_dynrank import dist
from ds_dynrank.errors import UserInputError
from ds_dynrank.rundir import CHECKPOINTS, write_json

FORMAT_VERSION = 1
LATEST = "latest"
ALLOCATION = "dynrank_allocation.json"


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, root: Path, tag: str, client_state: dict, meta: dict) -> Path:
    """Collective: every rank writes its part, then rank 0 commits `latest`. `meta` (method, ranks, scaling,
    base model, export settings) goes to the sidecar read before any engine exists."""
    root.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(
        str(root), tag=tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
    )
    torch.save(rng_state(), root / tag / f"rng_rank{dist.rank()}.pt")  # dropout draws differ per rank
    if dist.is_main():
        write_json(root / tag / ALLOCATION, {"version": FORMAT_VERSION, **meta})
    dist.barrier()
    if dist.is_main():
        _write_text_atomic(root / LATEST, tag)
    dist.barrier()
    return root / tag


def latest_tag(root: Path) -> str | None:
    """The newest committed checkpoint under `root`, or None before the first."""
    latest = Path(root) / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def rng_state() -> dict:
    from deepspeed.accelerator import get_accelerator

    return {"torch": torch.get_rng_state(), "accelerator": get_accelerator().get_rng_state()}


def restore_rng(root: Path, tag: str) -> None:
    """This rank's RNG as it was at the save, so dropout continues exactly (call right before training goes on)."""
    from deepspeed.accelerator import get_accelerator

    path = root / tag / f"rng_rank{dist.rank()}.pt"
    if path.is_file():
        state = torch.load(path, weights_only=False)
        torch.set_rng_state(state["torch"])
        get_accelerator().set_rng_state(state["accelerator"])


def resolve(resume: str, default_root: Path) -> tuple[Path, str]:
    """(root, tag) for `--resume`: "latest" (in this run's checkpoints), a run's output directory, a checkpoint
    root holding `latest`, or one tag directory. Errors name what was looked for."""
    path = default_root if resume in ("", "latest") else Path(resume).expanduser()
    if (path / CHECKPOINTS / LATEST).is_file():  # a run's output directory
        path = path / CHECKPOINTS
    if (path / LATEST).is_file():
        root, tag = path, (path / LATEST).read_text().strip()
    elif (path / ALLOCATION).is_file():
        root, tag = path.parent, path.name
    else:
        raise UserInputError(f"--resume: no checkpoint in {path} (expected a '{LATEST}' file or {ALLOCATION})")
    if not (root / tag / ALLOCATION).is_file():
        raise UserInputError(f"--resume: checkpoint {root / tag} is incomplete (no {ALLOCATION})")
    return root, tag


def read_meta(root: Path, tag: str) -> dict:
    meta = json.loads((root / tag / ALLOCATION).read_text())
    if meta.get("version") != FORMAT_VERSION:
        raise UserInputError(
            f"checkpoint {root / tag}: format {meta.get('version')}, this version reads {FORMAT_VERSION}"
        )
    return meta


def saved_allocation(root: Path, tag: str, method: str) -> dict[str, int]:
    """The ranks saved with a checkpoint, after checking it is one this version and method can continue."""
    meta = read_meta(root, tag)
    if meta.get("method") != method:
        raise UserInputError(
            f"--resume: checkpoint was trained with method {meta.get('method')!r}, config says {method!r}"
        )
    return meta["ranks"]


def saved_activity(root: Path, tag: str) -> dict[str, bool]:
    """Which modules trained when the checkpoint was written (module allocation; empty before that existed)."""
    return read_meta(root, tag).get("active", {})


def check_world_size(root: Path, tag: str, world_size: int) -> None:
    """DeepSpeed's ZeRO checkpoints reload only at the data-parallel size they were saved with; a universal
    checkpoint (`python -m ds_dynrank reshard`) loads at any. Say which, before training, not in a traceback."""
    meta = read_meta(root, tag)
    saved = meta.get("world_size")
    if meta.get("universal") or saved is None or saved == world_size:
        return
    raise UserInputError(
        f"--resume: checkpoint {root / tag} was saved by {saved} processes and this run has {world_size}; "
        f"DeepSpeed reloads ZeRO optimizer state only at the same data-parallel size. Relaunch with {saved}, or "
        f"convert it once with `python -m ds_dynrank reshard {root / tag}` and resume from the result"
    )


def check_resumable(root: Path, tag: str, *, method: str, modules: list[str], world_size: int) -> dict[str, int]:
    """Can this run continue from that checkpoint (its format, method, adapted modules, number of processes)?
    Every answer but yes is a UserInputError, before any engine exists. Returns the saved ranks."""
    ranks = saved_allocation(root, tag, method)
    check_world_size(root, tag, world_size)
    if sorted(ranks) != sorted(modules):
        raise UserInputError(f"--resume: checkpoint {root / tag} adapts other modules than this model and config")
    return ranks


def is_universal(root: Path, tag: str) -> bool:
    return bool(read_meta(root, tag).get("universal"))


def to_universal(source: Path) -> Path:
    """Convert one checkpoint (a tag directory, a checkpoint root or a run directory) to DeepSpeed's universal
    format with DeepSpeed's own converter, next to it as `<tag>_universal`: every parameter's fp32 value and Adam
    moments whole, loadable at any number of processes. Written to a temporary name and renamed into place."""
    import shutil
    import subprocess
    import sys

    source = Path(source)
    root, tag = resolve(str(source), source)
    meta = read_meta(root, tag)
    if meta.get("universal"):
        raise UserInputError(f"reshard: {root / tag} is already a universal checkpoint")
    out = root / f"{tag}_universal"
    tmp = root / f".{tag}_universal.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(root / tag),
        "--output_folder",
        str(tmp),
        "--inject_missing_state",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserInputError(f"reshard: DeepSpeed's ds_to_universal failed on {root / tag}: {last}")
    write_json(tmp / ALLOCATION, {**meta, "universal": True, "converted_from": tag})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
