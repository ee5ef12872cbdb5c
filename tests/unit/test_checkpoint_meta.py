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


def _written(tmp_path):
    """A checkpoint with two torch files and the manifest a save writes."""
    import torch

    from ds_dynrank.rundir import write_json

    root = saved(tmp_path)
    tag = root / "step4"
    torch.save({"w": torch.arange(4096.0)}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"module": {"a": torch.ones(8)}}, tag / "mp_rank_00_model_states.pt")
    write_json(tag / checkpoint.MANIFEST, checkpoint._file_sizes(tag))
    return root, tag


def test_a_complete_checkpoint_verifies(tmp_path):
    root, _ = _written(tmp_path)
    checkpoint.verify(root, "step4")


def test_a_truncated_file_is_named(tmp_path):
    root, tag = _written(tmp_path)
    optim = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:-100])
    with pytest.raises(UserInputError, match=rf"checkpoint file {optim} is \d+ bytes, \d+ were written \(truncated"):
        checkpoint.verify(root, "step4")
    (tag / checkpoint.MANIFEST).unlink()  # an older checkpoint, without a manifest: the zip check still sees it
    with pytest.raises(UserInputError, match=rf"checkpoint file {optim} cannot be read"):
        checkpoint.verify(root, "step4")


def test_a_corrupted_byte_and_a_missing_file_are_named(tmp_path):
    root, tag = _written(tmp_path)
    optim = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(optim.read_bytes())
    middle = data.index(b"\x00\x00\x80\x3f")  # inside the tensor bytes (1.0 as float32), not in the zip metadata
    data[middle + 2] ^= 0xFF  # same size, one byte flipped
    optim.write_bytes(bytes(data))
    with pytest.raises(UserInputError, match=rf"checkpoint file {optim} is corrupted"):
        checkpoint.verify(root, "step4")
    root, tag = _written(tmp_path / "again")
    (tag / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(UserInputError, match=r"checkpoint file .*mp_rank_00_model_states.pt is missing"):
        checkpoint.check_resumable(root, "step4", method="l1ra", modules=["m"], world_size=2)


def test_pruning_keeps_the_newest_and_never_the_latest(tmp_path):
    from ds_dynrank.rundir import write_json

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (root / f"step{step}").mkdir(parents=True)
        write_json(root / f"step{step}" / checkpoint.MANIFEST, {})
    (root / "step10").mkdir()  # being written: no manifest yet, not a checkpoint to count or delete
    (root / "latest").write_text("step4")  # e.g. the newer ones were written but never committed
    assert checkpoint.prune(root, keep=2) == ["step2"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step10", "step4", "step6", "step8"]
