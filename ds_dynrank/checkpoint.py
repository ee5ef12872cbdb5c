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

from ds_dynrank import dist, outputs
from ds_dynrank.errors import UserInputError

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
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)  # fmt: skip
    torch.save(rng_state(), root / tag / f"rng_rank{dist.rank()}.pt")  # dropout draws differ per rank
    if dist.is_main():
        outputs.write_json(root / tag / ALLOCATION, {"version": FORMAT_VERSION, **meta})
    dist.barrier()
    if dist.is_main():
        _write_text_atomic(root / LATEST, tag)
    dist.barrier()
    return root / tag


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
    """(root, tag) for `--resume`: "latest" (in this run's checkpoints), a checkpoint root holding `latest`, or
    one tag directory. Errors name what was looked for."""
    path = default_root if resume in ("", "latest") else Path(resume).expanduser()
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
    """DeepSpeed's ZeRO checkpoints reload only at the data-parallel size they were saved with (its universal
    checkpoint format, which reshards, is not wired in yet): say so before training, not in a traceback."""
    saved = read_meta(root, tag).get("world_size")
    if saved is not None and saved != world_size:
        raise UserInputError(
            f"--resume: checkpoint {root / tag} was saved by {saved} processes and this run has {world_size}; "
            f"DeepSpeed reloads ZeRO optimizer state only at the same data-parallel size: relaunch with {saved}"
        )
