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
    cmd = [PYTHON, str(REPO / "launch" / "quality.py"), "--out", str(out), "--tasks", str(tiny_csv), "--methods",
           "lora,modalloc-uniform,peft-adalora", "--seeds", "0", "--max_steps", "6", "--eval_samples", "16",
           "--model", str(tiny_model_dir)]  # fmt: skip
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
