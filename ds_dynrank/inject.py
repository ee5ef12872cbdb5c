"""Find the modules to adapt (PEFT's matching rules) and swap them for LoRALinear, base weights frozen."""

from __future__ import annotations

import re

from torch import nn

from ds_dynrank.config import CoreConfig
from ds_dynrank.errors import UserInputError
from ds_dynrank.lora import Conv1D, LoRALinear, iter_lora

ADAPTABLE = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


def _matches_name(name: str, keys: list[str]) -> bool:
    return any(name == k or name.endswith("." + k) for k in keys)


def _pattern_value(name: str, pattern: dict, default):
    """PEFT's rule: the first key that matches the end of the name (`(.*\\.)?key$`) wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _output_head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def select_targets(model: nn.Module, cfg: CoreConfig) -> list[str]:
    """Names of the Linear/Conv1D modules `cfg.target_modules` selects, sorted. Errors if none match."""
    linear = [n for n, m in model.named_modules() if isinstance(m, ADAPTABLE) and n]
    if cfg.target_modules == "all-linear":
        heads = _output_head_names(model)
        chosen = [n for n in linear if n not in heads]
    elif isinstance(cfg.target_modules, str):
        chosen = [n for n in linear if re.fullmatch(cfg.target_modules, n)]
    else:
        chosen = [n for n in linear if _matches_name(n, cfg.target_modules)]
    chosen = sorted(n for n in chosen if not _matches_name(n, cfg.exclude_modules))
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise UserInputError(
            f"dynrank.target_modules: {cfg.target_modules!r} matched no Linear/Conv1D module of the model "
            f"(its linear layers are named: {', '.join(leaves)})"
        )
    return chosen


def inject_lora(model: nn.Module, cfg: CoreConfig) -> list[tuple[str, LoRALinear]]:
    """Freeze every base parameter and wrap each selected module in a LoRALinear. Returns iter_lora(model)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in select_targets(model, cfg):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        rank = _pattern_value(name, cfg.rank_pattern, cfg.r)
        layer = LoRALinear(
            getattr(parent, child),
            rank=rank,
            capacity=cfg.slot_capacity(rank),
            alpha=_pattern_value(name, cfg.alpha_pattern, cfg.lora_alpha),
            dropout=cfg.lora_dropout,
            gate=cfg.use_gate,
            use_rslora=cfg.use_rslora,
            init=cfg.init_lora_weights,
        )
        setattr(parent, child, layer)
    return iter_lora(model)
