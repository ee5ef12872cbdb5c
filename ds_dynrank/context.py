"""The only door through which methods reach the process group and DeepSpeed's state: a Context.

A method asks for a sum over ranks, full fp32 values, an in-place master edit, reduced gradients, a forward on a
batch or its share of some work, and never learns how. `EngineContext` answers for a DeepSpeed engine under ZeRO
0-3 (every call that says "collective" must run on every rank, in the same order); `LocalContext` answers for a
plain module in one process, so every method's math is testable without DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ds_dynrank import dist
from ds_dynrank.zero import full_shape, read_full_fp32_flat
from ds_dynrank.zero.state import loss_scale, set_group_lr


def shard(items: list, rank: int, world: int) -> tuple[list, int]:
    """This rank's contiguous chunk and the chunk length every rank pads to."""
    per_rank = math.ceil(len(items) / world)
    return items[rank * per_rank : (rank + 1) * per_rank], per_rank


def _forward(call: Callable, module: nn.Module, inputs: dict, device) -> torch.Tensor:
    """Logits of `call(**inputs)` with `module` in evaluation mode and no autograd; the module's mode is restored."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return call(**{k: v.to(device) for k, v in inputs.items()}).logits
    finally:
        module.train(was_training)


class EngineContext:
    """Methods' view of the controller's current engine (a physical event replaces it: always read through here)."""

    def __init__(self, attached) -> None:
        self._attached = attached  # backends.base.Attachment: engine, io, adapters

    @property
    def device(self):
        return self._attached.engine.device

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Collective: the elementwise sum over data-parallel ranks, on the CPU."""
        return dist.all_reduce_sum(t.to(self.device)).cpu()

    def full_fp32(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Collective: the full fp32 values (masters under ZeRO 1-3; a frozen weight's own values, gathered from its
        partitions under ZeRO-3) of `tensors`, flattened back to back, CPU."""
        return read_full_fp32_flat(tensors)

    def full_shape(self, p: torch.Tensor) -> torch.Size:
        """The whole tensor's shape, also where ZeRO-3 left this rank an empty partition."""
        return full_shape(p)

    def edit_master(self, p: nn.Parameter, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply an elementwise `fn` (f(0) = 0) to p's fp32 master and working copy, this rank's pieces only: no
        communication."""
        self._attached.io.map_master(p, fn)

    def set_group_lr(self, index: int, lr: float) -> None:
        set_group_lr(self._attached.engine, index, lr)

    def reduced_grads(self, local: torch.Tensor) -> torch.Tensor:
        """Collective: from each rank's sum of its micro-batches' gradients, the gradient DeepSpeed applies (the
        mean over ranks, unscaled by an fp16 loss scale), on the CPU."""
        engine = self._attached.engine
        return (dist.all_reduce_sum(local.to(self.device)) / dist.world_size() / loss_scale(engine)).cpu()

    def loss_scale(self) -> float:
        """The factor the fp16 loss scaler multiplies the loss (and every gradient in backward) by now; 1 otherwise."""
        return loss_scale(self._attached.engine)

    def forward(self, inputs: dict) -> torch.Tensor:
        """Logits of an evaluation forward on `inputs` (a collective under ZeRO-3: every rank must run it)."""
        engine = self._attached.engine
        return _forward(engine, engine.module, inputs, self.device)

    def shard(self, items: list) -> tuple[list, int]:
        """This rank's contiguous share of `items` and the share length every rank pads to."""
        return shard(items, dist.rank(), dist.world_size())


class LocalContext:
    """One process, a plain module, no DeepSpeed: the parameters are the masters. `rank`/`world` make `shard`
    hand out one rank's share, to test work split across ranks."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, rank: int = 0, world: int = 1
    ) -> None:
        self.model, self.optimizer, self.rank, self.world = model, optimizer, rank, world
        self.device = next(model.parameters()).device

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().cpu()

    def full_fp32(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().float().flatten() for t in tensors]).cpu()

    def full_shape(self, p: torch.Tensor) -> torch.Size:
        return p.shape

    def edit_master(self, p: nn.Parameter, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        with torch.no_grad():
            p.data.copy_(fn(p.data.float()).to(p.dtype))

    def set_group_lr(self, index: int, lr: float) -> None:
        if self.optimizer is not None:
            self.optimizer.param_groups[index]["lr"] = lr

    def reduced_grads(self, local: torch.Tensor) -> torch.Tensor:
        return local.detach().clone().cpu()

    def loss_scale(self) -> float:
        return 1.0

    def forward(self, inputs: dict) -> torch.Tensor:
        return _forward(self.model, self.model, inputs, self.device)

    def shard(self, items: list) -> tuple[list, int]:
        return shard(items, self.rank, self.world)
