"""A checkpoint this version cannot continue is refused before anything starts, naming why: another format
version, another method, another number of processes (with the way out), or no checkpoint at all."""

from __future__ import annotations

import json

import pytest

from ds_dynrank import checkpoint
from ds_dynrank.errors import UserInputError


def saved(tmp_path, **meta):
    root = tmp_path / "checkpoints"
    (root / "step4").mkdir(parents=True)
    (root / "latest").write_text("step4")
    base = {"version": checkpoint.FORMAT_VERSION, "method": "l1ra", "ranks": {"m": 4}, "world_size": 2}
    (root / "step4" / checkpoint.ALLOCATION).write_text(json.dumps({**base, **meta}))
    return root


def test_a_run_directory_a_root_and_a_tag_all_resolve(tmp_path):
    root = saved(tmp_path)
    for where in (tmp_path, root, root / "step4"):
        assert checkpoint.resolve(str(where), tmp_path / "unused") == (root, "step4")
    with pytest.raises(UserInputError, match=r"--resume: no checkpoint in .*nowhere \(expected a 'latest' file"):
        checkpoint.resolve(str(tmp_path / "nowhere"), tmp_path)


def test_another_format_version_is_refused(tmp_path):
    root = saved(tmp_path, version=0)
    with pytest.raises(UserInputError, match=r"checkpoint .*step4: format 0, this version reads 1"):
        checkpoint.saved_allocation(root, "step4", "l1ra")


def test_another_method_is_refused(tmp_path):
    root = saved(tmp_path)
    with pytest.raises(
        UserInputError, match=r"--resume: checkpoint was trained with method 'l1ra', config says 'alora'"
    ):
        checkpoint.saved_allocation(root, "step4", "alora")
    assert checkpoint.saved_allocation(root, "step4", "l1ra") == {"m": 4}


def test_another_world_size_points_to_reshard_unless_universal(tmp_path):
    root = saved(tmp_path)
    checkpoint.check_world_size(root, "step4", 2)
    with pytest.raises(UserInputError, match=r"saved by 2 processes and this run has 4.*python -m ds_dynrank reshard"):
        checkpoint.check_world_size(root, "step4", 4)
    universal = saved(tmp_path / "u", universal=True)
    checkpoint.check_world_size(universal, "step4", 4)  # loads at any number of processes
