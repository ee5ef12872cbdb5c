"""The scale path, 2 real processes: under ZeRO-3 the base model is built partitioned (no rank ever holds it whole),
trains exactly as the same model built whole and partitioned by deepspeed.initialize, and a physical rebuild
neither re-gathers nor re-partitions the frozen weights; with bf16 the base weights are loaded in bf16 and only the
adapters carry fp32 masters. (End to end, every ZeRO-3 run of launch/train.py takes this path: checkpoint,
resume, resharding and export are tested there.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_ds_config, train_steps
from test_masked_reshape import forced_plan
from test_physical_reshape import SECTION  # L1RA on the physical backend, events forced by the test


def _config(bf16: bool = False) -> dict:
    config = {**tiny_ds_config(3, scheduler_steps=40), "dynrank": SECTION}
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


def _base(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" not in n]


def _run(model, config, rank: int) -> tuple[list[float], int, object]:
    """3 steps, one forced physical event, 3 more: the losses, the bytes the event sent, the controller."""
    import ds_dynrank
    from ds_dynrank import dist
    from ds_dynrank.zero import full_numel

    torch.manual_seed(0)  # the adapters' initial A: the same draws for both constructions
    dynrank = ds_dynrank.initialize(model, config, total_steps=2000)
    losses = train_steps(dynrank, 3, rank, seed=10)
    base = _base(dynrank.engine.module)
    partitions = [p.ds_tensor.data_ptr() for p in base]
    frozen_bytes = sum(full_numel(p) * p.element_size() for p in base)
    with dist.counting_bytes() as sent:
        dynrank.reallocate(forced_plan([layer.live_slots() for _, layer in dynrank.adapters]))
    assert 0 < sent.bytes < frozen_bytes, (sent.bytes, frozen_bytes)
    base = _base(dynrank.engine.module)
    assert [p.ds_tensor.data_ptr() for p in base] == partitions  # the frozen partitions were not rebuilt
    assert all(p.numel() == 0 for p in base)  # nor left gathered
    losses += train_steps(dynrank, 3, rank, seed=20)
    return losses, sent.bytes, dynrank


def _worker(rank: int, world: int, model_dir: str, out_dir: Path) -> None:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from ds_dynrank.task.models import load_model, training_dtype
    from ds_dynrank.zero.state import read_full_fp32

    config = _config()
    model = load_model(model_dir, dtype=training_dtype(config), ds_config=config)
    base = _base(model)
    # partitioned as it was built, before any engine: each rank holds its share of every weight and nothing else
    assert all(getattr(p, "ds_status", None) is ZeroParamStatus.NOT_AVAILABLE for p in base)
    assert all(p.numel() == 0 for p in base)
    assert sum(p.ds_tensor.numel() for p in base) == sum(-(-p.ds_numel // world) for p in base)
    partitioned, sent, _ = _run(model, config, rank)

    whole = load_model(model_dir)  # the same weights built whole on every rank, partitioned by initialize
    assert all(p.numel() > 0 for p in whole.parameters())
    reference, sent_whole, _ = _run(whole, config, rank)
    assert partitioned == reference, (partitioned, reference)
    assert sent == sent_whole  # the rebuild moves the adapters' state alone, however the base was built

    config = _config(bf16=True)
    model = load_model(model_dir, dtype=training_dtype(config), ds_config=config)
    assert {p.dtype for p in _base(model)} == {torch.bfloat16}  # loaded in the training precision
    losses, _, dynrank = _run(model, config, rank)
    assert all(torch.isfinite(torch.tensor(losses)))
    for _, layer in dynrank.adapters:  # working copies in bf16, masters in fp32
        assert layer.lora_A.dtype == torch.bfloat16
        assert read_full_fp32(layer.lora_A).dtype == torch.float32
    dynrank.engine.destroy()
    torch.save(partitioned, out_dir / f"losses_rank{rank}.pt")


@pytest.mark.deepspeed
def test_zero3_builds_the_base_model_partitioned_and_trains_as_whole(run_distributed, tiny_model_dir, tmp_path):
    run_distributed(_worker, str(tiny_model_dir), tmp_path)
    for rank in range(2):
        assert len(torch.load(tmp_path / f"losses_rank{rank}.pt")) == 6 * 2  # both ranks ran to the end
