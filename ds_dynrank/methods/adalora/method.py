"""AdaLoRA-style allocation (arXiv 2303.10512) on our engine: smoothed sensitivity |w * grad| times its
uncertainty, triplet scores per rank (the gate stands for AdaLoRA's singular value E), and the cubic budget
schedule from r down to target_r per module on average.

Unlike PEFT's DeepSpeed path, the gradient is the full reduced one on every ZeRO stage: tensor hooks add each
micro-batch's full local gradient into an fp32 buffer, and at the accumulation boundary `ctx.reduced_grads` turns
the buffers into exactly the gradient DeepSpeed averages (no per-parameter `safe_get_full_grad`, which under ZeRO-2
must run between backward and step). The weights come from the fp32 masters, after the step, as PEFT reads them
in its documented `update_and_allocate` placement. Pruning kills the slot (parameter, master and moments), so a
pruned rank does not come back, and the budget only falls.
"""

from __future__ import annotations

import torch

from ds_dynrank.allocation import Plan, cubic_budget, top_budget_plan
from ds_dynrank.backends.base import SlotMap
from ds_dynrank.lora import SLOT_DIM, adapter_parameters
from ds_dynrank.methods.base import Adapters, Event, Method, live_scores
from ds_dynrank.schedule import Schedule
from ds_dynrank.scores import element_score, sensitivity_ema, triplet_scores


class AdaLoRA(Method):
    def __init__(self, cfg, *, validation: dict | None = None) -> None:
        super().__init__(cfg, validation=validation)
        self.ipt: list[torch.Tensor] | None = None  # Ī per adapter tensor, full shape, fp32 CPU, same on every rank
        self.unc: list[torch.Tensor] | None = None  # Ū likewise
        self.layout: list[tuple[int, int]] = []  # (module, slot dimension) of each of those tensors
        self._grads: list[torch.Tensor] = []  # this rank's gradient sums since the last boundary
        self._handles: list = []

    def horizon(self, total_steps: int) -> tuple[int, int]:
        """(tinit, tfinal) in steps: warm-up before any pruning, and the final plateau."""
        a = self.cfg.adalora
        tinit = a.tinit if a.tinit is not None else round(0.1 * total_steps)
        tfinal = a.tfinal if a.tfinal is not None else round(0.2 * total_steps)
        return tinit, tfinal

    def schedule(self, total_steps: int, steps_per_epoch: int | None) -> Schedule:
        """Events every delta_t from tinit, the last (forced) at total - tfinal, where the target is reached."""
        tinit, tfinal = self.horizon(total_steps)
        delta = self.cfg.adalora.delta_t or max(1, round(0.01 * total_steps))
        stop = total_steps - tfinal
        return Schedule(start=tinit + delta, interval=delta, stop=max(stop, tinit + delta), final=True)

    def attach(self, ctx, adapters: Adapters) -> None:
        for handle in self._handles:
            handle.remove()
        params = adapter_parameters(adapters)
        self._grads = [torch.zeros(ctx.full_shape(p), dtype=torch.float32, device=ctx.device) for p in params]
        self._handles = [p.register_hook(self._accumulate(i)) for i, p in enumerate(params)]
        self.layout = [
            (m, SLOT_DIM[key])
            for m, (_, layer) in enumerate(adapters)
            for key, t in layer.adapter_tensors().items()
            if isinstance(t, torch.nn.Parameter)
        ]
        if self.ipt is None:
            self.ipt = [torch.zeros(ctx.full_shape(p)) for p in params]
            self.unc = [torch.zeros(ctx.full_shape(p)) for p in params]

    def _accumulate(self, i: int):
        def hook(grad: torch.Tensor) -> None:
            self._grads[i] += grad.detach().float()

        return hook

    def after_boundary(self, ctx, adapters: Adapters, applied: bool) -> None:
        """Two collectives per step: the summed gradients, and the fp32 masters."""
        sizes = [g.numel() for g in self._grads]
        flat = ctx.reduced_grads(torch.cat([g.flatten() for g in self._grads]))
        for g in self._grads:
            g.zero_()
        if not applied:
            return  # a skipped (overflow) step updates nothing, the sensitivity included
        values = ctx.full_fp32(adapter_parameters(adapters))
        for ipt, unc, value, grad in zip(self.ipt, self.unc, values.split(sizes), flat.split(sizes)):
            sensitivity_ema(
                ipt,
                unc,
                value.view_as(ipt),
                grad.view_as(ipt),
                beta1=self.cfg.adalora.beta1,
                beta2=self.cfg.adalora.beta2,
            )

    def scores(self, ctx, adapters: Adapters) -> torch.Tensor:
        """Triplet score of every slot, [S] (identical on every rank)."""
        out, i = [], 0
        for _, layer in adapters:
            n = len(layer.adapter_tensors())
            scores = [element_score(a, u) for a, u in zip(self.ipt[i : i + n], self.unc[i : i + n])]
            out.append(triplet_scores(scores[0], scores[1], scores[2] if n == 3 else None))
            i += n
        return torch.cat(out)

    def target_budget(self, n_modules: int) -> int:
        target = self.cfg.adalora.target_r or self.cfg.r * 2 / 3
        return round(target * n_modules)

    def decide(self, scores_S: torch.Tensor, event: Event) -> Plan:
        tinit, tfinal = self.horizon(event.total_steps)
        budget = cubic_budget(
            event.step,
            initial=event.initial_budget,
            target=self.target_budget(len(event.live)),
            tinit=tinit,
            tfinal=tfinal,
            total=event.total_steps,
        )
        scores = live_scores(scores_S, event.capacity_M)
        return top_budget_plan(scores, event.live, budget=budget, floor=event.bounds.floor)

    def after_event(self, plan: Plan, slots: SlotMap) -> None:
        """Keep the EMAs aligned with the slots: killed slots drop out, survivors move where the backend put them."""
        for i, (m, dim) in enumerate(self.layout):
            self.ipt[i] = slots.carry(m, self.ipt[i], dim)
            self.unc[i] = slots.carry(m, self.unc[i], dim)

    def state_dict(self) -> dict:
        return {"ipt": [t.clone() for t in self.ipt], "unc": [t.clone() for t in self.unc]}

    def load_state_dict(self, state: dict) -> None:
        self.ipt = [t.clone() for t in state["ipt"]]
        self.unc = [t.clone() for t in state["unc"]]
