"""Shared fixtures: local model and data artefacts, and a 2-process gloo harness (file store, no ports)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import (  # noqa: E402
    build_tiny_chat_model_dir,
    build_tiny_model_dir,
    l1ra_command,
    l1ra_config,
    math_messages,
    sentences,
    subprocess_env,
    write_csv,
    write_jsonl,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory) -> Path:
    return build_tiny_chat_model_dir(tmp_path_factory.mktemp("tiny_chat_llama"))


@pytest.fixture(scope="session")
def tiny_sft_jsonl(tmp_path_factory) -> Path:
    """A small SFT file in `messages` format (its held-out quarter is split off by the job)."""
    return write_jsonl(tmp_path_factory.mktemp("sft") / "math.jsonl", math_messages(96))


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "reviews.csv", sentences(96))


def _worker(rank: int, world_size: int, store: str, fn, args) -> None:
    import torch
    import torch.distributed as dist

    # what a launcher would export; DeepSpeed asserts on LOCAL_RANK
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_SIZE=str(world_size),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=180))
    finished = False
    try:
        fn(rank, world_size, *args)
        finished = True
    finally:
        # DeepSpeed's CPU all-reduce buffer of this rank: every peer mapped it at init, so its name can go (launched
        # runs do this in ds_dynrank.dist.init)
        from ds_dynrank.dist import shm_buffer_path

        shm_buffer_path(rank).unlink(missing_ok=True)
        if finished:
            # gloo's barrier first waits for this rank's pending work, so no rank closes its connections while a
            # peer still has an op in flight (a peer aborted once that way, "terminate called without an active
            # exception"); after a failure there is no barrier, a failed peer must not hang the others
            dist.barrier()
        dist.destroy_process_group()


# The workers come from a fork server that imported these once per test session: a spawned worker spends about
# 10 s importing them again. The server imports and never runs torch ops (no thread pools exist when it forks), and
# each worker sets its own environment (_worker), so nothing of one test reaches the next.
FORKSERVER_PRELOAD = ["torch", "deepspeed", "transformers", "transformers.modeling_utils", "peft", "ds_dynrank"]


@pytest.fixture
def run_distributed(tmp_path):
    """run_distributed(fn, *args, world_size=2) runs fn(rank, world_size, *args) in N gloo processes.

    fn must be importable (module level). A failure in any process fails the test; the others are terminated.
    """
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)

    def run(fn, *args, world_size: int = 2) -> None:
        store = f"file://{tmp_path / 'store'}"
        mp.start_processes(
            _worker, args=(world_size, store, fn, args), nprocs=world_size, join=True, start_method="forkserver"
        )

    return run


@pytest.fixture(scope="session")
def l1ra_run(tmp_path_factory, tiny_model_dir, tiny_csv):
    """l1ra_run(name) -> (config path, output dir) of the uninterrupted 2-process L1RA run that the resume and
    reshard tests share (tests/e2e), launched on the first request only.
    Readers may add files next to it (a universal conversion) but must not change what is there."""
    runs: dict[str, tuple[str, Path]] = {}

    def get(name: str) -> tuple[str, Path]:
        if name not in runs:
            directory = tmp_path_factory.mktemp(f"l1ra-{name.removesuffix('.json')}")
            cfg, out = l1ra_config(directory, name), directory / "whole"
            done = subprocess.run(
                l1ra_command(cfg, tiny_model_dir, tiny_csv, out),
                env=subprocess_env(),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr[-4000:]
            runs[name] = cfg, out
        return runs[name]

    return get
