"""The only module that touches DeepSpeed's partitioned state: adapter tensors read and written in full shape,
fp32 master, Adam moments and the working (low-precision) copy together, under ZeRO 0, 1, 2 and 3.

The `safe_get/set_full_*` accessors are collectives for ZeRO >= 1: every rank must call them for the same
parameters in the same order (we always iterate in `iter_lora` order over a broadcast plan), or the job hangs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from deepspeed import zero
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_get_local_fp32_param,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
)
from torch import nn

from ds_dynrank import dist

MOMENTS = ("exp_avg", "exp_avg_sq")


def full_numel(p: nn.Parameter) -> int:
    """Elements of the whole parameter, also when ZeRO-3 has partitioned it (numel() is then 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def full_shape(p: nn.Parameter) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)


def _managed(p: nn.Parameter) -> bool:
    """Does DeepSpeed hold a separate fp32 master for p (ZeRO 1-3, or its bf16/fp16 optimizers)?"""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")  # _hp_mapping is None on ranks holding no fragment


def read_full_fp32(p: nn.Parameter) -> torch.Tensor:
    """The full fp32 master value of `p` on the CPU: the optimizer's copy under ZeRO 1-3 and bf16, else p itself."""
    full = safe_get_full_fp32_param(p)
    if full is None:  # ZeRO-0 in fp32: the module's parameter is the master
        full = p.data
    return full.detach().float().cpu().clone()


def read_full_fp32_flat(params: list[nn.Parameter], group=None) -> torch.Tensor:
    """Full fp32 masters of many parameters, flattened and concatenated, in ONE collective (the per-parameter
    accessors cost one collective each). Same result as concatenating read_full_fp32 over `params`."""
    if not params:
        return torch.zeros(0)
    if hasattr(params[0], "ds_id"):  # ZeRO-3: all-gather every rank's local partitions at once
        local = torch.cat([safe_get_local_fp32_param(p).detach().float().flatten() for p in params])
        gathered = dist.all_gather(local, group=group)
        per_rank = [g.split([p.ds_tensor.ds_numel for p in params]) for g in gathered]
        full = [torch.cat([chunks[i] for chunks in per_rank])[: p.ds_numel] for i, p in enumerate(params)]
        return torch.cat(full).cpu()
    if not hasattr(params[0], "_hp_mapping"):  # ZeRO-0 in fp32: parameters are the masters, whole on every rank
        return torch.cat([p.detach().float().flatten() for p in params]).cpu()
    sizes = [p.numel() for p in params]
    flat = torch.zeros(sum(sizes), dtype=torch.float32, device=params[0].device)
    offset = 0
    for p, size in zip(params, sizes):  # ZeRO-1/2, bf16: each rank fills the fragments it owns, then one sum
        mapping = p._hp_mapping
        if mapping is not None:
            start = offset + mapping.lp_fragment_address.start
            flat[start : start + mapping.lp_fragment_address.numel].copy_(mapping.get_hp_fragment().data.flatten())
        offset += size
    dist.all_reduce_sum(flat, group=getattr(params[0], "_dp_group", group))
    return flat.cpu()


@dataclass
class FullState:
    """One parameter's full fp32 value and Adam moments, on the CPU."""

    value: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


class StateIO:
    """Full-shape access to an engine's adapter state, whatever the ZeRO stage (collective for ZeRO >= 1)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        self._fragments_linked = False

    def _link_optimizer_fragments(self) -> None:
        """Work around a DeepSpeed 0.19 bug: ZeRO-1/2 (and the bf16 optimizer) link each parameter to its slice
        of the Adam state lazily, after stepping param group 0 only, then mark the linking done, so parameters
        of any other group (L1RA's gates) never get their moments. Re-link once every group has state."""
        opt = self.engine.optimizer
        if self._fragments_linked or not hasattr(opt, "_hp_optimizer_states_linked"):
            return
        flats = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_groups_flat_partition", [])
        if not flats or not all(opt.optimizer.state.get(flat) for flat in flats):
            return
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
        self._fragments_linked = True

    def _plain_state(self, p: nn.Parameter) -> dict:
        state = self.engine.optimizer.state.get(p)
        if not state or "exp_avg" not in state:
            raise RuntimeError("optimizer state is empty: re-allocation needs at least one applied optimizer step")
        return state

    def read(self, p: nn.Parameter) -> FullState:
        if not _managed(p):
            state = self._plain_state(p)
            return FullState(p.data.float().cpu().clone(), *(state[k].float().cpu().clone() for k in MOMENTS))
        self._link_optimizer_fragments()
        moments = []
        for key in MOMENTS:
            m = safe_get_full_optimizer_state(p, key)
            if m is None:
                raise RuntimeError("optimizer state is empty: re-allocation needs at least one applied optimizer step")
            moments.append(m.detach().float().cpu().clone())
        return FullState(read_full_fp32(p), *moments)

    def write(self, p: nn.Parameter, new: FullState) -> None:
        """Master, moments and the working copy all take the new full values (identical on every rank)."""
        if not _managed(p):
            state = self._plain_state(p)
            with torch.no_grad():
                p.data.copy_(new.value.to(p.device, p.dtype))
                for key in MOMENTS:
                    state[key].copy_(getattr(new, key).to(state[key].device, state[key].dtype))
            return
        self._link_optimizer_fragments()
        device = self.engine.device
        safe_set_full_fp32_param(p, new.value.to(device))
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, getattr(new, key).to(device), key)
        self._write_working_copy(p, new.value)

    def _write_working_copy(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """The copy the forward uses; DeepSpeed would only refresh it from the master at the next step."""
        if hasattr(p, "ds_id"):  # ZeRO-3: gather, let rank 0 modify, re-partition on exit
            with zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                p.data.copy_(value.to(p.device, p.dtype))
        else:
            with torch.no_grad():
                p.data.copy_(value.to(p.device, p.dtype))

    def map_master(self, p: nn.Parameter, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply an elementwise `fn` (f(0) must be 0) to p's fp32 master and working copy in place, touching only
        this rank's fragments: no communication, so it can run every step."""
        with torch.no_grad():
            if hasattr(p, "ds_id"):  # ZeRO-3: local fp32 partition and local working partition
                safe_set_local_fp32_param(p, fn(safe_get_local_fp32_param(p).float()))
                p.ds_tensor.data.copy_(fn(p.ds_tensor.data.float()).to(p.ds_tensor.dtype))
                return
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:  # ZeRO-1/2 or bf16: this rank's slice of the flat fp32 partition
                fragment = mapping.get_hp_fragment()
                fragment.data.copy_(fn(fragment.data.float()).to(fragment.dtype))
            p.data.copy_(fn(p.data.float()).to(p.dtype))  # the working copy is whole on every rank


def set_group_lr(engine, group_index: int, lr: float) -> None:
    """Pin one optimizer param group's learning rate (DeepSpeed's schedulers set every group alike)."""
    engine.optimizer.param_groups[group_index]["lr"] = lr


def stage(engine) -> int:
    return int(engine.zero_optimization_stage())
