"""The real entry points with the shipped configs: the deepspeed launcher (2 processes) and torchrun (preempted on
one rank, then resumed) each train and write TensorBoard events, metrics.json and allocation.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, REPO, free_port, subprocess_env

TRAIN = str(REPO / "launch" / "train.py")


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}"
    return result


def _job_args(config: str, model: Path, data: Path, out: Path) -> list[str]:
    return [
        "--deepspeed",
        str(REPO / "ds_configs" / config),
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--task",
        "classification",
        "--max_steps",
        "6",
        "--eval_interval",
        "3",
        "--eval_samples",
        "16",
        "--output_dir",
        str(out),
    ]


def _tensorboard_tags(out: Path, starts: int = 1) -> dict[str, list[tuple[int, float]]]:
    """The run's scalars, from one event file per process start of rank 0 (only rank 0 writes), in one folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(out.rglob("events.out.tfevents.*"))
    assert len(files) == starts and len({f.parent for f in files}) == 1, f"expected {starts} event file(s): {files}"
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _check_export_from_checkpoint(out: Path) -> None:
    """`python -m ds_dynrank export` from the run's final checkpoint (no model, no engine) reproduces the adapter
    the run exported itself, tensor for tensor."""
    from safetensors.torch import load_file

    again = out / "exported_again"
    result = subprocess.run(
        [PYTHON, "-m", "ds_dynrank", "export", str(out), str(again)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (json.loads((d / "adapter_config.json").read_text()) for d in (out / "adapter", again))
    for config in (first, second):  # PEFT keeps target_modules as a set: its order in the file is arbitrary
        config["target_modules"] = sorted(config["target_modules"])
    assert first == second
    mine, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (out / "adapter", again))
    assert mine.keys() == theirs.keys() and len(mine) == 28
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


def _check_outputs(out: Path, world: int, stage: int, starts: int = 1) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "accuracy" and 0.0 <= metrics["value"] <= 1.0
    assert metrics["steps"] == 6 and metrics["world_size"] == world and metrics["zero_stage"] == stage
    assert metrics["samples"] == 6 * 4 * world  # optimizer steps x micro-batch x data-parallel ranks
    # r x (in + out) per module of the tiny Llama (hidden 32, 2 of 4 heads for k/v, MLP 64), 2 layers
    per_layer = {
        "q": 32 + 32,
        "k": 32 + 16,
        "v": 32 + 16,
        "o": 32 + 32,
        "gate": 32 + 64,
        "up": 32 + 64,
        "down": 64 + 32,
    }
    assert metrics["trainable_parameters"] == 2 * 8 * sum(per_layer.values())
    assert [h["step"] for h in metrics["eval_history"]] == [0, 3, 6]
    allocation = json.loads((out / "allocation.json").read_text())
    assert len(allocation) == 14 and set(allocation.values()) == {8}
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())  # the stock PEFT export
    assert adapter["peft_type"] == "LORA" and adapter["rank_pattern"] == allocation
    _check_export_from_checkpoint(out)
    tags = _tensorboard_tags(out, starts)
    for tag in (
        "Train/Samples/train_loss",
        "Train/Samples/lr",
        "Train/Samples/samples_per_sec",
        "Eval/accuracy",
        "Eval/eval_loss",
        "DynRank/budget/rank_total",
    ):
        assert tag in tags, f"missing TensorBoard tag {tag}; have {sorted(tags)}"
    assert len(tags["Train/Samples/train_loss"]) == 6
    assert all(f"DynRank/rank/{name}" in tags for name in allocation)
    assert tags["DynRank/budget/rank_total"][-1][1] == 14 * 8
    return allocation


@pytest.mark.e2e
def test_deepspeed_launcher_two_processes_zero2(tiny_model_dir, tiny_csv, tmp_path):
    out = tmp_path / "run"
    result = _run(["deepspeed", "--num_gpus", "2", TRAIN, *_job_args("zero2.json", tiny_model_dir, tiny_csv, out)])
    _check_outputs(out, world=2, stage=2)
    assert "accuracy" in result.stdout and "outputs in" in result.stdout


@pytest.mark.e2e
def test_torchrun_zero3_preempted_on_one_rank_resumes(tiny_model_dir, tiny_csv, tmp_path):
    """torchrun under ZeRO-3, with SLURM's warning signal (SIGUSR1) reaching rank 1 alone at step 3: both ranks stop
    there with a checkpoint and exit 75 (torchrun then reports a failed child), and `--resume` finishes the run."""
    from test_resume import held_run

    torchrun = ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    job = [*torchrun, TRAIN, *_job_args("zero3.json", tiny_model_dir, tiny_csv, tmp_path / "z3")]
    proc = held_run(job, "step:3", tmp_path / "held", subprocess_env())
    os.kill(int((tmp_path / "held.rank1").read_text()), signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "exitcode  : 75" in err, err[-3000:]  # torchrun ends the other on the first exit
    assert "stopped: a stop signal reached rank(s) [1]; checkpoint" in err, err[-3000:]
    assert (tmp_path / "z3" / "checkpoints" / "latest").read_text() == "step3"
    _run([*torchrun, TRAIN, *_job_args("zero3.json", tiny_model_dir, tiny_csv, tmp_path / "z3"), "--resume"])
    _check_outputs(tmp_path / "z3", world=2, stage=3, starts=2)
