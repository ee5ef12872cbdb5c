"""The physical backend: tensors really change shape. An event gathers every adapter's full state, builds layers at
the new ranks (survivors carried bit for bit, born slots seeded), tears the engine down and initializes a new one
over them, and writes the carried fp32 values and Adam moments back. Pruned ranks free their memory, a module can
grow past its initial size, and inactive adapters (module allocation) become buffers with no optimizer state.
"""

from __future__ import annotations

import gc

import torch

from ds_dynrank.allocation import Plan
from ds_dynrank.backends.base import Attachment, Backend, SlotMap, slot_generator
from ds_dynrank.lora import SLOT_DIM, LoRALinear, adapter_state_tensors, iter_lora
from ds_dynrank.zero import FullState, StateIO
from ds_dynrank.zero.engine import capture, reinitialize, teardown


def physical_layers(
    plan: Plan, adapters: list[tuple[str, LoRALinear]], states: list[FullState], *, seed: int, step: int
) -> list[tuple[LoRALinear, list[FullState]]]:
    """New layers whose shapes are the plan's ranks: surviving slots first (values and moments carried bit for
    bit), then born slots (seeded A rows, B = 0, gate 1, zero moments). `states` holds every adapter tensor's
    full state in iteration order (A, B, gate per module)."""
    out, states_iter = [], iter(states)
    for m, ((_, layer), keep, grow) in enumerate(zip(adapters, plan.keep, plan.grow)):
        new = layer.resized(len(keep) + grow)
        rows = layer.init_rows(grow, slot_generator(seed, step, m))
        carried = []
        for key, target in new.adapter_tensors().items():
            dim, old = SLOT_DIM[key], next(states_iter)
            index = torch.tensor(keep, dtype=torch.long)
            born_shape = list(old.value.shape)
            born_shape[dim] = grow
            fresh = {"lora_A": rows, "lora_B": torch.zeros(born_shape), "lora_gate": torch.ones(grow)}[key]
            zeros = torch.zeros(born_shape)
            state = FullState(
                torch.cat([old.value.index_select(dim, index), fresh], dim),
                torch.cat([old.exp_avg.index_select(dim, index), zeros], dim),
                torch.cat([old.exp_avg_sq.index_select(dim, index), zeros], dim),
            )
            with torch.no_grad():
                target.copy_(state.value.to(target.dtype))
            carried.append(state)
        out.append((new, carried))
    return out


def swap_layers(model, adapters: list[tuple[str, LoRALinear]], layers: list[LoRALinear]) -> None:
    """Put the new layers where the old ones were (same names, so the iteration order is unchanged)."""
    for (name, _), layer in zip(adapters, layers):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)


def resize_to(model, adapters: list[tuple[str, LoRALinear]], ranks: dict[str, int]) -> list[tuple[str, LoRALinear]]:
    """Before the engine exists: layers at the given ranks (values come from a checkpoint)."""
    swap_layers(model, adapters, [layer.resized(ranks[name]) for name, layer in adapters])
    return iter_lora(model)


class PhysicalBackend(Backend):
    """Every event that changes something rebuilds the engine over layers of the new shapes."""

    name = "physical"
    swaps_engine = True

    def __init__(self, seed: int, ds_config: dict | None) -> None:
        if ds_config is None:
            raise ValueError("the physical backend needs ds_config to rebuild the engine")
        self.seed, self.ds_config = seed, ds_config
        self.make_optimizer = None  # None: the config's optimizer section builds it

    def rebuild_with(self, ds_config: dict, make_optimizer) -> None:
        """Rebuild engines as a trainer built the first one: from its resolved config, with the client optimizer
        `make_optimizer(groups)` returns (HF Trainer and TRL build their own and leave the config without one)."""
        self.ds_config, self.make_optimizer = ds_config, make_optimizer

    def default_cap(self, layer: LoRALinear) -> int:
        return 4 * layer.init_rank

    def prepare(self, adapters, active: list[bool]) -> None:
        for (_, layer), on in zip(adapters, active):
            layer.set_trainable(on, as_buffers=True)  # inactive: no gradient, no master, no Adam state

    def resize_for_resume(self, model, adapters, ranks: dict[str, int], active: dict[str, bool]):
        adapters = resize_to(model, adapters, ranks)  # shapes must match before DeepSpeed loads the state
        for name, layer in adapters:
            layer.set_trainable(active.get(name, True), as_buffers=True)
        return adapters

    def apply(self, plan: Plan, attached: Attachment, *, step: int, groups) -> SlotMap:
        """Gather every adapter's full state, build layers at the new ranks, rebuild the engine over them and write
        the carried fp32 values and Adam moments back. The old engine is freed before this returns."""
        states = attached.io.read_many(adapter_state_tensors(attached.adapters))
        rebuilt = physical_layers(plan, attached.adapters, states, seed=self.seed, step=step)
        active = plan.active or [layer.trainable for _, layer in attached.adapters]
        for (layer, _), on in zip(rebuilt, active):
            layer.set_trainable(on, as_buffers=True)
        carry = capture(attached.engine)
        model = attached.engine.module
        teardown(attached.engine)
        attached.engine = attached.io = None  # the only references: the old engine can go at the collection below
        swap_layers(model, attached.adapters, [layer for layer, _ in rebuilt])
        attached.adapters = iter_lora(model)

        def restore(engine) -> None:
            io = StateIO(engine)
            for (_, carried), (_, live_layer) in zip(rebuilt, attached.adapters):
                for p, state in zip(live_layer.adapter_tensors().values(), carried):
                    if isinstance(p, torch.nn.Parameter):  # buffers already hold their values
                        io.write(p, state)

        attached.engine = reinitialize(
            model, groups(attached.adapters), self.ds_config, carry, restore, make_optimizer=self.make_optimizer
        )
        attached.io = StateIO(attached.engine)
        gc.collect()  # the old engine: DeepSpeed's hooks keep it reachable until the new engine is built
        return SlotMap.compacted(plan)
