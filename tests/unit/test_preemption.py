"""The pieces of a stop that keeps its progress, in one process: a signal is only recorded (the first names the
stop, a second changes nothing), the hold test hook waits where asked and only there, and files the run writes
follow the user's umask instead of tempfile's private modes."""

from __future__ import annotations

import os
import signal
import stat

import pytest
from helpers import REPO

from ds_dynrank import holds
from ds_dynrank.preemption import StopRequest
from ds_dynrank.rundir import follow_umask, temp_sibling, write_json, write_text


def test_a_signal_is_recorded_and_a_second_one_changes_nothing():
    stop = StopRequest().install()
    try:
        assert stop.agreed() == []
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning
        os.kill(os.getpid(), signal.SIGTERM)  # then the launcher passing on its own SIGTERM: the process lives on
        assert stop.agreed() == [0] and stop.name == "SIGUSR1"
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_hold_waits_only_where_asked(monkeypatch, tmp_path):
    calls = []
    holds.hold("step", 4, release=lambda: calls.append(1) or True)  # not requested: returns at once
    assert calls == []
    monkeypatch.setenv(holds.HOLD, "step:4")
    monkeypatch.setenv(holds.HOLD_FILE, str(tmp_path / "held"))
    holds.hold("step", 3, release=lambda: calls.append(1) or True)
    holds.hold("event", 4, release=lambda: calls.append(1) or True)
    assert calls == [] and not list(tmp_path.iterdir())
    holds.hold("step", 4, release=lambda: len(calls.append(1) or calls) >= 3, poll_s=0.01)
    assert len(calls) == 3 and (tmp_path / "held.rank0").is_file()
    monkeypatch.setattr(holds, "TIMEOUT_S", 0.05)
    with pytest.raises(RuntimeError, match="held for 0 s and no signal came"):
        holds.hold("step", 4, release=lambda: False, poll_s=0.01)


def test_written_files_and_directories_follow_the_umask(tmp_path):
    previous = os.umask(0o002)  # a team's shared-group umask
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_text(tmp_path / "latest", "step4", fsync=True)
        built = temp_sibling(tmp_path / "adapter", directory=True)
        (built / "inner").mkdir()
        (built / "inner" / "weights").write_bytes(b"0")
        os.chmod(built / "inner" / "weights", 0o600)
        follow_umask(built)
    finally:
        os.umask(previous)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a.json") == mode(tmp_path / "latest") == 0o664
    assert mode(built) == mode(built / "inner") == 0o775 and mode(built / "inner" / "weights") == 0o664


def test_the_handler_installs_before_torch_loads(tmp_path):
    """launch/train.py installs it first of all, so a warning during imports or model loading is not fatal."""
    import subprocess
    import sys

    code = (
        "import os, signal, sys\n"
        "from ds_dynrank.preemption import StopRequest\n"
        "stop = StopRequest().install()\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "assert 'torch' not in sys.modules and stop.name == 'SIGUSR1', sorted(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    train = (REPO / "launch" / "train.py").read_text()
    main = train[train.index('if __name__ == "__main__":') :]
    assert main.index("StopRequest().install()") < main.index("run_main(")  # and run_main is what loads torch
