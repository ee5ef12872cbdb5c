"""Load a causal LM and its tokenizer from the embedded default, a local directory, a .gguf file or a hub name.

The scale path lives here: the base model is built in the training precision (bf16/fp16 configs load bf16/fp16
weights; only the adapters get fp32 masters, from DeepSpeed), and under ZeRO-3 inside DeepSpeed's partitioned
init (transformers' integration), so no rank ever holds the whole base model and only rank 0 reads the weights.
A directory holding only a `config.json` gives a random-initialised model of that shape, for cost and memory work.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ds_dynrank.errors import UserInputError
from ds_dynrank.launch_env import launch_rank
from ds_dynrank.task import assets

WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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


def is_untrained(source: str, kwargs: dict) -> bool:
    """A local directory with a config.json and no weight files: the model is built from the config."""
    path = Path(source)
    return not kwargs and path.is_dir() and not any(any(path.glob(g)) for g in WEIGHT_GLOBS)


def _has_tokenizer(source: str, kwargs: dict) -> bool:
    path = Path(source)
    return bool(kwargs) or not path.is_dir() or any((path / f).is_file() for f in TOKENIZER_FILES)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_config(name_or_path: str | None):
    """The model's transformers config (no weights read)."""
    from transformers import AutoConfig

    source, kwargs = resolve_model(name_or_path)
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise UserInputError(f"--model: could not read the config of {name_or_path!r}: {_first_line(err)}") from None


def load_tokenizer(name_or_path: str | None):
    """The tokenizer, padding on the right. A config-only directory without one borrows the default model's
    tokenizer (its ids must fit the config's vocabulary)."""
    from transformers import AutoTokenizer

    source, kwargs = resolve_model(name_or_path)
    if not _has_tokenizer(source, kwargs):
        vocab = getattr(load_config(name_or_path), "vocab_size", None)
        source, kwargs = str(assets.default_model_dir()), {}
        tokenizer = AutoTokenizer.from_pretrained(source)
        if vocab is not None and len(tokenizer) > vocab:
            raise UserInputError(
                f"--model: {name_or_path} has no tokenizer, and the default one ({len(tokenizer)} ids) does not fit "
                f"its vocabulary of {vocab}; add a tokenizer to the directory"
            )
        _loud(f"--model: {name_or_path} has no tokenizer; using the default model's ({assets.DEFAULT_MODEL})")
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as err:
            reason = _first_line(err)
            raise UserInputError(f"--model: could not load the tokenizer of {name_or_path!r}: {reason}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def skeleton(name_or_path: str | None) -> nn.Module:
    """The model's modules on the meta device (no memory, no weights): enough to check targets and checkpoints
    before any process group exists, and to refuse a config that is not a causal LM."""
    from transformers import AutoModelForCausalLM

    config = load_config(name_or_path)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as err:
        raise UserInputError(f"--model: {name_or_path!r} is not a causal LM: {_first_line(err)}") from None


def training_dtype(ds_config: dict) -> torch.dtype:
    """The precision the frozen base weights live in: the config's bf16/fp16 when enabled (resolved), else fp32."""
    if ds_config.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return torch.float32


def is_zero3(ds_config: dict | None) -> bool:
    return bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage", 0) == 3


@contextmanager
def _partitioned(ds_config: dict | None) -> Iterator[None]:
    """Inside: transformers builds models under `deepspeed.zero.Init` with this (resolved) config, and only rank 0
    reads weight values. transformers looks for a live HfDeepSpeedConfig; it is dropped on exit, so nothing later
    (generation, resizing) changes behaviour."""
    if not is_zero3(ds_config):
        yield
        return
    import torch._dynamo  # noqa: F401  zero.Init patches tensor construction; import these first (deepspeed-notes)
    from transformers.integrations import HfDeepSpeedConfig

    hold = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference
    try:
        yield
    finally:
        del hold


def load_model(
    name_or_path: str | None, *, dtype: torch.dtype = torch.float32, ds_config: dict | None = None
) -> nn.Module:
    """The model, weights in `dtype`, cache off. With a ZeRO-3 `ds_config` (resolved) the model is built
    partitioned: each rank holds its share of every weight. A config-only directory gives random weights, said
    loudly."""
    from transformers import AutoModelForCausalLM

    source, kwargs = resolve_model(name_or_path)
    untrained = is_untrained(source, kwargs)
    try:
        with _partitioned(ds_config):
            if untrained:
                config = load_config(name_or_path)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise UserInputError(f"--model: could not load {name_or_path!r} as a causal LM: {_first_line(err)}") from None
    if untrained:
        _loud(
            f"--model: {name_or_path} holds a config and no weights: the model is RANDOMLY INITIALISED (untrained), "
            "fit for cost and memory measurements only"
        )
    model.config.use_cache = False
    return model


def load_model_and_tokenizer(
    name_or_path: str | None, dtype: torch.dtype = torch.float32, ds_config: dict | None = None
) -> tuple[nn.Module, object]:
    """The model (see load_model) and a tokenizer that pads on the right."""
    tokenizer = load_tokenizer(name_or_path)
    return load_model(name_or_path, dtype=dtype, ds_config=ds_config), tokenizer


def _loud(message: str) -> None:
    """A warning every user sees once: rank 0 (or a single process) prints it to stderr."""
    if launch_rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)
