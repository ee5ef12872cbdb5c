"""Checkpoint hygiene on 2 processes under ZeRO-2, on a model with tied embeddings:
- a crash during a save never makes the half-written checkpoint the latest (`latest` is committed last, after
  every rank wrote its files): simulated at the worst moment, all files written and the commit not done;
- a write that fails on one rank (its file-size limit, as a full disk would) stops both ranks with one error that
  names the checkpoint, and `latest` stays on the previous one, which loads;
- the module state holds only the adapters: the frozen, tied lm_head (and every other frozen weight) is left out;
- `keep` prunes older committed checkpoints only after the new one is committed."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch
from helpers import tiny_ds_config, tiny_llama_config

SECTION = {"method": "l1ra", "r": 4, "schedule": {"start": 1000}}
VOCAB = 2048  # the tied embedding (2048 x 32 fp32, 256 KiB) dwarfs the adapters


def _build():
    from transformers import LlamaForCausalLM

    import ds_dynrank

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB, tie_word_embeddings=True)).float()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    config = {**tiny_ds_config(2, scheduler_steps=40), "dynrank": SECTION}
    return ds_dynrank.initialize(model, config, total_steps=2000)


def _batches(dynrank, steps, rank, seed):
    data = torch.Generator().manual_seed(seed + rank)
    for _ in range(steps * 2):
        ids = torch.randint(0, VOCAB, (2, 12), generator=data)
        loss = dynrank.engine(input_ids=ids, labels=ids).loss
        dynrank.engine.backward(loss)
        dynrank.engine.step()
        dynrank.after_step()


def _worker(rank: int, world: int, out_dir: Path) -> None:
    from ds_dynrank import checkpoint
    from ds_dynrank.errors import CheckpointWriteError

    root = out_dir / "checkpoints"
    dynrank = _build()
    _batches(dynrank, 2, rank, seed=0)
    meta = {"method": "l1ra", "ranks": {}, "scaling": {}}
    save = lambda tag, **kw: checkpoint.save(dynrank.engine, root, tag, {"dynrank": dynrank.state_dict()}, meta, **kw)  # noqa: E731
    save("step2")
    module = torch.load(root / "step2" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and all("lora" in name or "gate" in name or "mask" in name for name in module), sorted(module)
    embedding_bytes = VOCAB * 32 * 4
    assert (root / "step2" / "mp_rank_00_model_states.pt").stat().st_size < embedding_bytes / 2
    _batches(dynrank, 2, rank, seed=1)

    committed = checkpoint.write_text
    checkpoint.write_text = lambda *a, **k: None  # the process dies before committing `latest`
    try:
        save("step4")
    finally:
        checkpoint.write_text = committed
    assert (root / "step4").is_dir()  # the new files are there ...
    assert checkpoint.resolve("latest", root) == (root, "step2")  # ... but the latest is the previous one

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 1:  # rank 1's disk fills up: no file of it may grow past 4 KiB
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(CheckpointWriteError) as failed:
            save("step5")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(failed.value)
    assert str(root / "step5") in message and "`latest` still names step2" in message, message
    assert failed.value.local == (rank == 1)
    assert ("on rank 1: " in message and "free there now" in message) if rank == 1 else "on rank(s) [1]" in message
    assert checkpoint.resolve("latest", root) == (root, "step2")

    save("step6", keep=1)  # committed, then the older ones go
    assert checkpoint.resolve("latest", root) == (root, "step6")
    assert checkpoint.committed_tags(root) == ["step6"] and not (root / "step2").exists()
    checkpoint.verify(root, "step6")
    dynrank.engine.destroy()

    fresh = _build()
    _, client = fresh.engine.load_checkpoint(str(root), tag="step6", load_module_strict=False)
    fresh.load_state_dict(client["dynrank"])
    assert fresh.engine.global_steps == 4 and fresh.applied_steps == 4
    assert fresh.engine.module.lm_head.weight is fresh.engine.module.model.embed_tokens.weight  # still tied
    _batches(fresh, 1, rank, seed=2)  # and training goes on from it
    assert fresh.engine.global_steps == 5
    fresh.engine.destroy()
    (out_dir / f"ok{rank}").write_text("ok")


@pytest.mark.deepspeed
def test_checkpoint_commit_failing_writes_tied_weights_and_pruning(run_distributed, tmp_path):
    run_distributed(_worker, tmp_path)
    assert all((tmp_path / f"ok{r}").exists() for r in range(2))
