"""ALoRA, module allocation and the AdaLoRA-style scorer on the engine, 2 real processes under ZeRO 0-3 (both
reshape backends under ZeRO-2 and ZeRO-3, one each under ZeRO-0 and ZeRO-1): each method runs, its ranks or active
modules change, the budget follows the method's rule, and both ranks hold the same allocation and bit-identical
adapter state after every run, although each rank trains on different data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import build_dynrank, load_agreeing_ranks

RUNS = [(0, "masked"), (1, "physical"), (2, "masked"), (3, "masked"), (2, "physical"), (3, "physical")]
STEPS = 10


def validation_batch() -> dict:
    """The same fixed batch on every rank, as launch/train.py takes it from the training split."""
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1234))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


SECTIONS = {
    "alora": {
        "method": "alora",
        "r": 4,
        "schedule": {"start": 3, "interval": 3},
        "alora": {"rounds": 3, "variants_per_forward": 8},
    },
    "modalloc": {
        "method": "modalloc",
        "r": 4,
        "schedule": {"start": 2, "interval": 2},
        "modalloc": {"strategy": "discounted", "k": 5},
    },
    "modalloc-gradient": {
        "method": "modalloc",
        "r": 4,
        "schedule": {"kind": "once", "start": 4},
        "modalloc": {"score": "gradient", "strategy": "topk", "k": 9},
    },
    "adalora": {"method": "adalora", "r": 6, "adalora": {"target_r": 3, "tinit": 2, "tfinal": 3, "delta_t": 2}},
}


def _train(dynrank, rank: int, steps: int, inactive_probe: list) -> None:
    """`steps` optimizer steps, 2 micro-batches each, different random tokens on each rank. Between events, the
    adapters of inactive modules must not move at all (checked on one module at every step)."""
    data = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        frozen = [(name, layer) for name, layer in dynrank.adapters if not layer.trainable]
        frozen = frozen if dynrank.engine.global_steps else []  # no optimizer state before the first step
        before = dynrank.io.read(frozen[0][1].lora_A).value if frozen else None
        for _ in range(2):
            ids = torch.randint(0, 128, (2, 12), generator=data)
            engine = dynrank.engine
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
            event = dynrank.after_step()
        if frozen and not event:  # no event in between: the inactive module's A is bit for bit unchanged
            layer = dict(dynrank.adapters)[frozen[0][0]]
            inactive_probe.append(torch.equal(before, dynrank.io.read(layer.lora_A).value))


def _worker(rank: int, world: int, out_dir: Path, method: str) -> None:
    from ds_dynrank.export import gather_full

    results = {}
    for stage, backend in RUNS:
        section = {**SECTIONS[method], "reshape": {"backend": backend}}
        validation = validation_batch() if section["method"] == "alora" else None
        dynrank = build_dynrank(stage, section, total_steps=STEPS, validation=validation)
        probe: list[bool] = []
        _train(dynrank, rank, STEPS, probe)
        full = gather_full(dynrank.adapters)
        results[(stage, backend)] = {
            "history": [{k: h[k] for k in ("step", "ranks", "budget", "active") if k in h} for h in dynrank.history],
            "state": {k: v.clone() for k, v in full.items()},
            "inactive_unchanged": probe,
            "trainable": [h["trainable_parameters"] for h in dynrank.history],
        }
        dynrank.engine.destroy()
    torch.save(results, out_dir / f"{method}_rank{rank}.pt")


def run(run_distributed, tmp_path, method: str) -> dict:
    run_distributed(_worker, tmp_path, method)
    mine, _ = load_agreeing_ranks(tmp_path, method)
    return mine


@pytest.mark.deepspeed
def test_alora_prunes_lowest_and_grows_untouched_modules(run_distributed, tmp_path):
    results = run(run_distributed, tmp_path, "alora")
    for key, result in results.items():
        history = result["history"]
        assert [h["step"] for h in history] == [0, 3, 6, 9], key
        budgets = [h["budget"] for h in history]
        assert budgets[0] == 14 * 4 and all(b <= budgets[0] for b in budgets), (key, budgets)
        assert history[-1]["ranks"] != history[0]["ranks"], f"{key}: ALoRA never moved a rank"


@pytest.mark.deepspeed
def test_modalloc_changes_active_modules_and_inactive_ones_stay_frozen(run_distributed, tmp_path):
    results = run(run_distributed, tmp_path, "modalloc")
    for key, result in results.items():
        history = result["history"]
        actives = [tuple(h["active"].values()) for h in history]
        assert all(sum(a) == 5 for a in actives), (key, actives)
        assert len(set(actives)) > 1, f"{key}: the active set never changed"
        assert all(h["ranks"] == history[0]["ranks"] for h in history)  # ranks are not what moves
        assert result["inactive_unchanged"] and all(result["inactive_unchanged"]), key
        assert result["trainable"][0] < 14 * 4 * (32 + 32)  # fewer trainable parameters than all modules


@pytest.mark.deepspeed
def test_modalloc_gradient_score_once_schedule(run_distributed, tmp_path):
    results = run(run_distributed, tmp_path, "modalloc-gradient")
    for key, result in results.items():
        history = result["history"]
        assert [h["step"] for h in history] == [0, 4], key  # once, after 4 steps
        assert all(sum(h["active"].values()) == 9 for h in history)
        assert all(result["inactive_unchanged"]), key


@pytest.mark.deepspeed
def test_adalora_follows_the_cubic_budget_down_to_target(run_distributed, tmp_path):
    from ds_dynrank.allocation import cubic_budget

    results = run(run_distributed, tmp_path, "adalora")
    for key, result in results.items():
        history = result["history"]
        steps = [h["step"] for h in history]
        assert steps == [0, 4, 6, 7], key  # every delta_t from tinit, the last forced at total - tfinal
        budgets = [h["budget"] for h in history]
        expected = [cubic_budget(s, initial=84, target=42, tinit=2, tfinal=3, total=STEPS) for s in steps]
        assert budgets == [84, *expected[1:]], (key, budgets)
        assert budgets[-1] == 42
        assert all(min(h["ranks"].values()) >= 1 for h in history)  # the floor holds
