"""launch/quality.py, the quality benchmark's one command, on the tiny model: it runs each method (PEFT's AdaLoRA
included) per seed, writes reports, tables (mean ± std, per seed, paired to LoRA, the targets) and a plot; a
second call reuses finished runs, and --summarise_only tabulates without starting any."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import PYTHON, REPO, subprocess_env


@pytest.mark.e2e
def test_quality_benchmark_runs_and_aggregates(tiny_model_dir, tiny_csv, tmp_path):
    out = tmp_path / "quality"
    cmd = [
        PYTHON,
        str(REPO / "launch" / "quality.py"),
        "--out",
        str(out),
        "--tasks",
        str(tiny_csv),
        "--methods",
        "lora,modalloc-uniform,peft-adalora",
        "--launcher",
        "torchrun",
        "--seeds",
        "0",
        "--max_steps",
        "6",
        "--eval_samples",
        "16",
        "--model",
        str(tiny_model_dir),
    ]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = json.loads((out / "quality.json").read_text())["table"][tiny_csv.stem]
    assert set(table) == {"lora", "modalloc-uniform", "peft-adalora"}
    assert all(row["seeds"] == 1 and 0 <= row["mean"] <= 100 for row in table.values())
    shares = table["modalloc-uniform"]["active_share_by_type"]  # which module types module allocation trained
    assert shares and all(0 <= v <= 100 for v in shares.values()) and not table["lora"]["active_share_by_type"]
    assert (out / tiny_csv.stem / "lora" / "seed0" / "report" / "summary.md").is_file()
    text = (out / "quality.md").read_text()
    assert "± " in text and "Targets:" in text and "PEFT AdaLoRA" in text
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table["lora"]["paired_to_lora"] is None and table["peft-adalora"]["paired_to_lora"] == pytest.approx(
        table["peft-adalora"]["mean"] - table["lora"]["mean"]
    )
    again = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "seed 0" not in again.stdout  # every run reused
    summary = [*cmd[: cmd.index("--seeds")], "--seeds", "0,1", *cmd[cmd.index("--seeds") + 2 :], "--summarise_only"]
    tabled = subprocess.run(summary, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert tabled.returncode == 0 and "seed 1" not in tabled.stdout, tabled.stdout[-2000:]  # nothing started
    assert not (out / tiny_csv.stem / "lora" / "seed1").exists()
    table = json.loads((out / "quality.json").read_text())["table"][tiny_csv.stem]
    assert all(row["seeds"] == 1 and list(row["by_seed"]) == ["0"] for row in table.values())
    assert "paired Δ to LoRA" in (out / "quality.md").read_text()


@pytest.mark.e2e
def test_quality_validation_sweep_never_reads_the_test_split(tiny_model_dir, tiny_csv, tmp_path):
    """--validation trains and scores inside the training split; a method's overrides reach its config section."""
    from ds_dynrank.task.classification import EVAL_FRACTION, SPLIT_SEED, load_table, split_table

    out = tmp_path / "sweep"
    cmd = [
        PYTHON,
        str(REPO / "launch" / "quality.py"),
        "--out",
        str(out),
        "--tasks",
        str(tiny_csv),
        "--validation",
        "--methods",
        "l1ra+l1_lambda=0.05+gate_lr=0.2",
        "--launcher",
        "torchrun",
        "--seeds",
        "0",
        "--max_steps",
        "4",
        "--eval_samples",
        "0",
        "--model",
        str(tiny_model_dir),
    ]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    name = f"{tiny_csv.stem}-validation"
    config = json.loads((out / "configs" / "l1ra+l1_lambda=0.05+gate_lr=0.2.json").read_text())["dynrank"]["l1ra"]
    assert config["l1_lambda"] == 0.05 and config["gate_lr"] == 0.2
    train, test = split_table(load_table(str(tiny_csv)), eval_fraction=EVAL_FRACTION, split_seed=SPLIT_SEED)
    carved_table = load_table(str(out / "validation" / f"{name}.csv"))
    carved = carved_table["train"]
    assert sorted(carved["text"]) == sorted(train["text"])  # the training rows, so none of the test rows
    assert len(carved) + len(test) == len(load_table(str(tiny_csv))["train"])
    metrics = json.loads((out / name / "l1ra+l1_lambda=0.05+gate_lr=0.2" / "seed0" / "metrics.json").read_text())
    _, validation = split_table(carved_table, eval_fraction=EVAL_FRACTION, split_seed=SPLIT_SEED)
    assert metrics["eval_examples"] == len(validation)
    assert metrics["eval_examples"] < len(train)
    assert name in json.loads((out / "quality.json").read_text())["table"]


@pytest.mark.e2e
def test_quality_rejects_a_bad_method_override_before_any_run(tmp_path):
    """The command's side: exit 2 naming the field, nothing started (each bad spec: tests/unit)."""
    cmd = [
        PYTHON,
        str(REPO / "launch" / "quality.py"),
        "--out",
        str(tmp_path),
        "--methods",
        "lora,l1ra+l1_lambda=-1",
        "--launcher",
        "torchrun",
        "--seeds",
        "0",
    ]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "l1_lambda" in result.stderr, result.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # the valid lora run did not start either: nothing written
