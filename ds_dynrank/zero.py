"""The only module that touches DeepSpeed's partitioned state: full-shape reads of adapter tensors, any ZeRO stage.

The `safe_get_full_*` accessors are collectives for ZeRO >= 1: every rank must call them for the same parameters
in the same order (we always iterate in `iter_lora` order), or the job hangs.
"""

from __future__ import annotations

import torch
from deepspeed.utils import safe_get_full_fp32_param
from torch import nn


def full_numel(p: nn.Parameter) -> int:
    """Elements of the whole parameter, also when ZeRO-3 has partitioned it (numel() is then 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def read_full_fp32(p: nn.Parameter) -> torch.Tensor:
    """The full fp32 master value of `p` on the CPU: the optimizer's copy under ZeRO 1-3 and bf16, else p itself."""
    full = safe_get_full_fp32_param(p)
    if full is None:  # ZeRO-0 in fp32: the module's parameter is the master
        full = p.data
    return full.detach().float().cpu().clone()


def stage(engine) -> int:
    return int(engine.zero_optimization_stage())
