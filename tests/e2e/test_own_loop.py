"""The README's own-loop example, run as written (the hub model swapped for the tiny test model) with 2 processes
under the DeepSpeed launcher: the front door wires the allocator, events fire at their steps with the budget held,
and the checkpoint and the stock PEFT adapter are written."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from helpers import REPO, free_port, subprocess_env

HUB_MODEL = '"HuggingFaceTB/SmolLM2-135M-Instruct"'


def readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- own-loop:start -->\n```python\n(.*?)```\n<!-- own-loop:end -->", readme, re.S)
    assert block, "README lacks the own-loop example markers"
    assert HUB_MODEL in block.group(1)
    return block.group(1)


@pytest.mark.e2e
def test_the_readme_own_loop_runs_as_written(tiny_model_dir, tmp_path):
    out = tmp_path / "own_loop"
    code = readme_example().replace(HUB_MODEL, repr(str(tiny_model_dir))).replace('"runs/own_loop', f'"{out}')
    script = tmp_path / "own_loop.py"
    script.write_text(code)
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(script)]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    history = json.loads((out / "allocation_history.json").read_text())
    assert [h["step"] for h in history] == list(range(0, 40, 2))  # an event every 5% of the 40 steps
    assert {h["budget"] for h in history} == {history[0]["budget"]}
    assert (out / "checkpoints" / "latest").read_text().strip() == "step40"
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
