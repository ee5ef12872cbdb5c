"""Load a causal LM and its tokenizer from the embedded default, a local directory, a .gguf file or a hub name."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ds_dynrank.errors import UserInputError
from ds_dynrank.task import assets


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or os.sep * 2 in name


def resolve_model(name_or_path: str | None) -> tuple[str, dict]:
    """(what to pass to from_pretrained, extra kwargs). Raises a clear error for a missing local path."""
    if name_or_path in (None, "", "default", assets.DEFAULT_MODEL):
        return str(assets.default_model_dir()), {}
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return str(path.parent), {"gguf_file": path.name}
        if not (path / "config.json").is_file():
            raise UserInputError(f"--model: {path} is not a Hugging Face model directory (no config.json)")
        return str(path), {}
    if _looks_like_path(name_or_path) or name_or_path.count("/") > 1:
        raise UserInputError(f"--model: local path not found: {name_or_path}")
    return name_or_path, {}  # a hub name such as Qwen/Qwen2.5-0.5B


def load_model_and_tokenizer(name_or_path: str | None, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """The model in train mode (weights in `dtype`) and a tokenizer that pads on the right."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserInputError(f"--model: could not load {name_or_path!r} as a causal LM: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.use_cache = False
    return model, tokenizer
