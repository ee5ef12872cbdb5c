"""A crash during a save never makes the half-written checkpoint the latest: `latest` is committed last, after
every rank wrote its files. Simulated at the worst moment (all files written, commit not done), on 2 processes
under ZeRO-2: `latest` still names the previous checkpoint, and it loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import build_dynrank, train_steps

SECTION = {"method": "l1ra", "r": 4, "schedule": {"start": 1000}}


def _worker(rank: int, world: int, out_dir: Path) -> None:
    from ds_dynrank import checkpoint

    root = out_dir / "checkpoints"
    dynrank = build_dynrank(2, SECTION)
    train_steps(dynrank, 2, rank, seed=0)
    meta = {"method": "l1ra", "ranks": {}, "scaling": {}}
    checkpoint.save(dynrank.engine, root, "step2", {"dynrank": dynrank.state_dict()}, meta)
    train_steps(dynrank, 2, rank, seed=1)

    committed = checkpoint._write_text_atomic
    checkpoint._write_text_atomic = lambda path, text: None  # the process dies before committing `latest`
    try:
        checkpoint.save(dynrank.engine, root, "step4", {"dynrank": dynrank.state_dict()}, meta)
    finally:
        checkpoint._write_text_atomic = committed
    assert (root / "step4").is_dir()  # the new files are there ...
    assert checkpoint.resolve("latest", root) == (root, "step2")  # ... but the latest is the previous one
    dynrank.engine.destroy()

    fresh = build_dynrank(2, SECTION)
    _, client = fresh.engine.load_checkpoint(str(root), tag="step2", load_module_strict=False)
    fresh.load_state_dict(client["dynrank"])
    assert fresh.engine.global_steps == 2 and fresh.applied_steps == 2
    train_steps(fresh, 1, rank, seed=2)  # and training goes on from it
    assert fresh.engine.global_steps == 3
    fresh.engine.destroy()
    (out_dir / f"ok{rank}").write_text("ok")


@pytest.mark.deepspeed
def test_crash_before_commit_keeps_the_previous_checkpoint(run_distributed, tmp_path):
    run_distributed(_worker, tmp_path)
    assert all((tmp_path / f"ok{r}").exists() for r in range(2))
