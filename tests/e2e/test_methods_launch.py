"""The shipped module-allocation configs end to end through `launch/train.py` with 2 processes (schedules
shortened for a 10-step run): the active set moves with k held, the output files and TensorBoard say so, and both
ranks end with the same allocation (ALoRA's and the AdaLoRA-style scorer's shipped configs run in
test_sft_launch.py, on SFT batches). A physical module-allocation run under
ZeRO-3 resumes from a mid-run checkpoint with its inactive adapters rebuilt as buffers and continues exactly."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, free_port, subprocess_env, two_processes
from test_launch import _tensorboard_tags

TRAIN = str(REPO / "launch" / "train.py")
N_MODULES = 14  # the tiny Llama: 2 layers x 7 linear modules


def shortened(name: str) -> dict:
    cfg = json.loads((REPO / "ds_configs" / name).read_text())
    section = cfg["dynrank"]
    if section["method"] == "alora":
        section["schedule"].update(start=3, interval=3)
        section["alora"].update(rounds=3, val_samples=4)
    elif section["method"] == "modalloc":
        section["schedule"].update(interval=2)
    elif section["method"] == "adalora":
        section["adalora"].update(tinit=2, tfinal=2, delta_t=2)
    return cfg


def launch(cfg: dict, tmp_path, tiny_model_dir, tiny_csv, *extra: str, out_name: str = "run", steps: int = 10):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / out_name
    port = free_port()
    cmd = [
        *two_processes(port),
        TRAIN,
        "--deepspeed",
        str(path),
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
        *extra,
    ]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    checksums = set(re.findall(r"allocation checksum (\w+) \(rank \d\)", result.stdout))
    assert len(checksums) == 1, result.stdout[-2000:]  # both ranks printed, and they agree
    # DeepSpeed's CPU all-reduce buffers (67 MB a rank) are not left behind in /dev/shm (dist._unlink_shm_buffer)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return out, result


@pytest.mark.e2e
def test_modalloc_config_runs_end_to_end(tiny_model_dir, tiny_csv, tmp_path):
    out, result = launch(shortened("zero2_modalloc.json"), tmp_path, tiny_model_dir, tiny_csv)
    history = json.loads((out / "allocation_history.json").read_text())
    assert [h["step"] for h in history] == [0, 2, 4, 6, 8]
    k = round(2 * N_MODULES / 3)
    assert all(sum(h["active"].values()) == k for h in history)
    assert len({tuple(h["active"].values()) for h in history}) > 1, "the active set never changed"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_parameters_active"] < metrics["trainable_parameters"]
    tags = _tensorboard_tags(out)
    assert [v for _, v in tags["DynRank/active_modules"]] == [float(k)] * 5
    assert "modules active" in result.stdout + result.stderr


@pytest.mark.e2e
def test_physical_modalloc_under_zero3_resumes_exactly(tiny_model_dir, tiny_csv, tmp_path):
    cfg = shortened("zero3_modalloc.json")
    assert cfg["dynrank"]["reshape"]["backend"] == "physical"
    full, _ = launch(cfg, tmp_path, tiny_model_dir, tiny_csv, "--save_interval", "5", out_name="full")
    history = json.loads((full / "allocation_history.json").read_text())
    assert len({tuple(h["active"].values()) for h in history}) > 1
    metrics = json.loads((full / "metrics.json").read_text())
    # inactive adapters are buffers: the parameters DeepSpeed trains are the active modules' only
    assert metrics["trainable_parameters"] == metrics["trainable_parameters_active"]
    meta = json.loads((full / "checkpoints" / "step5" / "dynrank_allocation.json").read_text())
    assert sum(meta["active"].values()) == round(2 * N_MODULES / 3)
    resumed, _ = launch(
        cfg, tmp_path, tiny_model_dir, tiny_csv, "--resume", str(full / "checkpoints" / "step5"), out_name="full"
    )

    def timeless(entries: list[dict]) -> list[dict]:
        return [{k: v for k, v in e.items() if k != "seconds"} for e in entries]

    assert timeless(json.loads((resumed / "allocation_history.json").read_text())) == timeless(history)
    again = json.loads((resumed / "metrics.json").read_text())
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-6)
