"""Failures mid-run, with the real entry point and 2 processes: a NaN loss stops every rank before the step is
applied and leaves the last good checkpoint loadable; a process killed with SIGKILL makes the survivor exit within
the configured timeout with a message, never hang."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from helpers import L1RA_STEPS, PYTHON, REPO, free_port, subprocess_env, two_processes

TRAIN = str(REPO / "launch" / "train.py")


def poisoned_copy(model_dir, tmp_path):
    """The same model with NaN in one base weight: every forward from then on gives a NaN loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    out = tmp_path / "poisoned"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.mark.e2e
def test_nan_loss_stops_before_the_step_and_keeps_the_last_good_checkpoint(
    tiny_model_dir, tiny_csv, tmp_path, l1ra_run
):
    """From a copy of the shared uninterrupted L1RA run (12 steps, its last checkpoint at 12): resumed on a poisoned
    copy of the model, step 13's loss is NaN on both ranks, nothing is applied or written; resumed on the good
    model, the same checkpoint loads and training goes on."""
    cfg, whole = l1ra_run("zero2_l1ra.json")
    out, env, more = tmp_path / "run", subprocess_env(), str(L1RA_STEPS + 2)
    shutil.copytree(whole, out)

    def run(model):
        cmd = [
            *two_processes(),
            TRAIN,
            "--deepspeed",
            cfg,
            "--model",
            str(model),
            "--dataset",
            str(tiny_csv),
            "--task",
            "classification",
            "--max_steps",
            more,
            "--eval_interval",
            "0",
            "--eval_samples",
            "16",
            "--save_interval",
            "2",
            "--output_dir",
            str(out),
            "--resume",
        ]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    latest = (out / "checkpoints" / "latest").read_text()
    assert latest == f"step{L1RA_STEPS}"
    files = sorted(p.name for p in (out / "checkpoints" / latest).iterdir())
    bad = run(poisoned_copy(tiny_model_dir, tmp_path))
    assert bad.returncode != 0
    assert f"loss is not finite (NaN or Inf) on rank(s) [0, 1] at optimizer step {L1RA_STEPS + 1}" in bad.stderr
    assert f"Last good checkpoint: {out / 'checkpoints'}/{latest}" in bad.stderr
    assert (out / "checkpoints" / "latest").read_text() == latest  # nothing written over
    assert sorted(p.name for p in (out / "checkpoints" / latest).iterdir()) == files
    good = run(tiny_model_dir)  # the last good checkpoint still loads and training goes on
    assert good.returncode == 0, good.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["steps"] == L1RA_STEPS + 2


@pytest.mark.e2e
def test_a_killed_process_does_not_hang_the_other(tiny_model_dir, tiny_csv, tmp_path):
    """Two ranks started directly (no launcher to clean up after them); rank 1 is killed with SIGKILL mid-run and
    rank 0 must exit with an error within the --dist_timeout it was given (plus start-up slack)."""
    port, timeout_s = free_port(), 20
    args = [
        PYTHON,
        TRAIN,
        "--deepspeed",
        str(REPO / "ds_configs" / "zero2_l1ra.json"),
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(tiny_csv),
        "--task",
        "classification",
        "--max_steps",
        "400",
        "--eval_interval",
        "0",
        "--eval_samples",
        "16",
        "--output_dir",
        str(tmp_path / "run"),
        "--dist_timeout",
        str(timeout_s),
    ]
    procs = []
    for rank in (0, 1):
        env = subprocess_env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.time() + 240
    while "train:" not in (tmp_path / "rank0.log").read_text() and time.time() < deadline:
        time.sleep(1)  # wait until training steps run
    assert procs[0][0].poll() is None and procs[1][0].poll() is None, (tmp_path / "rank0.log").read_text()[-3000:]
    time.sleep(3)
    os.kill(procs[1][0].pid, signal.SIGKILL)
    killed_at = time.time()
    try:
        code = procs[0][0].wait(timeout=timeout_s + 60)
    except subprocess.TimeoutExpired:
        procs[0][0].kill()
        pytest.fail("rank 0 hung after its peer died")
    finally:
        for proc, log in procs:
            proc.wait()
            log.close()
    waited = time.time() - killed_at
    assert code != 0
    text = (tmp_path / "rank0.log").read_text()
    assert "error:" in text and "peer" in text.lower(), text[-3000:]
    assert waited < timeout_s + 60
