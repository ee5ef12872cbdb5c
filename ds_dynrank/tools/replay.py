"""A finished run's move sizes as the random control's `random.moves`: a dynamic method's events replayed with
random decisions (issue #23: the same schedule and move sizes, so only the scores differ)."""

from __future__ import annotations

from pathlib import Path

from ds_dynrank.errors import UserInputError
from ds_dynrank.rundir import RunDir, read_json


def moves_from_history(history: list[dict]) -> list[int]:
    """One count per event after the start record: the slots it pruned, half its `slots_changed` (pruned plus
    grown; under a parameter budget the two can differ by a slot or so, and the half is rounded up)."""
    return [(int(entry["slots_changed"]) + 1) // 2 for entry in history[1:]]


def replay_moves(run_dir: str | Path) -> list[int]:
    """The move sizes of the run in `run_dir` (its allocation_history.json), refused with the file named when it
    holds no event."""
    path = RunDir(Path(run_dir)).history
    if not path.is_file():
        raise UserInputError(f"{path}: no allocation history (expected a finished dynamic run's output directory)")
    history = read_json(path)
    if not isinstance(history, list) or len(history) < 2 or not all("slots_changed" in e for e in history):
        raise UserInputError(f"{path}: expected the start record and at least one event, each with slots_changed")
    return moves_from_history(history)
