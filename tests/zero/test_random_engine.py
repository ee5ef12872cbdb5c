"""The random control arm on the engine, 2 real processes: ZeRO-2 with the masked backend (a fixed move count) and
ZeRO-3 with the physical one (a per-event list): events at the scheduled steps only, each moving the configured
number of slots with the rank budget held, every decision the one the seed and step give, and both ranks, trained on
different data, ending with the same allocation and bit-identical adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import build_dynrank, load_agreeing_ranks

STEPS, START, INTERVAL = 5, 2, 2  # events at steps 2 and 4 (the schedule stops at step 4)
RUNS = {(2, "masked"): 3, (3, "physical"): [2, 5]}


def _section(backend: str, moves) -> dict:
    schedule, reshape = {"start": START, "interval": INTERVAL}, {"backend": backend}
    return {"method": "random", "r": 4, "schedule": schedule, "reshape": reshape, "random": {"moves": moves}}


def _worker(rank: int, world: int, out_dir: Path) -> None:
    from ds_dynrank.export import gather_full

    results = {}
    data = torch.Generator().manual_seed(100 + rank)  # different tokens on every rank
    for (stage, backend), moves in RUNS.items():
        dynrank = build_dynrank(stage, _section(backend, moves), total_steps=STEPS)
        before = {}  # step -> live slots per module just before its event
        for _ in range(STEPS):
            for _ in range(2):
                ids = torch.randint(0, 128, (2, 12), generator=data)
                engine = dynrank.engine  # a physical event replaces it
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                engine.step()
                live = [layer.live_slots() for _, layer in dynrank.adapters]
                if dynrank.after_step():
                    before[dynrank.applied_steps] = live
        results[(stage, backend)] = {
            "history": [{k: h[k] for k in ("step", "ranks", "budget", "slots_changed")} for h in dynrank.history],
            "before": before,
            "caps": list(dynrank.bounds.cap_M),
            "state": gather_full(dynrank.adapters),
        }
        dynrank.engine.destroy()
    torch.save(results, out_dir / f"random_rank{rank}.pt")


@pytest.mark.deepspeed
def test_scheduled_random_moves_hold_the_budget_on_both_ranks(run_distributed, tmp_path):
    from ds_dynrank.config import from_ds_config
    from ds_dynrank.methods.base import Bounds, Event, build_method

    run_distributed(_worker, tmp_path)
    mine, _ = load_agreeing_ranks(tmp_path, "random")
    for key, result in mine.items():
        history, moves = result["history"], RUNS[key]
        per_event = moves if isinstance(moves, list) else [moves, moves]
        assert [h["step"] for h in history] == [0, START, START + INTERVAL], key
        assert [h["slots_changed"] for h in history[1:]] == [2 * m for m in per_event], key
        assert {h["budget"] for h in history} == {14 * 4}, key  # 14 modules at r = 4: the rank budget held
        method = build_method(from_ds_config({"dynrank": _section(key[1], moves)}))
        for previous, entry in zip(history, history[1:]):
            ranks = list(entry["ranks"].values())
            assert all(1 <= r <= cap for r, cap in zip(ranks, result["caps"])), key
            live = result["before"][entry["step"]]
            assert [len(s) for s in live] == list(previous["ranks"].values())
            bounds = Bounds(floor=1, cap_M=result["caps"], cost_M=[1] * len(live), unit="rank")
            capacity = [max(len(s), 1 + max(s, default=0)) for s in live]  # only its size matters: no scores
            event = Event(entry["step"], STEPS, live, capacity, [True] * len(live), bounds, 14 * 4)
            plan = method.decide(torch.zeros(sum(capacity)), event)
            assert plan.ranks == ranks, f"{key}: step {entry['step']} is not the seeded decision"
