"""The HF Trainer integration, 2 processes under ZeRO-2: DynRankTrainer's callback drives L1RA's events at
optimizer steps, ranks move with the budget held, and every rank ends with the same allocation."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import PYTHON, REPO, subprocess_env


@pytest.mark.e2e
def test_trainer_drives_l1ra_and_ranks_agree(tiny_model_dir, tiny_csv, tmp_path):
    cfg = json.loads((REPO / "ds_configs" / "hf_zero2_l1ra.json").read_text())
    assert "optimizer" not in cfg  # Trainer builds it, with L1RA's gate group
    cfg["dynrank"]["l1ra"].update(l1_lambda=4.0, gate_lr=0.05)
    cfg["dynrank"]["schedule"].update(interval=2)
    path = tmp_path / "hf.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    cmd = [
        "deepspeed",
        "--num_gpus",
        "2",
        str(REPO / "launch" / "train_hf.py"),
        "--deepspeed",
        str(path),
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(tiny_csv),
        "--max_steps",
        "12",
        "--output_dir",
        str(out),
    ]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    history = json.loads((out / "allocation_history.json").read_text())
    assert [h["step"] for h in history] == [0, 2, 4, 6, 8, 10]  # optimizer steps, driven by the callback
    assert {h["budget"] for h in history} == {14 * 8}
    assert any(h["ranks"] != history[0]["ranks"] for h in history[1:]), "ranks never moved"
    per_rank = [json.loads((out / f"allocation_rank{r}.json").read_text()) for r in range(2)]
    assert per_rank[0] == per_rank[1] == history[-1]["ranks"]


@pytest.mark.e2e
def test_trainer_config_with_an_optimizer_is_refused(tiny_model_dir, tiny_csv, tmp_path):
    cmd = [
        PYTHON,
        str(REPO / "launch" / "train_hf.py"),
        "--deepspeed",
        str(REPO / "ds_configs" / "zero2_l1ra.json"),
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(tiny_csv),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 2
    assert "leave 'optimizer' out of the DeepSpeed config" in result.stderr
