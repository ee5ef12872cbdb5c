"""The engine's life cycle for the physical backend: what survives a rebuild, tearing the old engine down so it can be
freed, and initializing a new one over the same module without re-broadcasting the frozen base model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ds_dynrank import dist
from ds_dynrank.zero.state import stage


@dataclass
class EngineCarry:
    """What must survive an engine rebuild besides the adapters' own state."""

    adam_step: torch.Tensor | None
    counters: dict
    scheduler_state: dict | None
    group_lrs: list[float]
    monitor: object


_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
_OPTIMIZER_LINKS = ("_z3_optimizer", "_zero_optimizer")  # ZeRO-3 on every parameter; ZeRO-1/2 under offload


def _adam_state(engine) -> dict:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt).state


def capture(engine) -> EngineCarry:
    states = list(_adam_state(engine).values())
    step = states[0].get("step") if states else None
    return EngineCarry(
        adam_step=step.clone() if torch.is_tensor(step) else step,
        counters={k: getattr(engine, k) for k in _COUNTERS},
        scheduler_state=engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        group_lrs=[g["lr"] for g in engine.optimizer.param_groups],
        monitor=engine.monitor,
    )


def teardown(engine) -> None:
    """Free an engine so its module can be wrapped again: DeepSpeed's destroy() leaves hooks and ZeRO-3 state
    on the module that keep the old engine (and its optimizer state) alive and running."""
    if stage(engine) == 3:  # release parameters an eval pass left gathered; engine.empty_partition_cache() would
        engine.optimizer.empty_partition_cache()  # add a full gc.collect (~0.5 s) that cannot free the engine yet
    engine.destroy()
    for p in engine.module.parameters():  # back links to the optimizer that destroy() leaves: a caller still
        for link in _OPTIMIZER_LINKS:  # holding one replaced layer kept the whole old engine and its state alive
            p.__dict__.pop(link, None)  # (the new engine links the parameters it keeps again)
    for name in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(engine, name, None)
        if handle is not None:
            handle.remove()
            setattr(engine, name, None)
    if stage(engine) == 3:
        from deepspeed.runtime.zero import parameter_offload
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

        for module in engine.module.modules():  # backward functions that close over the old coordinator
            for attr in ("pre_bwd_fn", "post_bwd_fn", "applied_pre_backward_ref_cnt"):
                module.__dict__.pop(attr, None)
        cached = PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release
        for cell in getattr(cached, "__closure__", None) or ():
            if hasattr(cell.cell_contents, "cache_clear"):
                cell.cell_contents.cache_clear()  # its keys hold every coordinator ever built
        stack = parameter_offload.FWD_MODULE_STACK
        stack[:] = [m for m in stack if m is not engine.module]


def reinitialize(
    module: nn.Module, groups: list[dict], ds_config: dict, carry: EngineCarry, restore, *, make_optimizer=None
):
    """A fresh engine over `module` (same config, TensorBoard left to the carried monitor), with counters, LRs,
    scheduler and Adam step carried over. `restore(engine)` then writes the adapters' moments back.
    `make_optimizer(groups)`: the client optimizer, where the first engine had one (HF Trainer's)."""
    import deepspeed

    config = {**ds_config, "tensorboard": {"enabled": False}}
    given = {"model_parameters": groups} if make_optimizer is None else {"optimizer": make_optimizer(groups)}
    with _broadcasting_trainable_only():
        engine, *_ = deepspeed.initialize(model=module, config=config, **given)
    engine.monitor = carry.monitor
    for key, value in carry.counters.items():
        setattr(engine, key, value)
    if carry.scheduler_state is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(carry.scheduler_state)
    for group, lr in zip(engine.optimizer.param_groups, carry.group_lrs):
        group["lr"] = lr
    _prime_adam_state(engine, carry.adam_step)
    restore(engine)
    return engine


@contextmanager
def _broadcasting_trainable_only() -> Iterator[None]:
    """`deepspeed.initialize` broadcasts every replicated parameter from rank 0 (`_broadcast_model`): at a rebuild
    that is the whole frozen base model again (hundreds of MB per event for a 135M model), though the first
    initialize already made it identical and nothing has written it since. Inside this block a new engine
    broadcasts only its trainable parameters, the ones the rebuild created. MoE models keep DeepSpeed's own."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import groups

    original = DeepSpeedEngine.__dict__.get("_broadcast_model")
    if original is None:  # a DeepSpeed without it: nothing to narrow
        yield
        return

    def broadcast_trainable(engine) -> None:
        if engine.dist_backend is None or engine.has_moe_layers:
            return original(engine)
        src = groups._get_broadcast_src_rank()
        for p in engine.module.parameters():
            partitioned = getattr(p, "ds_status", ZeroParamStatus.AVAILABLE) is not ZeroParamStatus.AVAILABLE
            if p.requires_grad and not partitioned:  # as bytes, like DeepSpeed: any dtype on any backend
                dist.broadcast(p.data.view(torch.uint8), src=src, group=engine.seq_data_parallel_group)

    DeepSpeedEngine._broadcast_model = broadcast_trainable
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = original


def _prime_adam_state(engine, step) -> None:
    """Adam creates its state at the first step; write it now so the carried moments have a home. The moments
    sit beside their partition (on the host under offload_optimizer), the step keeps its type."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    flats = (
        getattr(opt, "single_partition_of_fp32_groups", None)
        or getattr(opt, "fp32_partitioned_groups_flat", None)
        or getattr(opt, "fp32_groups_flat_partition", None)
    )
    targets = flats if flats else [p for g in inner.param_groups for p in g["params"]]
    for t in targets:
        inner.state[t] = {"step": _step_copy(step), "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}


def _step_copy(step):
    """The carried Adam step, as its optimizer counts it: torch's Adam in a tensor, DeepSpeedCPUAdam (ZeRO-Offload)
    in an int that its cpu_adam op takes as a size_t. No step yet: torch's convention."""
    if torch.is_tensor(step):
        return step.clone()
    return torch.tensor(0.0) if step is None else int(step)
