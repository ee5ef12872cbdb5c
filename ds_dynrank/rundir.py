"""The run directory: every file a run leaves there, by name, with its writer and its reader. Nothing else in the
project spells these names. Writes are atomic (temp file + rename): readers see the old content or the new, and
files get the modes the user's umask gives.

    metrics.json             the run's results (written by the job at the end)
    predictions.jsonl        SFT with exact match: each held-out question's greedy answer at the final evaluation
    allocation.json          {module: live rank}, the latest allocation
    allocation_history.json  the initial allocation, then one entry per re-allocation event
    adapter/                 the trained adapters as a stock PEFT LoRA directory
    checkpoints/             DeepSpeed checkpoints and `latest`
    tensorboard/             TensorBoard events (DeepSpeed's monitor, job name "tensorboard")
    report/                  `python -m ds_dynrank report`'s figures and summary
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

METRICS = "metrics.json"
PREDICTIONS = "predictions.jsonl"
ALLOCATION = "allocation.json"
HISTORY = "allocation_history.json"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
REPORT = "report"


def umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give `path` (and, for a directory, everything in it) the modes a plain open() or mkdir() would have:
    `tempfile` creates 0600 files and 0700 directories, which the rest of a team cannot read on a shared disk."""
    mask = umask()
    path = Path(path)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def temp_sibling(target: Path, directory: bool = False) -> Path:
    """A temporary name next to `target` on the same filesystem, for writing there and renaming into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    return Path(tmp)


def write_text(path: Path, text: str, fsync: bool = False) -> None:
    """Never a half-written file: readers see the old content or the new, nothing in between."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Atomic, as `write_text`."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class RunDir:
    """One run's output directory and the path of each file in it. Callers decide which rank writes (rank 0, on a
    shared filesystem)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.metrics, self.allocation, self.history = (self.path / n for n in (METRICS, ALLOCATION, HISTORY))
        self.predictions = self.path / PREDICTIONS
        self.adapter, self.checkpoints = self.path / ADAPTER, self.path / CHECKPOINTS
        self.tensorboard, self.report = self.path / TENSORBOARD, self.path / REPORT

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.metrics, metrics)

    def write_predictions(self, answers: list[dict]) -> None:
        """One JSON object per line, in example order (`sft_eval.greedy_answers`' records)."""
        write_text(self.predictions, "".join(json.dumps(a) + "\n" for a in answers))

    def write_allocation(self, history: list[dict]) -> None:
        """The whole history and, beside it, its latest ranks."""
        write_json(self.history, history)
        write_json(self.allocation, history[-1]["ranks"])

    def write_ranks(self, ranks: dict[str, int]) -> None:
        """The final allocation alone (runs that keep no history, such as PEFT's AdaLoRA)."""
        write_json(self.allocation, ranks)

    def read_metrics(self) -> dict | None:
        """metrics.json if the run got that far (it is written at the end); None otherwise."""
        return read_json(self.metrics) if self.metrics.is_file() else None

    def read_allocation(self) -> dict[str, int] | None:
        return read_json(self.allocation) if self.allocation.is_file() else None

    def read_history(self) -> list[dict] | None:
        return read_json(self.history) if self.history.is_file() else None
