"""`launch/bench.py` covers LoRA and every method on both backends in one process group: it runs, prints ratios
against LoRA measured in the same run, and its JSON says what each variant did (nothing about speed is asserted)."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import REPO, subprocess_env, two_processes


@pytest.mark.e2e
def test_cost_benchmark_runs_every_variant(tiny_model_dir, tiny_csv, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        *two_processes(),
        str(REPO / "launch" / "bench.py"),
        "--deepspeed",
        str(REPO / "ds_configs" / "zero2.json"),
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(tiny_csv),
        "--steps",
        "6",
        "--warmup",
        "1",
        "--interval",
        "3",
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    methods = ("l1ra", "alora", "modalloc", "adalora", "gora", "random", "gora_l1ra")
    assert set(results) == {"lora", *(f"{m}-{b}" for m in methods for b in ("masked", "physical"))}
    assert results["lora"]["step_time_ratio"] == 1.0 and results["lora"]["events"] == 0
    for name, r in results.items():
        assert r["seconds_per_step"] > 0 and r["step_time_ratio"] > 0, name
        assert r["tokens_per_second"] > 0 and r["tokens_per_second_ratio"] > 0, name
        assert 0 < r["rss_before"] <= r["peak_rss"] and r["rss_after"] <= r["peak_rss"], name
        if name != "lora":
            assert r["events"] >= 1, name
            assert r["event_comm_bytes"] > 0, name  # at least the scores' all-reduce and the plan's broadcast
    # every variant trains on the same batches: the tokens behind its tokens/s are LoRA's, counted over all processes
    lora = results["lora"]
    lora_tokens = lora["tokens_per_second"] * lora["seconds_per_step"] * lora["steps"]
    assert lora_tokens > lora["steps"] * 2  # more than one token per sequence, 2 processes
    for name, r in results.items():
        assert r["tokens_per_second"] * r["seconds_per_step"] * r["steps"] == pytest.approx(lora_tokens), name
    assert results["lora"]["event_comm_bytes"] == 0 and results["lora"]["step_comm_bytes"] == 0
    # the AdaLoRA-style scorer reduces its gradients every step; module allocation its M activation scores
    assert results["adalora-masked"]["step_comm_bytes"] > 0 and results["modalloc-masked"]["step_comm_bytes"] > 0
    # physical module allocation: inactive adapters hold no master and no Adam state
    assert results["modalloc-physical"]["bytes_after"] < results["modalloc-masked"]["bytes_after"]
    assert results["modalloc-masked"]["trainable_parameters"] < results["lora"]["trainable_parameters"]
    assert "x LoRA" in result.stdout
