"""GoRA then L1RA without an engine: its config (both methods' sections, the budget in parameters, its schedule's
rules), its schedule (GoRA's event, then L1RA's), and which of the two decides, before and after GoRA's event and
across a checkpoint of the method's state."""

from __future__ import annotations

import pytest
import torch

from ds_dynrank import UserInputError
from ds_dynrank.allocation import identity_plan
from ds_dynrank.config import from_ds_config
from ds_dynrank.methods.base import Bounds, Event, build_method

SECTION = {"method": "gora_l1ra", "gora": {"warmup_steps": 3}, "l1ra": {"l1_lambda": 0.05}}


def test_config_reads_both_sections_and_counts_params():
    cfg = from_ds_config({"dynrank": {**SECTION, "schedule": {"interval": 7}}})
    assert cfg.gora.warmup_steps == 3 and cfg.l1ra.l1_lambda == 0.05 and cfg.budget.unit == "params"
    method = build_method(cfg)
    assert method.schedule(100, None).events() == [3, 10, 17, 24, 31, 38, 45, 52, 59, 66, 73, 80, 87, 94]
    default = build_method(from_ds_config({"dynrank": SECTION})).schedule(100, None)
    assert (default.start, default.interval, default.stop) == (3, 5, 99)  # L1RA's 5% of the run after GoRA's


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"schedule": {"start": 5}}, r"schedule: method gora_l1ra starts its events at gora\.warmup_steps"),
        ({"schedule": {"kind": "once"}}, r"schedule: method gora_l1ra starts its events at gora\.warmup_steps"),
        ({"gate": False}, r"gate: method gora_l1ra needs gate: true"),
        ({"r": 4, "budget": {"cap": 9}}, r"budget\.cap \(9\) exceeds the masked backend's capacity \(8 slots\)"),
        ({"alora": {"rounds": 2}}, r"alora: only used by method alora, but method is 'gora_l1ra'"),
    ],
)
def test_bad_values_are_refused_naming_the_field(section, message):
    with pytest.raises(UserInputError, match=message):
        from_ds_config({"dynrank": {**SECTION, **section}})


def _event() -> Event:
    live = [[0, 1], [0, 1]]  # two modules at rank 2 of capacity 4; a rank of the second costs twice the first's
    bounds = Bounds(floor=0, cap_M=[4, 4], cost_M=[10, 20], unit="params")
    return Event(
        step=3, total_steps=100, live=live, capacity_M=[4, 4], active=[True, True], bounds=bounds, initial_budget=60
    )


def test_gora_decides_first_then_l1ra_and_the_switch_survives_a_checkpoint():
    cfg = from_ds_config({"dynrank": SECTION})
    method, event = build_method(cfg), _event()
    first = method.decide(torch.tensor([0.9, 0.1]), event)  # GoRA: importance per module
    assert first.ranks == [4, 1]  # 4 x 10 + 1 x 20 = 60: the budget, in proportion to importance
    method.gora.importance = torch.tensor([0.9, 0.1])
    method.after_event(first, slots=None)
    gates = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])  # per slot: both live gates open
    resumed = build_method(cfg)
    resumed.load_state_dict(method.state_dict())
    for m in (method, resumed):
        assert m.gora.done
        assert m.decide(gates, event) == identity_plan(event.live)  # L1RA: no gate at zero, nothing moves
    closed = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])  # module 0's second gate reached zero
    assert resumed.decide(closed, event).keep[0] == (0,)  # pruned (what it freed may be spent again)
