"""Loading models for the scale path: config-only directories give random weights (said loudly), the shipped
shapes are the real models' sizes, checks run on a meta-device skeleton, the base precision follows the config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, tiny_llama_config

from ds_dynrank.errors import UserInputError
from ds_dynrank.task import assets
from ds_dynrank.task.models import load_model, load_tokenizer, skeleton, training_dtype

SHIPPED = {  # parameters of the published checkpoints (tied embeddings counted once)
    "smollm2-135m": 134_515_008,
    "qwen2.5-0.5b": 494_032_768,
    "llama-3.2-1b": 1_235_814_400,
    "qwen2.5-1.5b": 1_543_714_304,
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_shapes_are_the_real_models_sizes(name):
    model = skeleton(str(REPO / "benchmarks" / "models" / name))
    assert {p.device.type for p in model.parameters()} == {"meta"}  # no memory spent on the check
    assert sum(p.numel() for p in model.parameters()) == SHIPPED[name]


def test_config_only_directory_is_random_and_said_loudly(tmp_path, capsys):
    tiny_llama_config().save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    torch.manual_seed(0)
    first = load_model(str(tmp_path))
    torch.manual_seed(1)
    second = load_model(str(tmp_path))
    assert "RANDOMLY INITIALISED" in capsys.readouterr().err
    weights = dict(first.named_parameters())
    assert all(torch.isfinite(p).all() for p in weights.values())
    assert not torch.equal(weights["model.layers.0.mlp.up_proj.weight"], second.model.layers[0].mlp.up_proj.weight)
    assert first.config.use_cache is False


def test_config_only_directory_borrows_the_default_tokenizer_only_where_it_fits(tmp_path, capsys):
    default = len(load_tokenizer(None))
    fits, small = tmp_path / "fits", tmp_path / "small"
    tiny_llama_config(vocab_size=default).save_pretrained(fits)
    tiny_llama_config(vocab_size=128).save_pretrained(small)
    assert len(load_tokenizer(str(fits))) == default
    assert f"has no tokenizer; using the default model's ({assets.DEFAULT_MODEL})" in capsys.readouterr().err
    with pytest.raises(UserInputError, match=r"has no tokenizer, and the default one \(\d+ ids\) does not fit"):
        load_tokenizer(str(small))


def test_a_config_that_is_not_a_causal_lm_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    with pytest.raises(UserInputError, match=r"^--model: .* is not a causal LM: "):
        skeleton(str(tmp_path))


def test_base_weights_follow_the_training_precision(tmp_path):
    assert training_dtype({"bf16": {"enabled": True}}) is torch.bfloat16
    assert training_dtype({"fp16": {"enabled": True}}) is torch.float16
    assert training_dtype({"bf16": {"enabled": False}}) is torch.float32
    assert training_dtype({}) is torch.float32
    tiny_llama_config().save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype=training_dtype({"bf16": {"enabled": True}}))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_model_directory_is_refused():
    with pytest.raises(UserInputError, match="local path not found"):
        skeleton(str(Path("/nonexistent") / "model"))
