"""A stopped 2-process L1RA run continues exactly as an uninterrupted one (CPU, fixed seeds): the allocation
history, every step's loss and the final metric are the uninterrupted run's.

- Preemption (masked backend, ZeRO-2): SIGTERM to the whole process group, launcher included, as SLURM sends it to
  every process of a step; the launcher passes a second SIGTERM on to its processes. Both ranks stop at the same
  optimizer step, commit a checkpoint of it and exit 75; `--resume` continues from there.
- Kill -9 in the middle of a re-allocation (masked backend, ZeRO-2: masters and moments edited in place; physical
  backend, ZeRO-3: the engine rebuilt; the event not yet recorded); `--resume` continues from the checkpoint before
  it.

The kill point is deterministic: the run holds there (DS_DYNRANK_HOLD, ds_dynrank/holds.py) until it is signalled,
and the test signals only once every rank is held."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import L1RA_STEPS, deepspeed_launcher, l1ra_command, subprocess_env


def _losses(out: Path) -> dict[int, float]:
    """Train loss per sample count over every event file of the run (a resumed process writes its own)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    losses = {}
    for path in sorted(out.rglob("events.out.tfevents.*"), key=os.path.getmtime):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "Train/Samples/train_loss":  # scalars may come migrated to tensor form
                    scalar = value.simple_value if value.HasField("simple_value") else None
                    losses[event.step] = scalar if scalar is not None else tensor_util.make_ndarray(value.tensor).item()
    return losses


def _history(out: Path) -> list[dict]:
    return [
        {k: v for k, v in h.items() if k != "seconds"}
        for h in json.loads((out / "allocation_history.json").read_text())
    ]


def held_run(cmd: list[str], hold: str, marker: Path, env: dict, ranks: int = 2) -> subprocess.Popen:
    """Start `cmd` in its own process group, holding at `hold`; return once every rank is held there."""
    proc = subprocess.Popen(
        cmd,
        env={**env, "DS_DYNRANK_HOLD": hold, "DS_DYNRANK_HOLD_FILE": str(marker)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not all(Path(f"{marker}.rank{r}").is_file() for r in range(ranks)):
        if proc.poll() is not None or time.time() > deadline:
            err = kill_all(proc, marker, ranks)
            pytest.fail(f"the run never held at {hold} (exit {proc.returncode})\n{err[-4000:]}")
        time.sleep(0.1)
    return proc


def kill_all(proc: subprocess.Popen, marker: Path, ranks: int = 2) -> str:
    """SIGKILL to the held ranks (by the PIDs they wrote: torchrun starts them in a process group of their own)
    and to the launcher's group; returns the launcher's stderr."""
    for r in range(ranks):
        held = Path(f"{marker}.rank{r}")
        if held.is_file():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(held.read_text()), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate(timeout=60)[1]


def assert_continues_exactly(whole: Path, broken: Path) -> None:
    history = _history(whole)
    assert sum(h["slots_changed"] for h in history) > 0, "ranks must have moved for this test to mean anything"
    assert _history(broken) == history, "allocation history diverged after resuming"
    expected, got = _losses(whole), _losses(broken)
    assert sorted(got) == sorted(expected) and len(expected) == L1RA_STEPS
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"loss at sample {step}"
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (whole, broken)]
    assert metrics[0]["value"] == metrics[1]["value"]
    assert [h["step"] for h in metrics[1]["eval_history"]] == [0, 6, L1RA_STEPS]


def resume(cfg, tiny_model_dir, tiny_csv, out: Path, env: dict) -> None:
    resumed = subprocess.run(
        [*l1ra_command(cfg, tiny_model_dir, tiny_csv, out), "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert (out / "checkpoints" / "latest").read_text() == f"step{L1RA_STEPS}"


@pytest.mark.e2e
def test_sigterm_to_the_whole_job_checkpoints_that_step_and_resumes_exactly(
    tiny_model_dir, tiny_csv, tmp_path, l1ra_run
):
    cfg, whole = l1ra_run("zero2_l1ra.json")  # the uninterrupted run, shared with test_reshard.py
    env, broken = subprocess_env(), tmp_path / "broken"
    # step 5: no --save_interval checkpoint there (every 2), so the one found is the stop's own
    job = l1ra_command(cfg, tiny_model_dir, tiny_csv, broken, launcher=deepspeed_launcher())
    proc = held_run(job, "step:5", tmp_path / "held", env)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0  # the launcher reports its own code; srun and plain python report 75
    assert "stopped: a stop signal reached rank(s) [0, 1] (SIGTERM here)" in err, err[-3000:]
    assert (broken / "checkpoints" / "latest").read_text() == "step5"
    assert not (broken / "metrics.json").exists()
    resume(cfg, tiny_model_dir, tiny_csv, broken, env)
    assert_continues_exactly(whole, broken)


@pytest.mark.e2e
@pytest.mark.parametrize("config", ["zero2_l1ra.json", "zero3_l1ra.json"], ids=["masked-zero2", "physical-zero3"])
def test_kill_during_an_event_resumes_exactly(config, tiny_model_dir, tiny_csv, tmp_path, l1ra_run):
    """Masked: the masters and moments edited in place; physical: the engine rebuilt. Both before the event is
    recorded; the uninterrupted runs are the ones the SIGTERM and reshard tests share."""
    cfg, whole = l1ra_run(config)
    env, broken = subprocess_env(), tmp_path / "broken"
    proc = held_run(l1ra_command(cfg, tiny_model_dir, tiny_csv, broken), "event:6", tmp_path / "held", env)
    kill_all(proc, tmp_path / "held")  # the event applied, not yet recorded
    assert (broken / "checkpoints" / "latest").read_text() == "step4"
    assert [h["step"] for h in _history(broken)] == [0, 2, 4]
    resume(cfg, tiny_model_dir, tiny_csv, broken, env)
    assert_continues_exactly(whole, broken)
