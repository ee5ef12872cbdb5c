"""launch/quality.py's method specs: `method+key=value` overrides reach the method's own section and are checked as
the job checks its config, so a bad sweep stops before its first run."""

from __future__ import annotations

import importlib.util
import re

import pytest
from helpers import REPO

from ds_dynrank.config import from_ds_config

_spec = importlib.util.spec_from_file_location("quality", REPO / "launch" / "quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


@pytest.mark.parametrize("method", quality.METHODS)
def test_every_method_builds_a_config_the_job_accepts(method):
    script, cfg = quality.method_config(method, 60)
    assert (REPO / "launch" / script).is_file()
    if method != "peft-adalora":  # the peer's launcher reads PEFT's own fields, not a dynrank section
        assert from_ds_config(cfg).r == (12 if method == "adalora" else 8)


@pytest.mark.parametrize(
    ("spec", "section", "expected"),
    [
        ("l1ra+l1_lambda=0.05+gate_lr=0.2", "l1ra", {"l1_lambda": 0.05, "gate_lr": 0.2}),
        ("modalloc-topk+k=40", "modalloc", {"k": 40, "strategy": "topk"}),
        ("alora+rounds=3", "alora", {"rounds": 3, "val_samples": 2}),
    ],
)
def test_overrides_reach_the_methods_own_section_and_keep_the_rest(spec, section, expected):
    _, cfg = quality.method_config(spec, 60)
    assert {k: cfg["dynrank"][section][k] for k in expected} == expected


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("l1ra+l1_lambdaa=0.1", ["l1_lambdaa"]),
        ("l1ra+l1_lambda=-1", ["l1_lambda"]),
        ("lora+r=4", ["lora", "no method"]),
        ("peft-adalora+init_r=4", ["peft-adalora", "no method"]),
        ("l1ra+l1_lambda", ["key=value"]),
        ("sora", ["unknown", "sora"]),
    ],
)
def test_a_bad_spec_names_what_is_wrong(spec, words):
    with pytest.raises(ValueError, match=re.escape(words[0])) as err:
        quality.method_config(spec, 60)
    assert all(w in str(err.value) for w in words), str(err.value)
