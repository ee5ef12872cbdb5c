"""The outside peer, PEFT's own AdaLoRA, through launch/train_peft_adalora.py with 2 processes under ZeRO-0: its
update_and_allocate runs every step, its budget reaches target_r per module, and the run writes the same
metrics as the main job. Other ZeRO stages are refused (PEFT's masks would be undone by the fp32 masters)."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import PYTHON, REPO, subprocess_env, two_processes

SCRIPT = str(REPO / "launch" / "train_peft_adalora.py")


@pytest.mark.e2e
def test_peft_adalora_reaches_its_target_budget(tiny_chat_model_dir, tiny_sft_jsonl, tmp_path):
    """On the main job's SFT data (the same flags and data path as launch/train.py)."""
    cfg = json.loads((REPO / "ds_configs" / "zero0_peft_adalora.json").read_text())
    cfg["peft_adalora"].update(init_r=6, target_r=3, tinit=2, tfinal=3, deltaT=1)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    cmd = [
        *two_processes(),
        SCRIPT,
        "--deepspeed",
        str(path),
        "--model",
        str(tiny_chat_model_dir),
        "--dataset",
        str(tiny_sft_jsonl),
        "--max_steps",
        "10",
        "--eval_interval",
        "0",
        "--eval_samples",
        "16",
        "--output_dir",
        str(out),
        "--gradient_checkpointing",  # the shared flag: the peer honours it too (PEFT's adapters in checkpointed layers)
    ]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    ranks = json.loads((out / "allocation.json").read_text())
    assert metrics["method"] == "peft-adalora" and metrics["steps"] == 10 and metrics["task"] == "sft"
    assert len(ranks) == 14 and all(name.startswith("model.layers.") and name.endswith("_proj") for name in ranks)
    assert metrics["final_budget"] == sum(ranks.values()) == 14 * 3
    assert len(set(ranks.values())) > 1  # PEFT moved rank between modules


@pytest.mark.e2e
def test_peft_adalora_refuses_zero_stages_where_its_masks_do_not_hold(tiny_model_dir, tiny_csv, tmp_path):
    cfg = json.loads((REPO / "ds_configs" / "zero0_peft_adalora.json").read_text())
    cfg["zero_optimization"]["stage"] = 2
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    cmd = [
        PYTHON,
        SCRIPT,
        "--deepspeed",
        str(path),
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(tiny_csv),
        "--task",
        "classification",
    ]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "zero_optimization.stage: PEFT's AdaLoRA masks only hold under ZeRO-0, got 2" in result.stderr
