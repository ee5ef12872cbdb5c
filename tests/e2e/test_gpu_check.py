"""The GPU check's smoke mode: the same path as on the H200 (every variant against LoRA, event cost, shipped-run
ratio, memory, MFU against a measured matmul rate, the JSON report), on the CPU with a tiny Qwen2-shaped config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import PYTHON, REPO, subprocess_env


@pytest.mark.e2e
def test_gpu_check_smoke_measures_every_variant_against_lora(tmp_path):
    result = subprocess.run(
        [PYTHON, str(REPO / "launch" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    sys.path.insert(0, str(REPO / "launch"))
    from bench import variants

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"]["matmul_flops"] > 0 and set(report["targets"]) >= {"lora_mfu", "dynamic_tokens_ratio"}
    results = report["shapes"]["tiny"]["results"]
    assert [r["variant"] for r in results] == list(variants())
    lora, dynamic = results[0], results[1:]
    assert lora["tokens_per_second_ratio"] == 1.0 and lora["events"] == lora["shipped_events"] == 0
    for r in results:
        assert r["tokens_per_second"] > 0 and 0 < r["mfu"] < 1 and r["base_parameters"] > r["trainable_parameters"]
    for r in dynamic:
        assert r["events"] >= 1 and r["event_ms"] > 0 and r["event_cost_steps"] > 0, r
        assert r["shipped_events"] >= 1 and r["shipped_run_tokens_ratio"] > 0, r
    assert "tokens/s" in result.stdout and "written to" in result.stdout
