"""The front door refuses what would go wrong later, before DeepSpeed starts, in one clear line: a schedule that
never fires, a method's missing scoring batch, a hand-built optimizer without the method's own param group; and it
reuses adapters a model already has instead of injecting twice."""

from __future__ import annotations

import pytest
import torch
from helpers import SteppingEngine, tiny_llama

import ds_dynrank
from ds_dynrank.api import prepare
from ds_dynrank.config import from_ds_config
from ds_dynrank.controller import DynRank
from ds_dynrank.errors import UserInputError
from ds_dynrank.lora import adapter_parameters, iter_lora


def test_a_schedule_that_never_fires_is_refused_before_deepspeed_starts():
    config = {"train_micro_batch_size_per_gpu": 1, "dynrank": {"method": "l1ra", "schedule": {"start": 50}}}
    with pytest.raises(UserInputError, match=r"dynrank\.schedule: method 'l1ra' would first re-allocate at .* 50"):
        ds_dynrank.initialize(tiny_llama(), config, total_steps=20)


def test_an_optimizer_without_the_methods_group_is_refused_clearly():
    model = tiny_llama()
    setup = prepare(model, from_ds_config({"dynrank": {"method": "l1ra", "r": 2}}))
    engine = SteppingEngine(model)
    engine.optimizer = torch.optim.AdamW(adapter_parameters(setup.adapters))  # one group: the gates in it too
    with pytest.raises(UserInputError, match=r"the method trains a param group of its own \(group 1\), but the "):
        DynRank(engine, setup, total_steps=20)
    engine.optimizer = torch.optim.AdamW(setup.optimizer_groups())  # the method's groups: accepted
    DynRank(engine, setup, total_steps=20)
    assert engine.optimizer.param_groups[1]["lr"] == setup.cfg.l1ra.gate_lr


def test_prepare_keeps_adapters_a_model_already_has():
    model = tiny_llama()
    cfg = from_ds_config({"dynrank": {"r": 2}})
    first = prepare(model, cfg)
    again = prepare(model, cfg)
    assert [id(layer) for _, layer in again.adapters] == [id(layer) for _, layer in first.adapters]
    assert len(iter_lora(model)) == len(first.adapters) == 14
