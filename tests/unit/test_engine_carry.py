"""What the physical backend carries into a rebuilt engine's optimizer, checked on a stand-in engine (no
DeepSpeed): Adam's step keeps the type its optimizer counts in, and the moments sit beside their partition."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ds_dynrank.zero.engine import _prime_adam_state


def _engine(flats: list[torch.Tensor]):
    inner = torch.optim.AdamW(flats, lr=1e-3)
    return SimpleNamespace(optimizer=SimpleNamespace(optimizer=inner, single_partition_of_fp32_groups=flats))


@pytest.mark.parametrize(
    ("carried", "expected"),
    [
        (torch.tensor(3.0), torch.tensor(3.0)),  # torch's Adam
        (3, 3),  # DeepSpeedCPUAdam (ZeRO-Offload) and FusedAdam count in ints: the cpu_adam op takes a size_t
        (None, torch.tensor(0.0)),  # no step yet
    ],
)
def test_primed_state_keeps_the_carried_step_and_its_type(carried, expected):
    flats = [torch.randn(6), torch.randn(4)]
    engine = _engine(flats)
    _prime_adam_state(engine, carried)
    for flat in flats:
        state = engine.optimizer.optimizer.state[flat]
        assert type(state["step"]) is type(expected) and repr(state["step"]) == repr(expected)
        assert state["step"] is not carried or not torch.is_tensor(carried)  # a copy: partitions never share one
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], torch.zeros_like(flat)) and state[key].device == flat.device
