"""A method is one folder plus one registry line. Every shipped method's folder holds its pydantic config (the spec)
and its torch code; and a method defined outside the package joins through one `register_method` call: its section
is validated, documented and refused with other methods, and it trains through the front door, events and all."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import subprocess_env

from ds_dynrank.methods import registry

PACKAGE = Path(__file__).resolve().parents[2] / "ds_dynrank"


def test_every_registered_method_lives_in_its_own_folder():
    for module in registry.METHOD_CONFIGS:
        name = module.split(".")[-2]
        folder = PACKAGE / "methods" / name
        spec = registry.SPECS[name]
        assert module == f"ds_dynrank.methods.{name}.config" and (folder / "config.py").is_file()
        implementation = spec.implementation.split(":")[0]
        assert implementation in (f"ds_dynrank.methods.{name}.method", "ds_dynrank.methods.base"), implementation
        assert spec.section is None or spec.section.__module__ == module  # its knobs live beside it


NEW_METHOD = '''
import json, sys
import torch
from pydantic import Field

import ds_dynrank
from ds_dynrank import MethodSpec, dist, register_method
from ds_dynrank.allocation import Plan
from ds_dynrank.config import from_ds_config, schema_table
from ds_dynrank.errors import UserInputError
from ds_dynrank.methods.base import Method
from ds_dynrank.section import Section
from helpers import tiny_ds_config, tiny_llama


class KeepFirstConfig(Section):
    keep: int = Field(1, ge=1)
    """Slots each module keeps at an event."""


class KeepFirst(Method):
    def decide(self, scores, event):
        return Plan(keep=tuple(tuple(s[: self.cfg.keep_first.keep]) for s in event.live),
                    grow=tuple(0 for _ in event.live))


class KeepFirstSpec(MethodSpec):
    name = "keep_first"
    summary = "keeps each module's first slots (a test method)."
    implementation = "__main__:KeepFirst"
    section = KeepFirstConfig
    section_doc = "The test method's knobs."


register_method(KeepFirstSpec())
out = {"table": "`keep_first.keep`" in schema_table()}
try:
    from_ds_config({"dynrank": {"method": "l1ra", "keep_first": {"keep": 2}}})
except UserInputError as err:
    out["refused"] = str(err)
try:
    from_ds_config({"dynrank": {"method": "keep_first", "keep_first": {"keep": 0}}})
except UserInputError as err:
    out["bad_value"] = str(err)
dist.init()
config = {**tiny_ds_config(0), "dynrank": {"method": "keep_first", "r": 4, "schedule": {"start": 2, "interval": 2},
                                           "keep_first": {"keep": 2}}}
dynrank = ds_dynrank.initialize(tiny_llama(), config, total_steps=4)
for _ in range(4 * 2):
    ids = torch.randint(0, 128, (2, 8))
    loss = dynrank.engine(input_ids=ids, labels=ids).loss
    dynrank.engine.backward(loss)
    dynrank.engine.step()
    dynrank.after_step()
out["method"] = type(dynrank.method).__name__
out["history"] = [(h["step"], sorted(set(h["ranks"].values()))) for h in dynrank.history]
print(json.dumps(out))
'''


def test_a_method_from_outside_joins_with_one_register_call(tmp_path):
    script = tmp_path / "new_method.py"
    script.write_text(textwrap.dedent(NEW_METHOD))
    env = subprocess_env(PYTHONPATH=f"{PACKAGE.parent}:{Path(__file__).resolve().parents[1]}")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["table"], "the registered section is not in the generated config table"
    assert "keep_first: only used by method keep_first, but method is 'l1ra'" in out["refused"]
    assert "dynrank.keep_first.keep: Input should be greater than or equal to 1" in out["bad_value"]
    assert out["method"] == "KeepFirst"
    assert out["history"] == [[0, [4]], [2, [2]]], out["history"]  # its event ran through the engine (stop: step 3)
