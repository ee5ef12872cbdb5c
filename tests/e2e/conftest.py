"""The uninterrupted 2-process L1RA runs that the resume and reshard tests share: one launch per config for both."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import l1ra_command, l1ra_config, subprocess_env


@pytest.fixture(scope="session")
def l1ra_run(tmp_path_factory, tiny_model_dir, tiny_csv):
    """l1ra_run(name) -> (config path, output dir) of the finished run, launched on the first request only.
    Readers may add files next to it (a universal conversion) but must not change what is there."""
    runs: dict[str, tuple[str, Path]] = {}

    def get(name: str) -> tuple[str, Path]:
        if name not in runs:
            directory = tmp_path_factory.mktemp(f"l1ra-{name.removesuffix('.json')}")
            cfg, out = l1ra_config(directory, name), directory / "whole"
            done = subprocess.run(l1ra_command(cfg, tiny_model_dir, tiny_csv, out), env=subprocess_env(),
                                  capture_output=True, text=True, timeout=300)  # fmt: skip
            assert done.returncode == 0, done.stderr[-4000:]
            runs[name] = cfg, out
        return runs[name]

    return get
