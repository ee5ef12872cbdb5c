"""Kill -9 a 2-process L1RA run after some re-allocation events, resume it with --resume, and the allocation
history and the loss curve continue exactly as an uninterrupted run's (CPU, fixed seeds): masked backend under
ZeRO-2, and physical backend under ZeRO-3 (adapters rebuilt at their saved ranks before DeepSpeed loads)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import L1RA_STEPS, l1ra_command, subprocess_env


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


@pytest.mark.e2e
@pytest.mark.parametrize("config", ["zero2_l1ra.json", "zero3_l1ra.json"], ids=["masked-zero2", "physical-zero3"])
def test_kill_and_resume_continues_exactly(tiny_model_dir, tiny_csv, tmp_path, config, l1ra_run):
    cfg, whole = l1ra_run(config)  # the uninterrupted run, shared with test_reshard.py
    env = subprocess_env()

    broken = tmp_path / "broken"
    latest = broken / "checkpoints" / "latest"
    proc = subprocess.Popen(
        l1ra_command(cfg, tiny_model_dir, tiny_csv, broken),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while not (latest.is_file() and latest.read_text() in ("step4", "step6")) and time.time() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        assert latest.is_file(), "no checkpoint appeared in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-training
        proc.wait()
    killed_at = latest.read_text()
    assert not (broken / "metrics.json").exists()

    resumed = subprocess.run(
        [*l1ra_command(cfg, tiny_model_dir, tiny_csv, broken), "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert latest.read_text() == f"step{L1RA_STEPS}"
    history = _history(whole)
    assert sum(h["slots_changed"] for h in history) > 0, "ranks must have moved for this test to mean anything"
    assert _history(broken) == history, f"allocation history diverged after resuming from {killed_at}"
    expected, got = _losses(whole), _losses(broken)
    assert sorted(got) == sorted(expected) and len(expected) == L1RA_STEPS
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"loss at sample {step}"
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (whole, broken)]
    assert metrics[0]["value"] == metrics[1]["value"]
    assert [h["step"] for h in metrics[1]["eval_history"]] == [0, 6, L1RA_STEPS]
