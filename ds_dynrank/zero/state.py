"""Adapter tensors read and written in full shape, under ZeRO 0, 1, 2 and 3: fp32 master, Adam moments and the
working (low-precision) copy together.

The `safe_get/set_full_*` accessors are collectives for ZeRO >= 1: every rank must call them for the same
parameters in the same order (we always iterate in `iter_lora` order over a broadcast plan), or the job hangs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)
from torch import nn

from ds_dynrank import dist
from ds_dynrank.errors import UserInputError

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


def _local_piece(p: nn.Parameter, key: str | None) -> torch.Tensor | None:
    """This rank's own piece of p's fp32 master (key None) or Adam moment: a ZeRO-3 partition, a ZeRO-1/2
    fragment, or None where this rank holds nothing of p."""
    if hasattr(p, "ds_id"):
        if not p.requires_grad and key is None:  # a frozen weight has no master: its partition is its value
            return p.ds_tensor.detach().float().flatten().to(p.device)
        piece = safe_get_local_fp32_param(p) if key is None else safe_get_local_optimizer_state(p, key)
        return piece.detach().float().flatten()
    mapping = p._hp_mapping
    return None if mapping is None else mapping.get_hp_fragment(key).detach().float().flatten()


def read_full_flat(params: list[nn.Parameter], key: str | None = None, group=None) -> torch.Tensor:
    """Full fp32 masters (key None) or Adam moments of many DeepSpeed-managed parameters, flattened and
    concatenated, in ONE collective (the per-parameter accessors cost one each)."""
    if not params:
        return torch.zeros(0)
    if hasattr(params[0], "ds_id"):  # ZeRO-3: all-gather every rank's local partitions at once
        local = torch.cat([_local_piece(p, key) for p in params])
        per_rank = [g.split([p.ds_tensor.ds_numel for p in params]) for g in dist.all_gather(local, group=group)]
        return torch.cat([torch.cat([c[i] for c in per_rank])[: p.ds_numel] for i, p in enumerate(params)]).cpu()
    sizes = [p.numel() for p in params]
    flat = torch.zeros(sum(sizes), dtype=torch.float32, device=params[0].device)
    offset = 0
    for p, size in zip(params, sizes):  # ZeRO-1/2, bf16: each rank fills the fragments it owns, then one sum
        piece = _local_piece(p, key)
        if piece is not None:
            start = offset + p._hp_mapping.lp_fragment_address.start
            flat[start : start + piece.numel()].copy_(piece)
        offset += size
    return dist.all_reduce_sum(flat, group=getattr(params[0], "_dp_group", group)).cpu()


def read_full_fp32_flat(params: list[nn.Parameter], group=None) -> torch.Tensor:
    """Full fp32 masters of many parameters in one collective (ZeRO-0 fp32: the parameters themselves; plain
    tensors, such as adapters held as buffers, are whole on every rank and read as they are)."""
    if any(not isinstance(p, nn.Parameter) for p in params):
        managed = read_full_fp32_flat([p for p in params if isinstance(p, nn.Parameter)], group)
        pieces = iter(managed.split([full_numel(p) for p in params if isinstance(p, nn.Parameter)]))
        return torch.cat(
            [next(pieces) if isinstance(p, nn.Parameter) else p.detach().float().flatten().cpu() for p in params]
        )
    if params and not _managed(params[0]):
        return torch.cat([p.detach().float().flatten() for p in params]).cpu()
    return read_full_flat(params, None, group)


def working_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Collective under ZeRO-3: every tensor's working (module) value as this rank computes with it, whole, on the
    CPU: gathered from the partitions under ZeRO-3, else this rank's own replica. Ranks compare these to show
    they train the same model."""
    import deepspeed

    partitioned = [t for t in tensors if hasattr(t, "ds_id")]
    with deepspeed.zero.GatheredParameters(partitioned, enabled=bool(partitioned)):
        return [t.detach().float().cpu().clone() for t in tensors]


@dataclass
class FullState:
    """One parameter's full fp32 value and Adam moments, on the CPU."""

    value: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


def _buffer_state(t: torch.Tensor) -> FullState:
    value = t.detach().float().cpu().clone()
    return FullState(value, torch.zeros_like(value), torch.zeros_like(value))


class StateIO:
    """Full-shape access to an engine's adapter state, whatever the ZeRO stage (collective for ZeRO >= 1)."""

    def __init__(self, engine) -> None:
        self.engine = engine
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
        return self.read_many([p])[0]

    def read_many(self, params: list[nn.Parameter]) -> list[FullState]:
        """Full fp32 value and both moments of every parameter: three collectives in all, whatever the count.
        Plain tensors (adapters module allocation holds as buffers) are whole on every rank, with no moments."""
        if any(not isinstance(p, nn.Parameter) for p in params):
            managed = iter(self.read_many([p for p in params if isinstance(p, nn.Parameter)]))
            return [next(managed) if isinstance(p, nn.Parameter) else _buffer_state(p) for p in params]
        if not params:
            return []
        if not _managed(params[0]):
            states = [self._plain_state(p) for p in params]
            return [
                FullState(p.data.float().cpu().clone(), *(st[k].float().cpu().clone() for k in MOMENTS))
                for p, st in zip(params, states)
            ]
        self._link_optimizer_fragments()
        try:
            flats = [read_full_flat(params, key) for key in (None, *MOMENTS)]
        except (KeyError, ValueError) as err:
            raise RuntimeError(f"optimizer state is not readable yet (needs one applied step): {err}") from None
        sizes = [full_numel(p) for p in params]
        parts = [flat.split(sizes) for flat in flats]
        return [FullState(*(part[i].view(full_shape(p)).clone() for part in parts)) for i, p in enumerate(params)]

    def write(self, p: nn.Parameter, new: FullState) -> None:
        """Master, moments and working copy take the new full values (the same on every rank). Each rank writes
        only the pieces it holds: no communication."""
        with torch.no_grad():
            if not _managed(p):
                state = self._plain_state(p)
                p.data.copy_(new.value.to(p.device, p.dtype))
                for key in MOMENTS:
                    state[key].copy_(getattr(new, key).to(state[key].device, state[key].dtype))
                return
            self._link_optimizer_fragments()
            fields = {None: new.value, "exp_avg": new.exp_avg, "exp_avg_sq": new.exp_avg_sq}
            if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of the flattened tensor (zero padded)
                size = p.ds_tensor.ds_numel
                start = dist.rank(getattr(p, "ds_process_group", None)) * size
                for key, full in fields.items():
                    piece = torch.zeros(size, dtype=torch.float32)
                    chunk = full.flatten()[start : start + size]
                    piece[: chunk.numel()] = chunk
                    piece = piece.to(self.engine.device)
                    if key is None:
                        safe_set_local_fp32_param(p, piece)
                        p.ds_tensor.data.copy_(piece.to(p.ds_tensor.dtype))
                    else:
                        safe_set_local_optimizer_state(p, piece, key)
                return
            mapping = p._hp_mapping
            if mapping is not None:  # ZeRO-1/2, bf16: this rank's fragment of the flat fp32 partition
                address = mapping.lp_fragment_address
                for key, full in fields.items():
                    chunk = full.flatten()[address.start : address.start + address.numel]
                    mapping.get_hp_fragment(key).data.copy_(chunk.to(self.engine.device))
            p.data.copy_(new.value.to(p.device, p.dtype))  # the working copy is whole on every rank

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
    groups = engine.optimizer.param_groups
    if group_index >= len(groups):
        raise UserInputError(
            f"dynrank: the method trains a param group of its own (group {group_index}), but the optimizer has "
            f"{len(groups)}: build the engine with ds_dynrank.initialize(), which hands DeepSpeed the method's "
            "groups"
        )
    groups[group_index]["lr"] = lr


def stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def loss_scale(engine) -> float:
    """The factor an fp16 engine multiplied the loss (and so every gradient) by; 1 otherwise."""
    return float(engine.optimizer.cur_scale) if engine.fp16_enabled() else 1.0
