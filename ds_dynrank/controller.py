"""DynRank, the controller: it owns the event and the one engine handle.

Call `after_step()` after every `engine.step()`, on every rank. It counts the optimizer steps DeepSpeed really
applied, lets the method observe each accumulation boundary, and when the schedule says so runs one event,
collectively: the method scores -> the controller sums the ranks' shares, only when the method says its scores are
partial -> rank 0 decides (pure) -> one broadcast -> the backend applies the plan in module order -> a checksum of
the result is compared across ranks -> the event is recorded (history, allocation.json, TensorBoard).

`dynrank.engine` is the engine to use: the physical backend replaces it at its events, there and nowhere else.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from ds_dynrank import checkpoint, dist, holds, monitor
from ds_dynrank.allocation import Plan, budget_used, identity_plan
from ds_dynrank.backends.base import Attachment, SlotMap
from ds_dynrank.context import EngineContext
from ds_dynrank.errors import UserInputError
from ds_dynrank.export import export_settings, from_adapters, gather_full, write_peft_adapter
from ds_dynrank.lora import activity_by_name, adapter_parameters, ranks_by_name
from ds_dynrank.methods.base import Bounds, Event
from ds_dynrank.rundir import RunDir
from ds_dynrank.zero import StateIO, full_numel
from ds_dynrank.zero.checkpoint import restore_universal_buffers


class MissedAllocationError(RuntimeError):
    """A dynamic method was configured but nothing drove its allocation events."""


class AllocationMismatchError(RuntimeError):
    """Ranks hold different allocations after an event: continuing would silently train different models."""


class DynRank:
    """Built by `ds_dynrank.initialize` (or by a trainer integration over its own engine) from a `Setup`."""

    def __init__(
        self,
        engine,
        setup,
        *,
        total_steps: int,
        steps_per_epoch: int | None = None,
        output_dir: str | Path | None = None,
    ) -> None:
        self.cfg, self.method, self.backend = setup.cfg, setup.method, setup.backend
        self.attached = Attachment(engine, StateIO(engine), setup.adapters)
        self.ctx = EngineContext(self.attached)
        self.total_steps = total_steps
        self.schedule = self.method.schedule(total_steps, steps_per_epoch)
        if self.cfg.dynamic and self.schedule.start >= total_steps:  # initialize() refuses this; a trainer may not
            warnings.warn(
                f"dynrank: no scheduled event within {total_steps} steps (first at {self.schedule.start})", stacklevel=2
            )
        self.run_dir = RunDir(output_dir) if output_dir is not None else None
        self.applied_steps = 0
        self._seen_global_steps = engine.global_steps
        cost_M = [layer.rank_cost() for _, layer in self.adapters]
        cap_M = [self.cfg.budget.cap or self.backend.default_cap(layer) for _, layer in self.adapters]
        self.bounds = Bounds(floor=self.cfg.budget.floor, cap_M=cap_M, cost_M=cost_M, unit=self.cfg.budget.unit)
        self.initial_budget = self.budget_in_use()
        self.budget = self.initial_budget  # the budget to hold
        self.history: list[dict] = []
        self.client_state: dict | None = None  # the loop's own state, when initialize() resumed a checkpoint
        self.method.attach(self.ctx, self.adapters)
        self._warned_missed = False
        if self.cfg.dynamic:  # the model's forward runs every step, whoever drives the loop
            engine.module.register_forward_pre_hook(self._check_driven)
        self._record(step=0, slots_changed=0, seconds=0.0)

    # ------------------------------------------------------------------------------------------- what it holds

    @property
    def engine(self):
        """The DeepSpeed engine to train with: read it again after every `after_step()`."""
        return self.attached.engine

    @property
    def adapters(self):
        return self.attached.adapters

    @property
    def io(self) -> StateIO:
        return self.attached.io

    def ranks(self) -> list[int]:
        return [layer.rank for _, layer in self.adapters]

    def active(self) -> list[bool]:
        """Which modules train now (all, unless the method allocates modules)."""
        return [layer.trainable for _, layer in self.adapters]

    def trainable_parameters(self) -> int:
        """Adapter parameters that receive gradients now: live slots of modules that train."""
        return sum(layer.rank * layer.rank_cost() for _, layer in self.adapters if layer.trainable)

    def allocated_parameters(self) -> int:
        """Adapter parameters the optimizer holds, live or not (the physical backend changes this)."""
        return sum(full_numel(p) for p in adapter_parameters(self.adapters))

    def budget_in_use(self) -> int:
        return budget_used(self.ranks(), self.bounds.cost_M, self.bounds.unit)

    # ------------------------------------------------------------------------------------------- every step

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

    def after_step(self) -> dict | None:
        """Call after every engine.step(). Does nothing mid-accumulation or after a skipped (overflow) step; returns
        the event's history entry when one ran."""
        if self.engine.global_steps == self._seen_global_steps:
            return None  # not a gradient-accumulation boundary
        self._seen_global_steps = self.engine.global_steps
        applied = self.engine.was_step_applied()  # False on fp16 overflow: DeepSpeed skipped the update
        self.applied_steps += int(applied)
        self.method.after_boundary(self.ctx, self.adapters, applied)
        if applied and self.cfg.dynamic and self.schedule.due(self.applied_steps):
            return self.reallocate()
        return None

    # ------------------------------------------------------------------------------------------- the event

    def reallocate(self, plan: Plan | None = None) -> dict:
        """One collective event. `plan` forces a decision (tests); otherwise the method takes it on rank 0."""
        start = time.perf_counter()
        live, active = [layer.live_slots() for _, layer in self.adapters], self.active()
        capacity_M = [layer.capacity for _, layer in self.adapters]
        scores = self.method.scores(self.ctx, self.adapters).float()
        if self.method.partial_scores:
            scores = self.ctx.sum(scores)
        broken = dist.ranks_where(not bool(torch.isfinite(scores).all()), device=self.engine.device)
        if plan is None and broken:
            warnings.warn(
                f"dynrank: non-finite scores at step {self.applied_steps} on rank(s) {broken}; event skipped",
                stacklevel=2,
            )
            return {}
        if dist.is_main():
            event = Event(
                step=self.applied_steps,
                total_steps=self.total_steps,
                live=live,
                capacity_M=capacity_M,
                active=active,
                bounds=self.bounds,
                initial_budget=self.initial_budget,
            )
            encoded = (plan or self.method.decide(scores, event)).encode(capacity_M)
        else:
            encoded = Plan.receive_buffer(capacity_M)
        plan = Plan.decode(dist.broadcast(encoded.to(self.engine.device), src=0).cpu(), capacity_M)
        changed_slots, changed_modules = plan.slots_changed(live), sum(plan.changes(live, active))
        if changed_modules:  # when nothing moves, no state is touched and no engine is rebuilt
            self.apply(plan)
        else:
            self.method.after_event(plan, SlotMap.in_place(plan, capacity_M))
        holds.hold("event", self.applied_steps)  # tests kill the run here: reshaped, not yet recorded
        self.check_consistent()
        return self._record(self.applied_steps, changed_slots, time.perf_counter() - start, changed_modules)

    def apply(self, plan: Plan) -> SlotMap:
        """Collective: the backend applies `plan` (even one that changes nothing), the method follows the slots."""
        slots = self.backend.apply(plan, self.attached, step=self.applied_steps, groups=self.method.optimizer_groups)
        if self.backend.swaps_engine:
            self.method.attach(self.ctx, self.adapters)  # new engine, new layers: hooks and group LRs again
        self.method.after_event(plan, slots)
        return slots

    def check_consistent(self) -> None:
        """Compare a digest of the applied allocation across ranks; stop the run on any difference."""
        mine = torch.tensor([self.checksum()], dtype=torch.int64, device=self.engine.device)
        every = [int(t.item()) for t in dist.all_gather(mine)]
        if len(set(every)) > 1:
            raise AllocationMismatchError(
                f"dynrank: ranks disagree on the allocation after step {self.applied_steps} "
                f"(checksums by rank: {every}); stopping rather than training different models"
            )

    def checksum(self) -> int:
        """A 63-bit digest of the live slots and activity of every module, the same on ranks that agree."""
        return identity_plan([layer.live_slots() for _, layer in self.adapters], self.active()).checksum()

    def _record(self, step: int, slots_changed: int, seconds: float, modules_changed: int = 0) -> dict:
        ranks = ranks_by_name(self.adapters)
        entry = {
            "step": step,
            "ranks": ranks,
            "budget": self.budget_in_use(),
            "budget_unit": self.bounds.unit,
            "slots_changed": slots_changed,
            "modules_changed": modules_changed,
            "seconds": round(seconds, 4),
            "trainable_parameters": self.trainable_parameters(),
        }
        if self.method.uses_activity:
            entry["active"] = activity_by_name(self.adapters)
        self.history.append(entry)
        x = self.engine.global_samples
        monitor.write(self.engine.monitor, monitor.allocation_events(entry, self.budget, x))
        monitor.write_rank_histogram(self.engine.monitor, ranks, x)
        self._write_history()
        return entry

    def _write_history(self) -> None:
        if self.run_dir is not None and dist.is_main():
            self.run_dir.write_allocation(self.history)

    # ------------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """What a checkpoint needs beyond DeepSpeed's own state (masks and gates are module state already)."""
        return {
            "version": 1,
            "method": self.cfg.method,
            "applied_steps": self.applied_steps,
            "history": self.history,
            "budget": self.budget,
            "initial_budget": self.initial_budget,  # a physical resume builds the model at the pruned shapes
            "active": self.active(),
            "method_state": self.method.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint: call after engine.load_checkpoint (DeepSpeed restored its counters)."""
        if state.get("method") != self.cfg.method:
            raise ValueError(f"checkpoint method {state.get('method')!r} != config method {self.cfg.method!r}")
        self.applied_steps, self.history, self.budget = state["applied_steps"], state["history"], state["budget"]
        # the budget the run started with (AdaLoRA's cubic schedule, GoRA's allocation): older checkpoints have it
        # as the first history entry
        first = self.history[0]["budget"] if self.history else self.initial_budget
        self.initial_budget = state.get("initial_budget", first)
        self._seen_global_steps = self.engine.global_steps
        for (_, layer), on in zip(self.adapters, state.get("active") or self.active()):
            layer.set_trainable(on)  # the physical backend built the model with this activity already
        self.method.load_state_dict(state.get("method_state", {}))
        self.method.attach(self.ctx, self.adapters)
        self._write_history()

    def checkpoint_meta(self) -> dict:
        """What the checkpoint's sidecar says of the adapters, readable before any engine exists (resume, export)."""
        return {
            "method": self.cfg.method,
            "base_model": self.base_model(),
            "world_size": dist.world_size(),
            **export_settings(self.adapters),
            "ranks": ranks_by_name(self.adapters),
            "active": activity_by_name(self.adapters),
            "scaling": {name: layer.scaling for name, layer in self.adapters},
        }

    def base_model(self) -> str:
        """Where the base model came from (a hub name or a directory), for the exported adapter's config."""
        return str(getattr(self.engine.module, "name_or_path", "") or "")

    def export_adapter(self, out: str | Path, *, base_model: str | None = None) -> Path:
        """Collective: the adapters as a stock PEFT LoRA directory (live ranks only, gates folded in), written by
        rank 0, atomically."""
        full = gather_full(self.adapters)  # every rank takes part
        if dist.is_main():
            write_peft_adapter(
                Path(out),
                from_adapters(self.adapters, full),
                base_model=base_model or self.base_model(),
                **export_settings(self.adapters),
            )
        return Path(out)

    def save_checkpoint(
        self,
        root: str | Path,
        tag: str,
        *,
        client_state: dict | None = None,
        meta: dict | None = None,
        keep: int = 0,
    ) -> Path:
        """Collective: DeepSpeed's checkpoint with this controller's state in it, committed atomically
        (`<root>/latest` names it only once every rank has written). `client_state`: the loop's own state;
        `keep`: how many committed checkpoints to keep (0: all)."""
        client = {**(client_state or {}), "dynrank": self.state_dict()}
        meta = {**self.checkpoint_meta(), **(meta or {})}
        return checkpoint.save(self.engine, Path(root), tag, client, meta, keep=keep)

    def load_checkpoint(self, root: str | Path, tag: str) -> dict:
        """Collective: restore a checkpoint `save_checkpoint` wrote (the engine must have been built for it, as
        `ds_dynrank.initialize(..., resume=...)` does). Returns the loop's own client state."""
        root = Path(root)
        _, client = self.engine.load_checkpoint(str(root), tag=tag, load_module_strict=False)
        if client is None:
            raise UserInputError(f"--resume: DeepSpeed could not load {root / tag}")
        if checkpoint.is_universal(root, tag):
            restore_universal_buffers(self.engine.module, root, tag)
        self.load_state_dict(client["dynrank"])
        return client
