"""The HF Trainer integration, 2 processes under ZeRO-3 with the physical backend, on the main job's SFT data (a chat
model, `messages` rows), with Trainer's activation checkpointing on: DynRankTrainer's callback drives L1RA's events
at optimizer steps, each rebuilding the engine Trainer holds; ranks move with the budget held, every rank ends with
the same allocation and bit-identical adapters, and a run resumed from one of Trainer's own checkpoints continues
the allocation history exactly. (ZeRO-2 under the same mixin: tests/e2e/test_trl_trainer.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, l1ra_config, subprocess_env, two_processes

STEPS, SAVE_EVERY = 12, 4


def _command(cfg, model, data, out, *extra: str) -> list[str]:
    return [
        *two_processes(),
        str(REPO / "launch" / "train_hf.py"),
        "--deepspeed",
        str(cfg),
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--max_steps",
        str(STEPS),
        "--save_steps",
        str(SAVE_EVERY),
        "--output_dir",
        str(out),
        "--gradient_checkpointing",  # Trainer's own, non-reentrant: the integration runs with it
        *extra,
    ]


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory, tiny_chat_model_dir, tiny_sft_jsonl):
    """The uninterrupted Trainer run (checkpoints every 4 steps) the tests below read: (config, output dir)."""
    directory = tmp_path_factory.mktemp("hf")
    path = l1ra_config(directory, "hf_zero3_l1ra.json", dropout=0.0, partitioned=True)
    cfg = json.loads(Path(path).read_text())
    assert "optimizer" not in cfg  # Trainer builds it, with L1RA's gate group
    assert cfg["dynrank"]["reshape"]["backend"] == "physical"  # each event rebuilds the engine Trainer holds
    out = directory / "whole"
    result = subprocess.run(
        _command(path, tiny_chat_model_dir, tiny_sft_jsonl, out),
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return path, out


def _events(out) -> list[tuple]:
    history = json.loads((out / "allocation_history.json").read_text())
    return [(h["step"], h["ranks"], h["budget"], h["slots_changed"]) for h in history]


@pytest.mark.e2e
def test_trainer_drives_l1ra_and_ranks_agree(trainer_run):
    _, out = trainer_run
    history = json.loads((out / "allocation_history.json").read_text())
    assert [h["step"] for h in history] == [0, 2, 4, 6, 8, 10]  # optimizer steps, driven by the callback
    assert {h["budget"] for h in history} == {14 * 8}
    assert any(h["ranks"] != history[0]["ranks"] for h in history[1:]), "ranks never moved"
    per_rank = [json.loads((out / f"final_rank{r}.json").read_text()) for r in range(2)]
    assert per_rank[0] == per_rank[1]  # the allocation, and every adapter tensor bit for bit
    assert per_rank[0]["ranks"] == history[-1]["ranks"]
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"  # the exported adapter


@pytest.mark.e2e
def test_trainer_resumes_the_allocation_from_its_own_checkpoint(
    trainer_run, tiny_chat_model_dir, tiny_sft_jsonl, tmp_path
):
    cfg, whole = trainer_run
    assert (whole / "checkpoint-8" / "dynrank_state.pt").is_file()  # written beside Trainer's own files
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoint-8", resumed / "checkpoint-8")  # as if the job had stopped after step 8
    cmd = _command(cfg, tiny_chat_model_dir, tiny_sft_jsonl, resumed, "--resume")
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    assert _events(resumed) == _events(whole)  # steps, ranks, budget and slots moved: the same history
    per_rank = [json.loads((resumed / f"final_rank{r}.json").read_text()) for r in range(2)]
    assert per_rank[0] == per_rank[1] == json.loads((whole / "final_rank0.json").read_text())  # bit-identical
