"""AdaLoRA-style allocation (arXiv 2303.10512) on our engine: smoothed sensitivity |w * grad| times its
uncertainty, triplet scores per rank (the gate stands for AdaLoRA's singular value E), and the cubic budget
schedule from r down to target_r per module on average.

Unlike PEFT's DeepSpeed path, the gradient is the full reduced one on every ZeRO stage: tensor hooks add each
micro-batch's full local gradient into an fp32 buffer, and at the accumulation boundary one all-reduce turns the
buffers into exactly the gradient DeepSpeed averages (no per-parameter `safe_get_full_grad`, which under ZeRO-2
must run between backward and step). The weights come from the fp32 masters, after the step, as PEFT reads them
in its documented `update_and_allocate` placement. Pruning kills the slot (parameter, master and moments), so a
pruned rank does not come back, and the budget only falls.
"""

from __future__ import annotations

import torch

from ds_dynrank import dist
from ds_dynrank.allocation import Plan, cubic_budget, top_budget_plan
from ds_dynrank.lora import SLOT_DIM, adapter_parameters
from ds_dynrank.methods.base import Adapters, Bounds, Method, live_scores
from ds_dynrank.schedule import Schedule
from ds_dynrank.scores import element_score, sensitivity_ema, triplet_scores
from ds_dynrank.zero import StateIO, full_shape, read_full_fp32_flat


class AdaLoRA(Method):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.ipt: list[torch.Tensor] | None = None  # Ī per adapter tensor, full shape, fp32 CPU, same on every rank
        self.unc: list[torch.Tensor] | None = None  # Ū likewise
        self._grads: list[torch.Tensor] = []  # this rank's gradient sums since the last boundary
        self._handles: list = []
        self.total_steps = 0
        self.tinit = self.tfinal = 0

    def schedule(self, total_steps: int, steps_per_epoch: int | None) -> Schedule:
        """Events every delta_t from tinit, the last (forced) at total - tfinal, where the target is reached."""
        a = self.cfg.adalora
        self.total_steps = total_steps
        self.tinit = a.tinit if a.tinit is not None else round(0.1 * total_steps)
        self.tfinal = a.tfinal if a.tfinal is not None else round(0.2 * total_steps)
        delta = a.delta_t or max(1, round(0.01 * total_steps))
        stop = total_steps - self.tfinal
        return Schedule(start=self.tinit + delta, interval=delta, stop=max(stop, self.tinit + delta), final=True)

    def on_attach(self, engine, adapters: Adapters) -> None:
        for handle in self._handles:
            handle.remove()
        params = adapter_parameters(adapters)
        self._grads = [torch.zeros(full_shape(p), dtype=torch.float32, device=engine.device) for p in params]
        self._handles = [p.register_hook(self._accumulate(i)) for i, p in enumerate(params)]
        if self.ipt is None:
            self.ipt = [torch.zeros(full_shape(p)) for p in params]
            self.unc = [torch.zeros(full_shape(p)) for p in params]

    def _accumulate(self, i: int):
        def hook(grad: torch.Tensor) -> None:
            self._grads[i] += grad.detach().float()

        return hook

    def after_boundary(self, engine, io: StateIO, adapters: Adapters, applied: bool) -> None:
        """Two collectives per step: the summed gradients, and the fp32 masters."""
        sizes = [g.numel() for g in self._grads]
        flat = dist.all_reduce_sum(torch.cat([g.flatten() for g in self._grads])) / dist.world_size()
        if engine.fp16_enabled():
            flat /= float(engine.optimizer.cur_scale)
        for g in self._grads:
            g.zero_()
        if not applied:
            return  # a skipped (overflow) step updates nothing, the sensitivity included
        values = read_full_fp32_flat(adapter_parameters(adapters))
        for ipt, unc, value, grad in zip(self.ipt, self.unc, values.split(sizes), flat.cpu().split(sizes)):
            sensitivity_ema(ipt, unc, value.view_as(ipt), grad.view_as(ipt), beta1=self.cfg.adalora.beta1,
                            beta2=self.cfg.adalora.beta2)  # fmt: skip

    def local_scores(self, engine, io: StateIO, adapters: Adapters) -> torch.Tensor:
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

    def decide(self, scores_S: torch.Tensor, adapters: Adapters, bounds: Bounds, step: int) -> Plan:
        budget = cubic_budget(step, initial=bounds.initial_budget, target=self.target_budget(len(adapters)),
                              tinit=self.tinit, tfinal=self.tfinal, total=self.total_steps)  # fmt: skip
        live = [layer.live_slots() for _, layer in adapters]
        return top_budget_plan(live_scores(scores_S, adapters), live, budget=budget, floor=bounds.floor)

    def after_apply(self, plan: Plan, live_before: list[list[int]], adapters: Adapters) -> None:
        """Keep the EMAs aligned with the slots: zero killed slots (masked), or drop them (physical shapes)."""
        physical = self.cfg.reshape.backend == "physical"
        i = 0
        for (_, layer), keep, before in zip(adapters, plan.keep, live_before):
            for key in layer.adapter_tensors():
                dim = SLOT_DIM[key]
                for store in (self.ipt, self.unc):
                    if physical:
                        store[i] = store[i].index_select(dim, torch.tensor(keep, dtype=torch.long)).contiguous()
                    else:
                        killed = [s for s in before if s not in keep]
                        store[i].index_fill_(dim, torch.tensor(killed, dtype=torch.long), 0.0)
                i += 1

    def state_dict(self) -> dict:
        return {"ipt": [t.clone() for t in self.ipt], "unc": [t.clone() for t in self.unc]}

    def load_state_dict(self, state: dict) -> None:
        self.ipt = [t.clone() for t in state["ipt"]]
        self.unc = [t.clone() for t in state["unc"]]
