"""Our LoRA layer: `y = W x + B diag(gate * rank_mask) A dropout(x) * scaling`, over a fixed capacity of slots.

Shapes legend: R = the module's slot capacity, I = in_features, O = out_features.
A is [R, I] and B is [O, R], as PEFT's `lora_A.weight` / `lora_B.weight`. `rank_mask` [R] says which slots are
live; a masked slot contributes nothing and receives exactly zero gradient. The scaling is a plain float fixed at
construction from the initial rank, so re-allocating ranks never changes what surviving slots compute.

Two switches serve the allocation methods: `trainable = False` keeps the adapter in the forward with an exactly
zero gradient (so Adam, with zeroed moments, moves nothing: module allocation without toggling requires_grad under
DeepSpeed), and
`ablation` [N, R] scales each example's slots (ALoRA's batched rank ablations: one forward, many variants).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

try:  # GPT-2 style layers store the weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the layer does not need it
    Conv1D = ()


def linear_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or HF Conv1D."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if Conv1D and isinstance(base, Conv1D):
        shape = getattr(base.weight, "ds_shape", base.weight.shape)  # ZeRO-3 leaves the local tensor empty
        return shape[0], shape[1]
    raise TypeError(f"LoRA supports nn.Linear and transformers Conv1D, not {type(base).__name__}")


SLOT_DIM = {"lora_A": 0, "lora_B": 1, "lora_gate": 0}  # the dimension of each tensor that indexes the slots


class LoRALinear(nn.Module):
    """A frozen base layer plus a low-rank adapter whose live rank is `rank_mask.sum()`."""

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int,
        capacity: int | None = None,
        alpha: float = 16.0,
        dropout: float = 0.0,
        gate: bool = False,
        use_rslora: bool = False,
        init: str = "kaiming",
        init_rank: int | None = None,
    ) -> None:
        super().__init__()
        capacity = rank if capacity is None else capacity
        if not 1 <= rank <= capacity:
            raise ValueError(f"need 1 <= rank <= capacity, got rank={rank}, capacity={capacity}")
        in_features, out_features = linear_features(base)
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.init_rank = init_rank or rank  # the scaling's rank: kept when the rank changes
        self.alpha, self.use_rslora, self.dropout_p = alpha, use_rslora, dropout
        self.scaling = alpha / math.sqrt(self.init_rank) if use_rslora else alpha / self.init_rank
        self.init = init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(capacity, in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, capacity, dtype=weight.dtype, device=weight.device))
        self.lora_gate = nn.Parameter(torch.ones(capacity, dtype=weight.dtype, device=weight.device)) if gate else None
        mask = (torch.arange(capacity, device=weight.device) < rank).to(weight.dtype)
        self.register_buffer("rank_mask", mask)
        self.trainable = True  # False: the adapter still computes but receives no gradient
        self.ablation: torch.Tensor | None = None  # [N, R] per-example slot factors, set only while scoring
        with torch.no_grad():  # slots beyond the initial rank start dead: exactly zero until born
            self.lora_A.zero_()
            if self.lora_gate is not None:
                self.lora_gate.zero_()
        self.reset_slots(torch.arange(rank))

    def resized(self, rank: int) -> LoRALinear:
        """A new layer over the same base with `rank` live slots and this layer's scaling and settings (the
        physical backend fills in its values)."""
        return LoRALinear(
            self.base,
            rank=rank,
            capacity=rank,
            alpha=self.alpha,
            dropout=self.dropout_p,
            gate=self.lora_gate is not None,
            use_rslora=self.use_rslora,
            init=self.init,
            init_rank=self.init_rank,
        )
        # (activity is applied by the caller)

    @property
    def capacity(self) -> int:
        return self.rank_mask.numel()  # buffers are never partitioned; lora_A is empty on a ZeRO-3 rank

    @property
    def rank(self) -> int:
        """Live rank: the number of unmasked slots."""
        return int(self.rank_mask.sum().item())

    def init_rows(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` fresh fp32 rows of A on the CPU, by this layer's init law (the same draws on every rank for a
        shared generator)."""
        rows = torch.empty(n, self.in_features, dtype=torch.float32)
        if self.init == "gaussian":
            return rows.normal_(0.0, 1.0 / self.init_rank, generator=generator)
        bound = 1.0 / math.sqrt(self.in_features)  # PEFT's kaiming_uniform_(a=sqrt(5)) on [R, I]: U(-b, b)
        return rows.uniform_(-bound, bound, generator=generator)

    @torch.no_grad()
    def reset_slots(self, slots: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fresh A rows, zero B columns, unit gates for `slots`: a function-preserving (re)birth."""
        self.lora_A[slots] = self.init_rows(len(slots), generator).to(self.lora_A.dtype).to(self.lora_A.device)
        self.lora_B[:, slots] = 0
        if self.lora_gate is not None:
            self.lora_gate[slots] = 1

    def live_slots(self) -> list[int]:
        return torch.nonzero(self.rank_mask).flatten().tolist()

    def rank_cost(self) -> int:
        """Parameters one rank of this module costs (a row of A, a column of B, a gate entry)."""
        return self.in_features + self.out_features + (1 if self.lora_gate is not None else 0)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        """The trainable tensors by name, in one fixed order: A, B, then the gate if the layer has one."""
        tensors = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.lora_gate is not None:
            tensors["lora_gate"] = self.lora_gate
        return tensors

    def set_trainable(self, on: bool, *, as_buffers: bool = False) -> None:
        """Module allocation: an inactive adapter still computes but gets no gradient. `as_buffers` (physical
        backend, only while no engine wraps the model) also turns its tensors into buffers, so an optimizer built
        afterwards holds no state for them; turning it back on makes them parameters again."""
        self.trainable = on
        for name, tensor in self.adapter_tensors().items():
            is_param = isinstance(tensor, nn.Parameter)
            if as_buffers and not on and is_param:
                delattr(self, name)
                self.register_buffer(name, tensor.detach())
            elif on and not is_param:
                delattr(self, name)
                setattr(self, name, nn.Parameter(tensor.detach()))

    def slot_weights(self) -> torch.Tensor:
        """diag(gate * rank_mask) as a vector [R]."""
        return self.rank_mask if self.lora_gate is None else self.lora_gate * self.rank_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        A, B, weights = self.lora_A, self.lora_B, self.slot_weights()
        if not self.trainable:
            A, B, weights = _zero_grad(A), _zero_grad(B), _zero_grad(weights)
        # the mask is a buffer, which DeepSpeed's bf16/fp16 leaves in the dtype it was built in
        h = F.linear(self.dropout(x).to(A.dtype), A) * weights.to(A.dtype)
        if self.ablation is not None:  # [N, R] -> [N, 1, ..., R] against h [N, ..., R]
            h = h * self.ablation.view(h.shape[0], *([1] * (h.dim() - 2)), h.shape[-1]).to(h.dtype)
        return out + (F.linear(h, B) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The dense update B diag(gate * mask) A * scaling, shaped [O, I] like nn.Linear's weight."""
        return (self.lora_B * self.slot_weights()) @ self.lora_A * self.scaling

    def extra_repr(self) -> str:
        gate = ", gate" if self.lora_gate is not None else ""
        frozen = "" if self.trainable else ", inactive"
        return f"rank={self.rank}, capacity={self.capacity}, scaling={self.scaling:g}{gate}{frozen}"


def _zero_grad(t: torch.Tensor) -> torch.Tensor:
    """The same values with an exactly zero gradient. Not a plain detach: ZeRO-3 keeps a parameter's last
    gradient partition when no gradient arrives for it, and Adam would go on applying that stale gradient."""
    return t.detach() + t * 0 if t.requires_grad else t


def iter_lora(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, layer) of every adapter, sorted by name: the one order every rank iterates in."""
    return sorted((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def adapter_parameters(adapters: list[tuple[str, LoRALinear]]) -> list[nn.Parameter]:
    """Every adapter parameter of `adapters`, layer by layer in adapter_tensors order (adapters that module
    allocation turned into buffers are not parameters: no optimizer holds them)."""
    return [p for _, layer in adapters for p in layer.adapter_tensors().values() if isinstance(p, nn.Parameter)]


def adapter_state_tensors(adapters: list[tuple[str, LoRALinear]]) -> list[torch.Tensor]:
    """Every adapter tensor, parameter or buffer, in adapter_tensors order: what a rebuild carries."""
    return [p for _, layer in adapters for p in layer.adapter_tensors().values()]


def ranks_by_name(adapters: list[tuple[str, LoRALinear]]) -> dict[str, int]:
    """`{module name: live rank}` for every adapted module, in iteration order."""
    return {name: layer.rank for name, layer in adapters}


def activity_by_name(adapters: list[tuple[str, LoRALinear]]) -> dict[str, bool]:
    """`{module name: does it train now}` for every adapted module (module allocation), in iteration order."""
    return {name: layer.trainable for name, layer in adapters}
