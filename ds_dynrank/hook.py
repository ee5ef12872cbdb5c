"""DynRank: the engine hook. Call `after_step()` after every `engine.step()`; it does the rest, collectively.

At every accumulation boundary: the method's per-step work (L1RA's proximal step, AdaLoRA's sensitivity,
module-allocation importance). When the schedule says so: local scores -> one all-reduce -> rank 0 decides
(pure) -> one broadcast -> every rank applies the plan in the same module order -> checksums compared across
ranks -> TensorBoard and allocation_history.json.
"""

from __future__ import annotations

import gc
import time
import warnings
from pathlib import Path

import torch

from ds_dynrank import dist, monitor, outputs
from ds_dynrank.allocation import Plan, budget_used
from ds_dynrank.config import DynRankConfig
from ds_dynrank.errors import UserInputError
from ds_dynrank.lora import adapter_state_tensors, iter_lora
from ds_dynrank.methods import build_method
from ds_dynrank.methods.base import Adapters, Bounds
from ds_dynrank.reshape import apply_activity, apply_masked, physical_layers, swap_layers
from ds_dynrank.zero import StateIO, capture, reinitialize, teardown


class MissedAllocationError(RuntimeError):
    """A dynamic method was configured but nothing drove its allocation events."""


class AllocationMismatchError(RuntimeError):
    """Ranks hold different allocations after an event: continuing would silently train different models."""


def optimizer_groups(cfg: DynRankConfig, adapters: Adapters, *, fresh: bool = True) -> list[dict]:
    """The `model_parameters` to hand to deepspeed.initialize (methods may need their own groups). For a fresh
    run, module allocation also picks its initial active set here, before DeepSpeed sees the parameters; a resumed
    run (`fresh=False`) keeps the activity its checkpoint restored."""
    method = build_method(cfg)
    if fresh:
        method.prepare(adapters)
    return method.optimizer_groups(adapters)


class DynRank:
    def __init__(self, engine, cfg: DynRankConfig, adapters: Adapters, *, total_steps: int,
                 output_dir: Path | None = None, ds_config: dict | None = None, steps_per_epoch: int | None = None,
                 validation: dict | None = None) -> None:  # fmt: skip
        """`engine` may be replaced by a physical re-allocation: always use `dynrank.engine` after `after_step()`.
        `ds_config` (the dict given to deepspeed.initialize) is needed by the physical backend to rebuild it.
        `validation`: a fixed batch (input_ids, attention_mask, labels) for methods that score on one (ALoRA)."""
        if cfg.dynamic and cfg.reshape.backend == "physical" and ds_config is None:
            raise ValueError("the physical backend needs ds_config to rebuild the engine")
        self.engine, self.cfg, self.adapters, self.output_dir = engine, cfg, adapters, output_dir
        self.ds_config = ds_config
        self.method = build_method(cfg)
        if self.method.needs_validation and validation is None:
            raise UserInputError(f"dynrank.method: {cfg.method!r} scores ranks on a validation batch, and none was "
                                 "given (DynRank(..., validation=batch))")  # fmt: skip
        self.method.validation = validation
        self.schedule = self.method.schedule(total_steps, steps_per_epoch)
        if cfg.dynamic and self.schedule.start >= total_steps:  # launch/train.py refuses this; a library user
            warnings.warn(f"dynrank: no scheduled event within {total_steps} steps "  # may call reallocate()
                          f"(first at {self.schedule.start})", stacklevel=2)  # fmt: skip
        self.io = StateIO(engine)
        self.applied_steps = 0
        self._seen_global_steps = engine.global_steps
        physical = cfg.reshape.backend == "physical"
        cost_M = [layer.rank_cost() for _, layer in adapters]
        self.bounds = Bounds(
            floor=cfg.budget.floor,
            cap_M=[cfg.budget.cap or (4 * layer.init_rank if physical else layer.capacity) for _, layer in adapters],
            cost_M=cost_M,
            unit=cfg.budget.unit,
            initial_budget=budget_used(self.ranks(), cost_M, cfg.budget.unit),
        )
        self.budget = self.bounds.initial_budget  # the budget to hold
        self.history: list[dict] = []
        self.method.on_attach(engine, adapters)
        self._warned_missed = False
        if cfg.dynamic:  # the model's forward runs every step, whoever drives the loop
            engine.module.register_forward_pre_hook(self._check_driven)
        self._record(step=0, slots_changed=0, seconds=0.0)

    def _check_driven(self, *_) -> None:
        """Loud failure instead of silent plain LoRA: the first event is due and after_step() never ran."""
        steps = self.engine.global_steps - self.engine.skipped_steps
        if self.applied_steps >= self.schedule.start or steps < self.schedule.start or self._warned_missed:
            return
        message = (
            f"dynrank: method {self.cfg.method!r} should have re-allocated at optimizer step {self.schedule.start}, "
            f"but DynRank.after_step() was not called after engine.step() ({steps} steps applied, "
            f"{self.applied_steps} seen): the run would silently train plain LoRA. Call dynrank.after_step() after "
            "every engine.step(), or set dynrank.on_missed_event to 'warn'."
        )
        if self.cfg.on_missed_event == "error":
            raise MissedAllocationError(message)
        self._warned_missed = True
        warnings.warn(message, stacklevel=2)

    def state_dict(self) -> dict:
        """What a checkpoint needs beyond DeepSpeed's own state (masks and gates are module state already)."""
        return {"version": 1, "method": self.cfg.method, "applied_steps": self.applied_steps,
                "history": self.history, "budget": self.budget, "active": self.active(),
                "method_state": self.method.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint: call after engine.load_checkpoint (DeepSpeed restored its counters)."""
        if state.get("method") != self.cfg.method:
            raise ValueError(f"checkpoint method {state.get('method')!r} != config method {self.cfg.method!r}")
        self.applied_steps, self.history, self.budget = state["applied_steps"], state["history"], state["budget"]
        self._seen_global_steps = self.engine.global_steps
        for (_, layer), on in zip(self.adapters, state.get("active") or self.active()):
            layer.set_trainable(on)  # the physical backend built the model with this activity already
        self.method.load_state_dict(state.get("method_state", {}))
        self.method.on_attach(self.engine, self.adapters)
        if self.output_dir is not None and dist.is_main():
            outputs.write_json(self.output_dir / "allocation_history.json", self.history)
            outputs.write_json(self.output_dir / "allocation.json", self.history[-1]["ranks"])

    def ranks(self) -> list[int]:
        return [layer.rank for _, layer in self.adapters]

    def active(self) -> list[bool]:
        """Which modules train now (all, unless the method allocates modules)."""
        return [layer.trainable for _, layer in self.adapters]

    def trainable_parameters(self) -> int:
        """Adapter parameters that receive gradients now: live slots of modules that train."""
        return sum(layer.rank * layer.rank_cost() for _, layer in self.adapters if layer.trainable)

    def budget_in_use(self) -> int:
        return budget_used(self.ranks(), self.bounds.cost_M, self.bounds.unit)

    def penalty(self) -> torch.Tensor | float:
        """Loss term added before backward (0: L1RA's L1 is a decoupled proximal step)."""
        return 0.0

    def after_step(self) -> dict | None:
        """Call after every engine.step(). Does nothing mid-accumulation or after a skipped (overflow) step."""
        if self.engine.global_steps == self._seen_global_steps:
            return None  # not a gradient-accumulation boundary
        self._seen_global_steps = self.engine.global_steps
        applied = self.engine.was_step_applied()  # False on fp16 overflow: DeepSpeed skipped the update
        self.applied_steps += int(applied)
        self.method.after_boundary(self.engine, self.io, self.adapters, applied)
        if not applied:
            return None  # not a step for us either
        if self.cfg.dynamic and self.schedule.due(self.applied_steps):
            return self.reallocate()
        return None

    def reallocate(self, plan: Plan | None = None) -> dict:
        """One collective event. `plan` forces a decision (tests); otherwise the method takes it on rank 0."""
        start = time.perf_counter()
        live, active = [layer.live_slots() for _, layer in self.adapters], self.active()
        capacity_M = [layer.capacity for _, layer in self.adapters]
        scores = self.method.local_scores(self.engine, self.io, self.adapters).float().to(self.engine.device)
        scores = dist.all_reduce_sum(scores)
        scores = (scores if self.method.score_reduction == "sum" else scores / dist.world_size()).cpu()
        if plan is None and not torch.isfinite(scores).all():
            warnings.warn(f"dynrank: non-finite scores at step {self.applied_steps}; event skipped", stacklevel=2)
            return {}
        if dist.is_main():
            decided = plan or self.method.decide(scores, self.adapters, self.bounds, self.applied_steps)
            encoded = decided.encode(capacity_M)
        else:
            encoded = torch.zeros(sum(capacity_M) + 2 * len(capacity_M), dtype=torch.int64)
        plan = Plan.decode(dist.broadcast(encoded.to(self.engine.device), src=0).cpu(), capacity_M)
        changed_slots, changed_modules = plan.slots_changed(live), sum(plan.changes(live, active))
        if changed_modules:  # when nothing moves, no state is touched and no engine is rebuilt
            if self.cfg.reshape.backend == "physical":
                self.rebuild(plan)
            else:
                apply_masked(plan, self.adapters, self.io, seed=self.cfg.seed, step=self.applied_steps)
                if plan.active is not None:
                    apply_activity(plan.active, self.adapters, self.io)
        self.method.after_apply(plan, live, self.adapters)
        self.check_consistent()
        return self._record(self.applied_steps, changed_slots, time.perf_counter() - start, changed_modules)

    def rebuild(self, plan: Plan) -> None:
        """Physical backend: gather every adapter's full state, build layers at the new ranks, rebuild the engine
        over them and write the carried fp32 values and Adam moments back. Pruned ranks free their memory."""
        states = self.io.read_many(adapter_state_tensors(self.adapters))
        rebuilt = physical_layers(plan, self.adapters, states, seed=self.cfg.seed, step=self.applied_steps)
        for (layer, _), on in zip(rebuilt, plan.active or self.active()):
            layer.set_trainable(on, as_buffers=True)  # inactive: no gradient, no master, no Adam state
        carry = capture(self.engine)
        model = self.engine.module
        teardown(self.engine)
        self.engine = self.io = None
        swap_layers(model, self.adapters, [layer for layer, _ in rebuilt])
        self.adapters = iter_lora(model)

        def restore(engine) -> None:
            io = StateIO(engine)
            for (_, carried), (_, live_layer) in zip(rebuilt, self.adapters):
                for p, state in zip(live_layer.adapter_tensors().values(), carried):
                    if isinstance(p, torch.nn.Parameter):  # buffers already hold their values
                        io.write(p, state)

        groups = self.method.optimizer_groups(self.adapters)
        self.engine = reinitialize(model, groups, self.ds_config, carry, restore)
        self.io = StateIO(self.engine)
        self.method.on_attach(self.engine, self.adapters)
        gc.collect()  # the old engine: DeepSpeed's hooks keep it reachable until the new engine is built

    def check_consistent(self) -> None:
        """Compare a digest of the applied allocation across ranks; stop the run on any difference."""
        applied = Plan(keep=tuple(tuple(layer.live_slots()) for _, layer in self.adapters),
                       grow=tuple(0 for _ in self.adapters), active=tuple(self.active()))  # fmt: skip
        mine = torch.tensor([applied.checksum()], dtype=torch.int64, device=self.engine.device)
        every = [int(t.item()) for t in dist.all_gather(mine)]
        if len(set(every)) > 1:
            raise AllocationMismatchError(
                f"dynrank: ranks disagree on the allocation after step {self.applied_steps} "
                f"(checksums by rank: {every}); stopping rather than training different models"
            )

    def _record(self, step: int, slots_changed: int, seconds: float, modules_changed: int = 0) -> dict:
        ranks = outputs.allocation(self.adapters)
        entry = {"step": step, "ranks": ranks, "budget": self.budget_in_use(), "budget_unit": self.bounds.unit,
                 "slots_changed": slots_changed, "modules_changed": modules_changed, "seconds": round(seconds, 4),
                 "trainable_parameters": self.trainable_parameters()}  # fmt: skip
        if self.method.uses_activity:
            entry["active"] = outputs.activity(self.adapters)
        self.history.append(entry)
        x = self.engine.global_samples
        events = monitor.rank_events(self.adapters, x) + [
            ("DynRank/budget/used", float(entry["budget"]), x),
            ("DynRank/budget/target", float(self.budget), x),
            ("DynRank/slots_changed", float(slots_changed), x),
            ("DynRank/trainable_parameters", float(entry["trainable_parameters"]), x),
        ]
        if self.method.uses_activity:
            events.append(("DynRank/active_modules", float(sum(self.active())), x))
        monitor.write(self.engine.monitor, events)
        if self.output_dir is not None and dist.is_main():
            outputs.write_json(self.output_dir / "allocation_history.json", self.history)
            outputs.write_json(self.output_dir / "allocation.json", ranks)
        return entry
