"""Bad input fails in seconds with one clear line (field and expectation), exit code 2, no traceback, and nothing
written: no training started. Config and flag refusals run as separate processes, as users start them; those that
need the model or the data loaded run the same entry point in this process."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import subprocess

import pytest
import torch
from helpers import PYTHON, REPO, error_lines, math_messages, subprocess_env, write_jsonl

TRAIN = str(REPO / "launch" / "train.py")


def _config(tmp_path, **dynrank) -> str:
    cfg = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    cfg["dynrank"].update(dynrank)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return str(path)


CASES = {
    "sft_messages_without_a_chat_template": (  # the tiny classification model's tokenizer has no chat template
        lambda tmp, m, d: ["--model", m, "--dataset", str(write_jsonl(tmp / "chat.jsonl", math_messages(8)))],
        r"^error: --format: 'messages' rows are rendered with the model's chat template, and this tokenizer has none",
    ),
    "sft_mixed_formats": (
        lambda tmp, m, d: [
            "--model",
            m,
            "--dataset",
            str(write_jsonl(tmp / "mixed.jsonl", [{"prompt": "q", "completion": "a"}] * 3 + [{"text": "t"}])),
        ],
        r"^error: .*mixed\.jsonl: row 4: is in format 'text', but the file is 'prompt-completion' \(mixed formats\)$",
    ),
    "typo": (
        lambda tmp, m, d: [
            "--deepspeed",
            _config(tmp, lora_rank=4),
            "--model",
            m,
            "--dataset",
            d,
            "--task",
            "classification",
        ],
        r"^error: dynrank\.lora_rank: unknown key \(known keys: method, target_modules, .*\)$",
    ),
    "negative_rank": (
        lambda tmp, m, d: ["--deepspeed", _config(tmp, r=-2), "--model", m, "--dataset", d, "--task", "classification"],
        r"^error: dynrank\.r: Input should be greater than or equal to 1 \(got -2\)$",
    ),
    "missing_model": (
        lambda tmp, m, d: ["--model", str(tmp / "no_such_model"), "--dataset", d, "--task", "classification"],
        r"^error: --model: local path not found: .*no_such_model$",
    ),
    "unknown_column": (
        lambda tmp, m, d: ["--model", m, "--dataset", d, "--task", "classification", "--text_column", "review"],
        r"^error: --text_column: column 'review' not in the dataset \(its columns: text, label\)$",
    ),
    "missing_checkpoint": (
        lambda tmp, m, d: ["--model", m, "--dataset", d, "--task", "classification", "--resume", str(tmp / "nothing")],
        r"^error: --resume: no checkpoint in .*nothing \(expected a 'latest' file or ",
    ),
    "bad_flag_value": (
        lambda tmp, m, d: ["--model", m, "--dataset", d, "--task", "classification", "--max_steps", "0"],
        r"^error: --max_steps: must be >= 1, got 0$",
    ),
    "schedule_never_fires": (
        lambda tmp, m, d: [
            "--deepspeed",
            _config(tmp, method="l1ra", schedule={"start": 50}),
            "--model",
            m,
            "--dataset",
            d,
            "--task",
            "classification",
            "--max_steps",
            "10",
        ],
        r"^error: dynrank\.schedule: method 'l1ra' would first re-allocate at optimizer step 50, "
        r"but the run has 10 steps",
    ),
    "alora_val_too_large": (
        lambda tmp, m, d: [
            "--deepspeed",
            _config(tmp, method="alora", alora={"val_samples": 5000}),
            "--model",
            m,
            "--dataset",
            d,
            "--task",
            "classification",
        ],
        r"^error: dynrank\.alora\.val_samples: 5000 leaves no training data",
    ),
}


# run as the user runs them, a process each: the config and flag refusals (before torch loads: a few seconds),
# and the refusal that comes from ds_dynrank.initialize, after the process group exists
SUBPROCESS = ("typo", "negative_rank", "bad_flag_value", "schedule_never_fires")


def _check_refusal(code: int, stderr: str, pattern: str, out) -> None:
    assert code == 2, stderr[-3000:]
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr[-3000:]
    assert re.match(pattern, errors[0]), errors[0]
    assert "Traceback" not in stderr
    assert not out.exists(), "a failed start must not write anything"


@pytest.mark.e2e
@pytest.mark.parametrize("case", SUBPROCESS)
def test_bad_input_is_one_clear_line(case, tiny_model_dir, tiny_csv, tmp_path):
    make_args, pattern = CASES[case]
    out = tmp_path / "out"
    cmd = [PYTHON, TRAIN, *make_args(tmp_path, str(tiny_model_dir), str(tiny_csv)), "--output_dir", str(out)]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    _check_refusal(result.returncode, result.stderr, pattern, out)


@functools.cache
def _entry_point():
    """launch/train.py as a module: its train() under run_main, what `python launch/train.py` runs."""
    spec = importlib.util.spec_from_file_location("train_entry_point", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", sorted(set(CASES) - set(SUBPROCESS)))
def test_bad_data_model_or_checkpoint_is_one_clear_line(case, tiny_model_dir, tiny_csv, tmp_path, capsys):
    """The same entry point and exit code, run in this process: each would spend ~10 s importing torch and
    transformers in a process of its own before reaching its check."""
    from ds_dynrank.task.job import run_main

    make_args, pattern = CASES[case]
    out = tmp_path / "out"
    argv = [*make_args(tmp_path, str(tiny_model_dir), str(tiny_csv)), "--output_dir", str(out)]
    code = run_main(_entry_point().train, argv, "train")
    _check_refusal(code, capsys.readouterr().err, pattern, out)
    assert not torch.distributed.is_initialized(), "refused after the process group started: run it as a process"


def test_gradient_checkpointing_for_a_model_that_cannot_is_one_clear_line(
    tiny_model_dir, tiny_csv, tmp_path, capsys, monkeypatch
):
    """--gradient_checkpointing with a model transformers cannot checkpoint: refused once the model loads, before
    any process group exists (the tiny Llama stands in, its support switched off)."""
    from transformers import LlamaForCausalLM

    from ds_dynrank.task.job import run_main

    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--dataset", str(tiny_csv), "--task", "classification",
            "--gradient_checkpointing", "--output_dir", str(out)]  # fmt: skip
    code = run_main(_entry_point().train, argv, "train")
    pattern = r"^error: --gradient_checkpointing: LlamaForCausalLM does not support activation checkpointing"
    _check_refusal(code, capsys.readouterr().err, pattern, out)
    assert not torch.distributed.is_initialized()


@pytest.mark.e2e
def test_bad_config_under_the_deepspeed_launcher(tiny_model_dir, tiny_csv, tmp_path):
    cmd = [
        "deepspeed",
        "--num_gpus",
        "2",
        TRAIN,
        "--deepspeed",
        _config(tmp_path, r=0),
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(tiny_csv),
        "--task",
        "classification",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    errors = error_lines(result.stdout + result.stderr)
    assert errors == ["error: dynrank.r: Input should be greater than or equal to 1 (got 0)"]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_checkpoint_of_another_model_or_config_is_refused(tiny_model_dir, tiny_csv, tmp_path):
    """A checkpoint whose adapters do not match this model and config: one line, exit 2, the checkpoint untouched."""
    out, env = tmp_path / "run", subprocess_env()
    base = [
        PYTHON,
        TRAIN,
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(tiny_csv),
        "--task",
        "classification",
        "--max_steps",
        "2",
        "--eval_interval",
        "0",
        "--eval_samples",
        "8",
        "--output_dir",
        str(out),
    ]
    first = subprocess.run(
        [*base, "--deepspeed", _config(tmp_path)], env=env, capture_output=True, text=True, timeout=180
    )
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(p.name for p in (out / "checkpoints" / "step2").iterdir())
    other = _config(tmp_path, target_modules=["q_proj", "v_proj"])
    again = subprocess.run(
        [*base, "--deepspeed", other, "--resume"], env=env, capture_output=True, text=True, timeout=180
    )
    assert again.returncode == 2
    errors = error_lines(again.stderr)
    assert len(errors) == 1 and "adapts other modules than this model and config" in errors[0], again.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints" / "step2").iterdir()) == before
