"""The outside peer PEFT's EVA, through launch/train_peft_eva.py with 2 processes under ZeRO-2: its SVD
initialisation moves rank between modules within the budget r x modules, every rank starts from bit-identical
adapters, and the run writes the same metrics as the main job. Bad settings are refused with one line."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess

import pytest
from helpers import PYTHON, REPO, error_lines, subprocess_env, two_processes

from ds_dynrank.errors import UserInputError

SCRIPT = str(REPO / "launch" / "train_peft_eva.py")
# the tiny Llama's (in, out) per module type: hidden 32, MLP 64, 4 heads of 8, 2 KV heads
SHAPES = {
    "q": (32, 32),
    "k": (32, 16),
    "v": (32, 16),
    "o": (32, 32),
    "gate": (32, 64),
    "up": (32, 64),
    "down": (64, 32),
}


def load_script():
    """launch/train_peft_eva.py as a module, for its checks in this process."""
    spec = importlib.util.spec_from_file_location("train_peft_eva", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def config(tmp_path, **section) -> str:
    cfg = json.loads((REPO / "ds_configs" / "zero2_peft_eva.json").read_text())
    cfg["peft_eva"].update(section)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.e2e
def test_peft_eva_redistributes_rank_and_starts_identical_on_every_rank(tiny_chat_model_dir, tiny_sft_jsonl, tmp_path):
    """On the main job's SFT data (the same flags and data path as launch/train.py)."""
    r, rho = 4, 2.0
    out = tmp_path / "run"
    cmd = [
        *two_processes(),
        SCRIPT,
        "--deepspeed",
        config(tmp_path, r=r, rho=rho, init_batches=4),
        "--model",
        str(tiny_chat_model_dir),
        "--dataset",
        str(tiny_sft_jsonl),
        "--max_steps",
        "6",
        "--eval_interval",
        "0",
        "--eval_samples",
        "16",
        "--output_dir",
        str(out),
        "--gradient_checkpointing",  # the shared flag: the peer honours it too
        "--eval_generate",  # and exact match, with each answer written beside the metrics
        "4",
        "--max_new_tokens",
        "3",
    ]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    ranks = json.loads((out / "allocation.json").read_text())
    assert metrics["method"] == "peft-eva" and metrics["steps"] == 6 and metrics["task"] == "sft"
    assert metrics["zero_stage"] == 2 and metrics["world_size"] == 2 and "eval_loss" in metrics
    answers = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [a["index"] for a in answers] == [0, 1, 2, 3]
    assert sum(a["correct"] for a in answers) / 4 == metrics["exact_match"]
    assert len(ranks) == 14 and all(name.startswith("model.layers.") and name.endswith("_proj") for name in ranks)
    # PEFT's rule: the r x modules largest explained-variance ratios, at most round(r * rho) per module
    assert metrics["final_budget"] == metrics["initial_budget"] == sum(ranks.values()) == 14 * r
    assert max(ranks.values()) <= round(r * rho) and len(set(ranks.values())) > 1  # EVA moved rank
    # the trained adapters are the ranks EVA chose: A is rank x in, B out x rank (none where it chose 0)
    by_type = {name: SHAPES[name.rsplit(".", 1)[1].removesuffix("_proj")] for name in ranks}
    assert metrics["trainable_parameters"] == sum(k * sum(by_type[name]) for name, k in ranks.items())
    assert metrics["trainable_parameters_uniform"] == sum(r * sum(shape) for shape in by_type.values())
    # every rank's adapters after the initialisation, and the SVD each computed itself, bit for bit
    lines = re.findall(r"eva init digest (\w+) \(rank (\d); own SVD (\w+), (\d+) forwards\)", result.stdout)
    assert sorted(rank for _, rank, _, _ in lines) == ["0", "1"], result.stdout[-2000:]
    assert len({adapters for adapters, _, _, _ in lines}) == 1 and len({own for _, _, own, _ in lines}) == 1
    assert metrics["eva"]["forwards"] == int(lines[0][3]) > 1


@pytest.mark.e2e
def test_peft_eva_bad_setting_is_one_line(tiny_model_dir, tiny_csv, tmp_path):
    """Through the script: exit code 2 and one line, before PEFT, DeepSpeed or the model load."""
    cmd = [PYTHON, SCRIPT, "--deepspeed", config(tmp_path, rank=8), "--model", str(tiny_model_dir)]
    cmd += ["--dataset", str(tiny_csv), "--task", "classification"]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith("error: peft_eva: unknown key(s) ['rank'] (known: adjust_scaling_factors, init_batch_size")


@pytest.mark.parametrize(
    ("section", "stage", "message"),
    [
        ({"rho": 0.5}, 2, "peft_eva: rho must be >= 1.0"),  # PEFT's own check, reworded
        ({"init_batches": 0}, 2, "peft_eva.init_batches: must be an integer >= 1, got 0"),
        ({"tau": 1.5}, 2, "peft_eva: tau must be between 0.0 and 1.0."),
        ({"use_label_mask": "yes"}, 2, "peft_eva.use_label_mask: must be true or false, got 'yes'"),
        ({}, 3, "zero_optimization.stage: the PEFT EVA peer runs under ZeRO 0-2, got 3"),
    ],
)
def test_peft_eva_settings_are_checked_naming_the_field(section, stage, message):
    """The script's own checks, in this process (what the subprocess above prints for each)."""
    script = load_script()
    cfg = json.loads((REPO / "ds_configs" / "zero2_peft_eva.json").read_text())
    cfg["zero_optimization"]["stage"] = stage

    def check() -> None:
        script.check_stage(cfg)
        script.eva_settings({**cfg["peft_eva"], **section}, "sft")

    with pytest.raises(UserInputError) as refused:
        check()
    assert str(refused.value).startswith(message)


def test_an_eva_svd_that_never_converges_is_stopped():
    """PEFT cycles the batches until every layer's components converge, with no limit; a batch with fewer labelled
    tokens than components is skipped, so with one labelled token per row it would loop for ever (a
    classification run with use_label_mask on). The script bounds the forwards and says what to change."""
    import torch
    from helpers import tiny_llama
    from peft import get_peft_model

    script = load_script()
    lora, _ = script.eva_settings({"r": 4, "use_label_mask": True}, "classification")
    model = get_peft_model(tiny_llama(), lora, low_cpu_mem_usage=True)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]  # the label token alone: 2 tokens per batch, 8 components
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]
    with pytest.raises(UserInputError, match="had not converged after 5 forwards over 1 batch"):
        script.eva_init(model, batches, max_forwards=5, device="cpu")
