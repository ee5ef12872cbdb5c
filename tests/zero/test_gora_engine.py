"""GoRA on the engine, 2 real processes under ZeRO-2 and ZeRO-3 (the frozen weights partitioned), masked and physical
backends: exactly one event, right after the warm-up steps; ranks move and the parameter budget is held; the
importance is the one computed from the sum of both ranks' weight gradients (each rank trains on its own data) with
the base weights as built (or their Frobenius norm, `grad_norm`); both ranks end with the same allocation and
bit-identical adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import build_dynrank, load_agreeing_ranks, tiny_llama

from ds_dynrank.allocation import proportional_ranks
from ds_dynrank.scores import gradient_importance

RUNS = [(2, "masked"), (3, "masked"), (2, "physical"), (3, "physical")]
KIND = {(3, "physical"): "grad_norm"}  # the others: sensitivity, |W * G| with W gathered under ZeRO-3
WARMUP, STEPS = 2, 4
SECTION = {"method": "gora", "r": 4, "gora": {"warmup_steps": WARMUP}}


def _worker(rank: int, world: int, out_dir: Path) -> None:
    from ds_dynrank.export import gather_full

    results = {}
    data = torch.Generator().manual_seed(100 + rank)  # different tokens on every rank
    for stage, backend in RUNS:
        kind = KIND.get((stage, backend), "sensitivity")
        section = {**SECTION, "gora": {"warmup_steps": WARMUP, "importance": kind}, "reshape": {"backend": backend}}
        dynrank = build_dynrank(stage, section, total_steps=STEPS)
        local = None
        for step in range(1, STEPS + 1):
            for micro in range(2):
                ids = torch.randint(0, 128, (2, 12), generator=data)
                engine = dynrank.engine
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                if (step, micro) == (WARMUP, 1):  # this rank's sums are complete: the last warm-up backward ran
                    local = [g.clone() for g in dynrank.method._grads]
                engine.step()
                dynrank.after_step()
        results[(stage, backend)] = {
            "history": [{k: h[k] for k in ("step", "ranks", "budget")} for h in dynrank.history],
            "importance": dynrank.method.importance.clone(),
            "local": local,
            "names": [name for name, _ in dynrank.adapters],
            "cost": [layer.rank_cost() for _, layer in dynrank.adapters],
            "caps": list(dynrank.bounds.cap_M),
            "hooks": len(dynrank.method._handles) + (dynrank.method._grads is not None),
            "state": gather_full(dynrank.adapters),
        }
        dynrank.engine.destroy()
    torch.save(results, out_dir / f"gora_rank{rank}.pt")


@pytest.mark.deepspeed
def test_one_event_after_warm_up_from_both_ranks_gradients(run_distributed, tmp_path):
    run_distributed(_worker, tmp_path)
    mine, other = load_agreeing_ranks(tmp_path, "gora")
    weights = dict(tiny_llama(seed=0).named_parameters())  # the frozen base weights, never trained
    for key, result in mine.items():
        assert torch.equal(result["importance"], other[key]["importance"]), key
        history = result["history"]
        assert [h["step"] for h in history] == [0, WARMUP], key  # one event, right after the warm-up
        assert history[1]["ranks"] != history[0]["ranks"], f"{key}: no rank moved"
        budget = history[0]["budget"]
        assert budget == sum(4 * c for c in result["cost"])  # params: (in + out) x r summed
        assert budget - min(result["cost"]) < history[1]["budget"] <= budget, (key, history)
        assert result["hooks"] == 0, key  # warm-up over: hooks removed, sums freed
        ours, theirs = result["local"], other[key]["local"]
        assert not torch.equal(ours[0], theirs[0])  # the ranks saw different data
        raw = torch.tensor(
            [
                gradient_importance(a + b, weights[f"{name}.weight"], KIND.get(key, "sensitivity"))
                for name, a, b in zip(result["names"], ours, theirs)
            ]
        )
        assert torch.allclose(result["importance"], (raw / raw.sum()).float(), rtol=1e-4), key
        expected = proportional_ranks(raw, budget=budget, floor=1, cap_M=result["caps"], cost_M=result["cost"])
        assert list(history[1]["ranks"].values()) == expected, key
