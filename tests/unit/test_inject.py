"""Target selection follows PEFT's rules; a selection that matches nothing is a clear error."""

from __future__ import annotations

import pytest
from helpers import tiny_llama

from ds_dynrank import DynRankConfig, inject_lora, select_targets
from ds_dynrank.errors import UserInputError

LAYER = [
    "mlp.down_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "self_attn.k_proj",
    "self_attn.o_proj",
    "self_attn.q_proj",
    "self_attn.v_proj",
]


def test_all_linear_skips_the_output_head():
    names = select_targets(tiny_llama(), DynRankConfig())
    assert names == [f"model.layers.{i}.{n}" for i in range(2) for n in LAYER]


def test_name_list_regex_and_exclude():
    model = tiny_llama()
    assert select_targets(model, DynRankConfig(target_modules=["q_proj", "mlp.up_proj"])) == [
        "model.layers.0.mlp.up_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert select_targets(model, DynRankConfig(target_modules=r".*\.1\.self_attn\.(q|v)_proj")) == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    cfg = DynRankConfig(target_modules=["q_proj"], exclude_modules=["layers.0.self_attn.q_proj"])
    assert select_targets(model, cfg) == ["model.layers.1.self_attn.q_proj"]


def test_no_match_lists_the_available_names():
    with pytest.raises(UserInputError, match=r"matched no Linear/Conv1D .*down_proj, gate_proj, k_proj, lm_head"):
        select_targets(tiny_llama(), DynRankConfig(target_modules=["query"]))


def test_rank_and_alpha_patterns_and_capacity():
    model = tiny_llama()
    cfg = DynRankConfig(
        r=4, rank_pattern={"v_proj": 2, r"layers\.1\.mlp\..*": 6}, alpha_pattern={"q_proj": 4}, capacity=8
    )
    adapters = dict(inject_lora(model, cfg))
    assert adapters["model.layers.0.self_attn.v_proj"].rank == 2
    assert adapters["model.layers.1.mlp.up_proj"].rank == 6
    assert adapters["model.layers.0.mlp.up_proj"].rank == 4
    assert adapters["model.layers.0.self_attn.q_proj"].scaling == 1.0
    assert adapters["model.layers.0.self_attn.k_proj"].scaling == 4.0
    assert {a.capacity for a in adapters.values()} == {8}
