"""Checkpoints: DeepSpeed's own save/load, plus the allocator's and the loop's state, committed atomically.

Layout: `<root>/<tag>/` holds DeepSpeed's files (every frozen base weight excluded, tied ones too: they come from
the model source), `dynrank_allocation.json` (the ranks, read before the engine exists so the physical backend can
rebuild the adapters at their saved shapes) and `dynrank_manifest.json` (each file's size, checked on resume).
`<root>/latest` names the newest complete tag. It is written last, atomically, after every rank has finished
writing, so a crash or a full disk during a save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import torch

from ds_dynrank import dist
from ds_dynrank.errors import CheckpointWriteError, UserInputError
from ds_dynrank.rundir import CHECKPOINTS, read_json, write_json, write_text
from ds_dynrank.zero.checkpoint import trainable_state_only

FORMAT_VERSION = 1
LATEST = "latest"
ALLOCATION = "dynrank_allocation.json"
MANIFEST = "dynrank_manifest.json"  # {file: bytes}, written after every rank has written, before `latest`


def _failure_reason(err: BaseException, root: Path) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.0f} MiB free there now"
    except OSError:
        free = "free space unknown"
    return f"{type(err).__name__}: {first} ({free})"


def save(engine, root: Path, tag: str, client_state: dict, meta: dict, keep: int = 0) -> Path:
    """Collective: every rank writes its part, then rank 0 commits `latest`. `meta` (method, ranks, scaling,
    base model, export settings) goes to the sidecar read before any engine exists. A write that fails on any rank
    (a full disk) stops every rank with `CheckpointWriteError` naming the path, before `latest` moves. `keep`: keep
    the newest `keep` committed checkpoints (0: all), deleting older ones only after this one is committed."""
    root = Path(root)
    previous = latest_tag(root)
    failure = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        with trainable_state_only(engine):
            engine.save_checkpoint(
                str(root), tag=tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
            )
    except (OSError, RuntimeError) as err:
        if dist.is_collective_failure(err):
            raise
        failure = err
        dist.barrier()  # the one DeepSpeed's save ends with, which the failed write skipped
    if failure is None:
        try:
            torch.save(rng_state(), root / tag / f"rng_rank{dist.rank()}.pt")  # dropout draws differ per rank
            if dist.is_main():
                write_json(root / tag / ALLOCATION, {"version": FORMAT_VERSION, **meta})
        except (OSError, RuntimeError) as err:
            failure = err
    failed = dist.ranks_where(failure is not None, device=engine.device)
    if failed:
        kept = f"`latest` still names {previous}" if previous else "no earlier checkpoint exists"
        where = f"on rank {dist.rank()}: {_failure_reason(failure, root)}" if failure else f"on rank(s) {failed}"
        raise CheckpointWriteError(f"could not write checkpoint {root / tag} {where}; {kept}", local=bool(failure))
    if dist.is_main():
        write_json(root / tag / MANIFEST, {name: size for name, size in _file_sizes(root / tag).items()})
        write_text(root / LATEST, tag, fsync=True)
        if keep:
            prune(root, keep)
    dist.barrier()
    return root / tag


def _file_sizes(tag_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(tag_dir)): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def committed_tags(root: Path) -> list[str]:
    """The checkpoints this job wrote and committed (`step<N>`, with their manifest), oldest first."""
    tags = [p.name for p in Path(root).glob("step*") if p.name[4:].isdigit() and (p / MANIFEST).is_file()]
    return sorted(tags, key=lambda t: int(t[4:]))


def prune(root: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` committed checkpoints; never the one `latest` names. Returns the deleted."""
    current = latest_tag(root)
    old = [t for t in committed_tags(root)[:-keep] if t != current]
    for tag in old:
        (root / tag / MANIFEST).unlink()  # first: a half-deleted directory is never taken for a checkpoint
        shutil.rmtree(root / tag, ignore_errors=True)
    return old


def verify(root: Path, tag: str) -> None:
    """Every file of the checkpoint is there, at the size it was written, and each torch file reads back with
    its checksums (a truncated or corrupted file is named, before anything trains). Checkpoints from before the
    manifest existed, or converted ones, are checked for readability only."""
    tag_dir = Path(root) / tag
    manifest = tag_dir / MANIFEST
    if manifest.is_file():
        for name, size in read_json(manifest).items():
            path = tag_dir / name
            if not path.is_file():
                raise UserInputError(f"--resume: checkpoint file {path} is missing")
            if path.stat().st_size != size:
                raise UserInputError(
                    f"--resume: checkpoint file {path} is {path.stat().st_size} bytes, {size} were written "
                    "(truncated or overwritten); resume from an earlier checkpoint"
                )
    for path in sorted(tag_dir.rglob("*.pt")):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as err:
            raise UserInputError(f"--resume: checkpoint file {path} cannot be read ({err})") from None
        if bad is not None:
            raise UserInputError(f"--resume: checkpoint file {path} is corrupted (record {bad} fails its checksum)")


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
    verify(root, tag)
    if sorted(ranks) != sorted(modules):
        raise UserInputError(f"--resume: checkpoint {root / tag} adapts other modules than this model and config")
    return ranks


def is_universal(root: Path, tag: str) -> bool:
    return bool(read_meta(root, tag).get("universal"))


def to_universal(source: Path) -> Path:
    """Convert one checkpoint (a tag directory, a checkpoint root or a run directory) to DeepSpeed's universal
    format with DeepSpeed's own converter, next to it as `<tag>_universal`: every parameter's fp32 value and Adam
    moments whole, loadable at any number of processes. Written to a temporary name and renamed into place."""
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
