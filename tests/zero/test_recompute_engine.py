"""Activation checkpointing (non-reentrant) with 2 real processes under ZeRO-2 and ZeRO-3: module allocation's
activation scores, the losses, every adapter gradient of every micro-batch, the allocation and the trained
adapters are bit for bit those of the same run without checkpointing, while a probe shows that the layers really
were recomputed (their forward hooks fired twice, once inside backward) and that tensor hooks on the adapters
fired once per backward all the same.

Bit for bit, not allclose: on the CPU with one thread, the first forward runs exactly the unchecked run's kernels,
the replay rebuilds bit-identical activations (same inputs, dropout's RNG state restored), and a sum over 2 ranks
does not depend on its order; any tolerance would only make room for a real difference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_ds_config, tiny_llama, train_steps

STAGES, STEPS = (2, 3), 6
SECTION = {  # the activation score, events at 2 and 4 moving the active set, dropout replayed by the recompute
    "method": "modalloc",
    "r": 4,
    "lora_dropout": 0.1,
    "schedule": {"start": 2, "interval": 2},
    "modalloc": {"score": "activation", "strategy": "discounted", "k": 5},
}
PROBED = "model.layers.0.self_attn.q_proj"  # early in its layer: a replay always reaches it (later ones may not)


def _probe(layer, grads: list) -> dict:
    """Counts the probed layer's forwards, raw and inside backward, and records every adapter gradient it gets."""
    from ds_dynrank.recompute import in_recomputation

    calls = {"forwards": 0, "recomputed": 0}

    def forward_hook(module, inputs, output) -> None:
        calls["forwards"] += 1
        calls["recomputed"] += in_recomputation()

    layer.register_forward_hook(forward_hook)
    for tensor in layer.adapter_tensors().values():
        tensor.register_hook(lambda grad: grads.append(grad.detach().clone()))
    return calls


def _run(rank: int, stage: int, checkpointing: bool) -> dict:
    import ds_dynrank
    from ds_dynrank.export import gather_full
    from ds_dynrank.recompute import enable_activation_checkpointing

    model = tiny_llama(seed=0)
    if checkpointing:
        enable_activation_checkpointing(model)
    config = {**tiny_ds_config(stage, scheduler_steps=STEPS), "dynrank": SECTION}
    dynrank = ds_dynrank.initialize(model, config, total_steps=STEPS)
    grads: list[torch.Tensor] = []
    calls = _probe(dict(dynrank.adapters)[PROBED], grads)
    losses = train_steps(dynrank, STEPS, rank, seed=7)
    result = {
        "losses": losses,
        "importance": dynrank.method.importance.clone(),
        "active": [tuple(h["active"].values()) for h in dynrank.history],
        "state": {k: v.clone() for k, v in gather_full(dynrank.adapters).items()},
        "grads": grads,
        "calls": calls,
        "layers_checkpointed": [layer.gradient_checkpointing for layer in model.model.layers],
    }
    dynrank.engine.destroy()
    return result


def _worker(rank: int, world: int, out_dir: Path) -> None:
    results = {(stage, gc): _run(rank, stage, gc) for stage in STAGES for gc in (False, True)}
    torch.save(results, out_dir / f"gc_rank{rank}.pt")


@pytest.mark.deepspeed
def test_checkpointing_counts_activation_scores_once_and_changes_nothing(run_distributed, tmp_path):
    run_distributed(_worker, tmp_path)
    micro_batches = STEPS * 2
    for rank in range(2):
        results = torch.load(tmp_path / f"gc_rank{rank}.pt")
        for stage in STAGES:
            plain, checked = results[(stage, False)], results[(stage, True)]
            where = f"ZeRO-{stage}, rank {rank}"
            # checkpointing was on: every layer flagged, and the probed layer replayed inside every backward
            assert checked["layers_checkpointed"] == [True, True] and plain["layers_checkpointed"] == [False, False]
            assert plain["calls"] == {"forwards": micro_batches, "recomputed": 0}, where
            assert checked["calls"] == {"forwards": 2 * micro_batches, "recomputed": micro_batches}, where
            # ... and counted nothing twice: the scores and everything trained from them are the unchecked run's
            assert torch.equal(checked["importance"], plain["importance"]), (where, checked["importance"])
            assert plain["importance"].min() > 0 and len(set(plain["active"])) > 1, where  # scores moved the set
            assert checked["active"] == plain["active"], where
            assert checked["losses"] == plain["losses"], where
            # tensor hooks fire once per backward (A and B of the probed module), with the same gradients
            assert len(checked["grads"]) == len(plain["grads"]) == 2 * micro_batches, where
            assert all(torch.equal(a, b) for a, b in zip(checked["grads"], plain["grads"])), where
            assert checked["state"].keys() == plain["state"].keys()
            for name, value in plain["state"].items():
                assert torch.equal(checked["state"][name], value), f"{where}: {name}"
