"""launch/quality.py, the quality benchmark's one command, on the tiny chat model and SFT file: LoRA and L1RA at
one parameter budget, each tuned (one trial) on rows carved from the training split, then each arm's choice run on
the held-out split; tables with the paired difference, two plots; a second call reuses every run. Four runs of
about 15 s each, nearly all start-up: one test seed and one trial (the standard errors over seeds and the choice
among trials: tests/unit), one process."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import PYTHON, REPO, subprocess_env

ARMS = ("lora", "l1ra")
LRS = ("3e-3",)  # one trial an arm: the choice among several is tests/unit (quality.best)


def _quality(out, model, data, *extra: str) -> list[str]:
    return [
        PYTHON,
        str(REPO / "launch" / "quality.py"),
        "--out",
        str(out),
        "--tasks",
        str(data),
        "--budget",
        "r2",
        "--arms",
        ",".join(ARMS),
        "--lrs",
        ",".join(LRS),
        "--seeds",
        "0",
        "--max_steps",
        "3",
        "--eval_samples",
        "0",
        "--eval_generate",
        "2",
        "--launcher",
        "python",  # one process: a launcher and a second process's imports would double each tiny run's time
        "--no-reports",
        "--model",
        str(model),
        *extra,
    ]


@pytest.mark.e2e
def test_quality_tunes_on_training_rows_then_tests_the_choice(tiny_chat_model_dir, tiny_sft_jsonl, tmp_path):
    from ds_dynrank.task.tables import EVAL_FRACTION, SPLIT_SEED, load_table, split_table

    out, name, results = tmp_path / "quality", tiny_sft_jsonl.stem, tmp_path / "results"
    cmd = _quality(out, tiny_chat_model_dir, tiny_sft_jsonl, "--results", str(results))
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("[quality] start") == len(ARMS) * (len(LRS) + 1)

    # the validation file holds exactly the training rows; the test phase reads the same split's held-out rows
    train, test = split_table(load_table(str(tiny_sft_jsonl)), eval_fraction=EVAL_FRACTION, split_seed=SPLIT_SEED)
    carved = out / "data" / name / "validation.jsonl"
    assert load_table(str(carved))["train"].to_list() == train.to_list()
    held_out = load_table(str(out / "data" / name / "test-split"))
    assert held_out["train"].to_list() == train.to_list() and held_out["test"].to_list() == test.to_list()
    runs = out / name / "r2"
    for arm in ARMS:
        for trial in (runs / "tune" / arm).iterdir():
            record = json.loads((trial / "seed0" / "quality_run.json").read_text())
            assert record["command"][record["command"].index("--dataset") + 1] == str(carved)
            assert record["command"][record["command"].index("--eval_generate") + 1] == "0"  # the headline only
            assert record["cpu_seconds"] > 0
            metrics = json.loads((trial / "seed0" / "metrics.json").read_text())
            assert metrics["eval_examples"] == round(EVAL_FRACTION * len(train))  # a quarter of the carved rows

    # each arm's choice is the best validation trial, and the test phase runs it
    choices = json.loads((out / "tuning.json").read_text())["choices"][name]["r2"]
    for arm in ARMS:
        choice = choices[arm]
        assert choice["trial"] == min(choice["trials"], key=choice["trials"].get)
        (trial,) = (runs / "test" / arm).iterdir()
        assert trial.name == choice["trial"]
        config = json.loads((trial / "ds_config.json").read_text())
        assert config["optimizer"]["params"]["lr"] == choice["settings"]["lr"]
        record = json.loads((trial / "seed0" / "quality_run.json").read_text())
        assert record["command"][record["command"].index("--dataset") + 1] == str(out / "data" / name / "test-split")
        assert record["command"][record["command"].index("--eval_generate") + 1] == "2"  # exact match reported
        assert json.loads((trial / "seed0" / "metrics.json").read_text())["eval_examples"] == len(test)

    # equal parameters, the paired difference (its standard error needs two seeds), the cost, two plots
    table = json.loads((out / "quality.json").read_text())["tables"][name]["r2"]
    budget, tolerance = table["budget_parameters"], table["tolerance"]
    assert tolerance < 0.1 * budget  # one rank of the widest module: 96 of 2,048 here
    for arm in ARMS:
        row = table["arms"][arm]
        assert row["seeds"] == 1 and row["parameters"]["matched"]
        assert all(abs(p - budget) <= tolerance for p in row["parameters"]["final_by_seed"])
        assert row["cpu_hours"]["tune"] > 0 and row["cpu_hours"]["test"] > 0
    loss, lora = (table["arms"][a]["metrics"]["eval_loss"] for a in ARMS[::-1])
    assert loss["pairs"] == 1 and loss["delta"] == pytest.approx(loss["mean"] - lora["mean"])
    assert loss["se"] is None and loss["claimed"] == "n/a"  # one pair claims nothing
    text = (out / "quality.md").read_text()
    assert "Δ to LoRA ± SE" in text and "beyond 2 SE" in text and "CPU-hours" in text and "Targets:" in text
    for png in ("quality_pareto.png", "quality_ranks.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # what is committed: the tables, plots and choices, and each run's small files, in the same layout
    runs_done = sorted(p.parent.relative_to(out) for p in out.rglob("metrics.json"))
    assert len(runs_done) == len(ARMS) * (len(LRS) + 1)
    assert sorted(p.parent.relative_to(results) for p in results.rglob("metrics.json")) == runs_done
    for run in runs_done:
        assert {"allocation.json", "quality_run.json"} <= {p.name for p in (results / run).iterdir()}
        assert (results / run / "predictions.jsonl").is_file() == (run.parts[2] == "test")  # only tests decode
        assert (results / run.parent / "ds_config.json").is_file()
    assert (results / "tuning.json").read_text() == (out / "tuning.json").read_text()
    assert (results / "quality.md").is_file() and (results / "quality_pareto.png").is_file()
    assert not any(p.name in ("checkpoints", "adapter", "tensorboard") for p in results.rglob("*"))

    again = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "[quality] start" not in again.stdout, again.stdout[-2000:]
    assert f"{len(ARMS) * (len(LRS) + 1)} finished runs reused" in again.stdout
