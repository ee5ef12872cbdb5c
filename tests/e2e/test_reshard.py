"""Resume on a different number of processes: a 2-process checkpoint is converted once with
`python -m ds_dynrank reshard` (DeepSpeed's universal format) and resumed by 1 process. The loaded state is the
saved one exactly (every adapter's fp32 value, the masks and the allocation history), and training goes on."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from helpers import L1RA_STEPS, PYTHON, REPO, subprocess_env

from ds_dynrank.zero.checkpoint import consolidated_state

TRAIN = str(REPO / "launch" / "train.py")


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["zero2_l1ra.json", "zero3_l1ra.json"], ids=["masked-zero2", "physical-zero3"])
def test_two_process_checkpoint_resumes_on_one_process(name, tiny_model_dir, tiny_csv, tmp_path, l1ra_run):
    cfg, two = l1ra_run(name)  # 2 processes, 12 steps, events every 2: shared with test_resume.py
    env, last = subprocess_env(), f"step{L1RA_STEPS}"

    def args(out, steps):
        return [
            TRAIN,
            "--deepspeed",
            cfg,
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(tiny_csv),
            "--task",
            "classification",
            "--max_steps",
            str(steps),
            "--eval_interval",
            "0",
            "--eval_samples",
            "16",
            "--output_dir",
            str(out),
        ]

    if name == "zero2_l1ra.json":  # the refusal does not depend on the backend: once is enough
        refused = subprocess.run(
            [PYTHON, *args(tmp_path / "x", L1RA_STEPS), "--resume", str(two)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert refused.returncode == 2 and "python -m ds_dynrank reshard" in refused.stderr

    converted = subprocess.run(
        [PYTHON, "-m", "ds_dynrank", "reshard", str(two)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert converted.returncode == 0, converted.stderr[-3000:]
    universal = two / "checkpoints" / f"{last}_universal"
    assert universal.is_dir() and f"--resume {universal}" in converted.stdout

    # resume at the checkpoint's own step: nothing trains, and the final checkpoint is the loaded state
    one = tmp_path / "one"
    same = subprocess.run(
        [PYTHON, *args(one, L1RA_STEPS), "--resume", str(universal)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert same.returncode == 0, same.stderr[-3000:]
    saved, loaded = consolidated_state(two / "checkpoints", last), consolidated_state(one / "checkpoints", last)
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    history = json.loads((two / "allocation_history.json").read_text())
    assert strip(json.loads((one / "allocation_history.json").read_text())) == strip(history)

    # and training goes on, one process, events included
    more = subprocess.run(
        [PYTHON, *args(one, L1RA_STEPS + 4), "--resume", str(universal)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert more.returncode == 0, more.stderr[-3000:]
    metrics = json.loads((one / "metrics.json").read_text())
    assert metrics["steps"] == L1RA_STEPS + 4 and metrics["world_size"] == 1
    longer = json.loads((one / "allocation_history.json").read_text())
    # the run's events, then the one at step 14 (12, the 12-step run's last step, was past its schedule)
    assert [h["step"] for h in longer] == [h["step"] for h in history] + [L1RA_STEPS + 2]
