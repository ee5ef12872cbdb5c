"""TRL's SFTTrainer with dynamic rank, launched as users launch it: `accelerate launch --config_file` with a
DeepSpeed plugin, 2 processes, the tiny chat model on `messages` rows. ZeRO-2 with the masked backend (the README's
example) and ZeRO-3 with the physical one (the engine Trainer and accelerate hold follows each rebuild): ranks move
with the budget held, both ranks end bit-identical, a run resumed through `resume_from_checkpoint` continues the
allocation history exactly; every method runs; and AdaLoRA's scores under accelerate's combined backward-and-step
equal our own loop's, bit for bit."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch
import yaml
from helpers import REPO, free_port, l1ra_config, subprocess_env, two_processes

STEPS, SAVE_EVERY = 12, 4


def _accelerate_yaml(directory, name: str, ds_config) -> str:
    """The shipped launch/accelerate/<name> with the test's DeepSpeed config and a free port."""
    settings = yaml.safe_load((REPO / "launch" / "accelerate" / name).read_text())
    settings["deepspeed_config"]["deepspeed_config_file"] = str(ds_config)
    settings["main_process_port"] = free_port()
    path = directory / name
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def _run(config_yaml: str, model, data, out, *extra: str) -> None:
    cmd = [
        "accelerate",
        "launch",
        "--config_file",
        config_yaml,
        str(REPO / "launch" / "train_trl.py"),
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--max_steps",
        str(STEPS),
        "--max_length",
        "128",
        "--learning_rate",
        "1e-2",  # B grows fast enough from zero for the gates to see gradients in 12 steps
        "--output_dir",
        str(out),
        *extra,
    ]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-5000:]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, tiny_chat_model_dir, tiny_sft_jsonl):
    """The uninterrupted physical ZeRO-3 run (checkpoints every 4 steps): (accelerate config, output dir)."""
    directory = tmp_path_factory.mktemp("trl")
    ds_config = l1ra_config(directory, "hf_zero3_l1ra.json", dropout=0.0, partitioned=True)
    config = _accelerate_yaml(directory, "zero3.yaml", ds_config)
    out = directory / "zero3"
    _run(config, tiny_chat_model_dir, tiny_sft_jsonl, out, "--save_steps", str(SAVE_EVERY))
    return config, out


def _history(out) -> list[tuple]:
    history = json.loads((out / "allocation_history.json").read_text())
    return [(h["step"], h["ranks"], h["budget"], h["slots_changed"]) for h in history]


def _assert_moved_within_budget(out) -> list[dict]:
    history = json.loads((out / "allocation_history.json").read_text())
    assert [h["step"] for h in history] == [0, 2, 4, 6, 8, 10]  # optimizer steps, driven by the callback
    assert {h["budget"] for h in history} == {14 * 8}
    assert any(h["ranks"] != history[0]["ranks"] for h in history[1:]), "ranks never moved"
    exported = json.loads((out / "adapter_config.json").read_text())  # the stock PEFT adapter, live ranks only
    assert exported["peft_type"] == "LORA"
    assert set(exported["rank_pattern"].values()) <= set(history[-1]["ranks"].values())
    return history


@pytest.mark.e2e
def test_physical_sft_trainer_moves_ranks_within_the_budget_and_ranks_agree(zero3_run):
    _, out = zero3_run
    history = _assert_moved_within_budget(out)
    per_rank = [json.loads((out / f"final_rank{r}.json").read_text()) for r in range(2)]
    assert per_rank[0] == per_rank[1]  # the allocation, and every adapter tensor bit for bit
    assert per_rank[0]["ranks"] == history[-1]["ranks"]


@pytest.mark.e2e
def test_physical_sft_trainer_resumes_the_allocation_exactly(zero3_run, tiny_chat_model_dir, tiny_sft_jsonl, tmp_path):
    config, whole = zero3_run
    checkpoint = whole / "checkpoint-8"
    assert (checkpoint / "dynrank_state.pt").is_file()
    assert (checkpoint / "adapter_model.safetensors").is_file()  # the adapters, as Trainer saves a PEFT model
    assert not (checkpoint / "model.safetensors").exists()  # and not the frozen base
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed / "checkpoint-8")  # as if the job had stopped after step 8
    _run(config, tiny_chat_model_dir, tiny_sft_jsonl, resumed, "--save_steps", str(SAVE_EVERY), "--resume")
    assert _history(resumed) == _history(whole)  # steps, ranks, budget and slots moved: the same history
    per_rank = [json.loads((resumed / f"final_rank{r}.json").read_text()) for r in range(2)]
    assert per_rank[0] == per_rank[1] == json.loads((whole / "final_rank0.json").read_text())  # bit-identical


@pytest.mark.e2e
def test_scores_under_accelerate_equal_our_own_loops(tiny_chat_model_dir, tiny_sft_jsonl, tmp_path):
    """AdaLoRA scores on gradients its tensor hooks see during backward; accelerate then steps in the same call.
    The events' scores must be those of our explicit loop on the same batches, bit for bit, and not zero."""
    cmd = [
        *two_processes(),
        str(REPO / "tests" / "e2e" / "trainer_scores_parity.py"),
        str(tiny_chat_model_dir),
        str(tiny_sft_jsonl),
        str(tmp_path),
    ]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    for rank in range(2):
        runs = torch.load(tmp_path / f"scores_rank{rank}.pt", weights_only=False)
        trainer, own = runs["trainer"], runs["own_loop"]
        assert runs["batches"] == 10
        assert [h["step"] for h in trainer["history"]] == [0, 4, 6, 8]
        assert len(trainer["scores"]) == len(own["scores"]) == 3
        for seen, expected in zip(trainer["scores"], own["scores"]):
            assert seen.abs().max() > 0  # the hooks saw gradients
            assert torch.equal(seen, expected)
        assert [h["ranks"] for h in trainer["history"]] == [h["ranks"] for h in own["history"]]
        assert trainer["history"][-1]["budget"] < trainer["history"][0]["budget"]  # AdaLoRA pruned toward target_r


def _method_config(directory, name: str, backend: str, **section) -> str:
    """The shipped own-loop config `name` made a trainer's: no optimizer or scheduler (Trainer builds them), batch
    sizes from SFTConfig; `section` updates the "dynrank" section so that events move ranks in 12 steps."""
    cfg = json.loads((REPO / "ds_configs" / name).read_text())
    for key in ("optimizer", "scheduler", "tensorboard"):
        cfg.pop(key, None)
    cfg.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto", gradient_clipping="auto")
    dynrank = cfg["dynrank"]
    dynrank["reshape"]["backend"] = backend
    if backend == "physical":
        dynrank.pop("capacity", None)
    for key, value in section.items():
        dynrank[key] = {**dynrank.get(key, {}), **value} if isinstance(value, dict) else value
    if cfg["zero_optimization"]["stage"] == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = directory / f"{name}-{backend}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


METHODS = {
    "alora": ("zero2_alora.json", "physical", {"schedule": {"start": 4, "interval": 4}}),
    "modalloc": ("zero3_modalloc.json", "masked", {"schedule": {"interval": 4}}),
    "gora": ("zero2_gora.json", "physical", {"budget": {"cap": None}, "gora": {"warmup_steps": 4}}),
}


@pytest.mark.e2e
@pytest.mark.parametrize("method", sorted(METHODS))
def test_sft_trainer_runs_every_method(method, tiny_chat_model_dir, tiny_sft_jsonl, tmp_path):
    """Each method under SFTTrainer (the DeepSpeed launcher path: `--deepspeed`), with events that change the
    allocation: ALoRA takes its scoring batch from the trainer's eval_dataset. (AdaLoRA runs in the scores check,
    L1RA in the runs above.)"""
    name, backend, section = METHODS[method]
    config = _method_config(tmp_path, name, backend, **section)
    out = tmp_path / "out"
    cmd = [*two_processes(), str(REPO / "launch" / "train_trl.py"), "--deepspeed", config]
    cmd += ["--model", str(tiny_chat_model_dir), "--dataset", str(tiny_sft_jsonl), "--max_length", "128"]
    cmd += ["--max_steps", str(STEPS), "--learning_rate", "1e-2", "--output_dir", str(out)]
    cmd += ["--no-gradient_checkpointing"]  # (on in the runs above)
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    history = json.loads((out / "allocation_history.json").read_text())
    assert any(h["slots_changed"] or h["modules_changed"] for h in history[1:]), f"{method}: nothing moved"
    per_rank = [json.loads((out / f"final_rank{r}.json").read_text()) for r in range(2)]
    assert per_rank[0] == per_rank[1] and per_rank[0]["ranks"] == history[-1]["ranks"]


EMBEDDED_MODEL = "str(default_model_dir())"


def _readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- trl:start -->\n```python\n(.*?)```\n<!-- trl:end -->", readme, re.S)
    assert block, "README lacks the TRL example markers"
    assert EMBEDDED_MODEL in block.group(1) and "max_steps=60" in block.group(1)
    code = [line for line in block.group(1).splitlines() if line and not line.startswith(("#", "from ", "import "))]
    assert len(code) <= 10, code  # the example stays short
    return block.group(1)


@pytest.mark.e2e
def test_the_readme_trl_example_runs_as_written(tiny_chat_model_dir, tmp_path):
    """With the README's accelerate command and the shipped ZeRO-2 YAML (masked backend), its DeepSpeed config given
    events that move ranks in 12 steps; the embedded model swapped for the tiny one, 12 steps at a learning rate of
    1e-2 with a checkpoint every 4 instead of 60 and 20."""
    out = tmp_path / "sft"
    code = (
        _readme_example()
        .replace(EMBEDDED_MODEL, repr(str(tiny_chat_model_dir)), 1)
        .replace("max_steps=60", f"max_steps={STEPS}")
        .replace("save_steps=20", f"save_steps={SAVE_EVERY}")
        .replace("learning_rate=1e-3", "learning_rate=1e-2")
        .replace('"runs/sft"', repr(str(out)))
    )
    script = tmp_path / "sft.py"
    script.write_text(code)
    config = _accelerate_yaml(tmp_path, "zero2.yaml", l1ra_config(tmp_path, "hf_zero2_l1ra.json", dropout=0.0))
    result = subprocess.run(
        ["accelerate", "launch", "--config_file", config, str(script)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    _assert_moved_within_budget(out)  # both ranks' allocations are compared after every event by the controller
    assert (out / f"checkpoint-{STEPS}" / "dynrank_state.pt").is_file()
