"""Resume on a different number of processes: a 2-process checkpoint is converted once with
`python -m ds_dynrank reshard` (DeepSpeed's universal format) and resumed by 1 process. The loaded state is the
saved one exactly (every adapter's fp32 value, the masks and the allocation history), and training goes on."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from helpers import PYTHON, REPO, free_port, subprocess_env

from ds_dynrank.zero import consolidated_state

TRAIN = str(REPO / "launch" / "train.py")


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["zero2_l1ra.json", "zero3_l1ra.json"], ids=["masked-zero2", "physical-zero3"])
def test_two_process_checkpoint_resumes_on_one_process(name, tiny_model_dir, tiny_csv, tmp_path):
    cfg = json.loads((REPO / "ds_configs" / name).read_text())
    cfg["dynrank"]["l1ra"].update(l1_lambda=4.0, gate_lr=0.05)
    cfg["dynrank"]["schedule"].update(interval=2)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    env = subprocess_env()

    def args(out, steps):
        return [TRAIN, "--deepspeed", str(path), "--model", str(tiny_model_dir), "--dataset", str(tiny_csv),
                "--max_steps", str(steps), "--eval_interval", "0", "--eval_samples", "16",
                "--output_dir", str(out)]  # fmt: skip

    two = tmp_path / "two"
    first = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), *args(two, 6)],
                           env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    refused = subprocess.run([PYTHON, *args(tmp_path / "x", 6), "--resume", str(two)], env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert refused.returncode == 2 and "python -m ds_dynrank reshard" in refused.stderr

    converted = subprocess.run([PYTHON, "-m", "ds_dynrank", "reshard", str(two)], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert converted.returncode == 0, converted.stderr[-3000:]
    universal = two / "checkpoints" / "step6_universal"
    assert universal.is_dir() and f"--resume {universal}" in converted.stdout

    # resume at the checkpoint's own step: nothing trains, and the final checkpoint is the loaded state
    one = tmp_path / "one"
    same = subprocess.run([PYTHON, *args(one, 6), "--resume", str(universal)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert same.returncode == 0, same.stderr[-3000:]
    saved, loaded = consolidated_state(two / "checkpoints", "step6"), consolidated_state(one / "checkpoints", "step6")
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    history = json.loads((two / "allocation_history.json").read_text())
    assert strip(json.loads((one / "allocation_history.json").read_text())) == strip(history)

    # and training goes on, one process, events included
    more = subprocess.run([PYTHON, *args(one, 10), "--resume", str(universal)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert more.returncode == 0, more.stderr[-3000:]
    metrics = json.loads((one / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["world_size"] == 1
    longer = json.loads((one / "allocation_history.json").read_text())
    assert [h["step"] for h in longer] == [0, 2, 4, 8]  # (6 was the last step of the 6-step run's schedule)
