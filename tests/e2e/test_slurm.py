"""Multi-node launch for real: the project's own sbatch scripts on a 2-node SLURM cluster started on this machine
(loopback), and `mpirun -np 2`. Debian's slurm and Open MPI packages are installed if missing; without root or apt
the tests skip, except in CI (CI=true), where they fail."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from helpers import PYTHON, REPO, error_lines, free_port, l1ra_command, subprocess_env
from slurm_cluster import Cluster, install_packages
from test_resume import _history as _history_of
from test_resume import assert_continues_exactly

from ds_dynrank import holds

TRAIN = str(REPO / "launch" / "train.py")
CHECKSUM = re.compile(r"allocation checksum ([0-9a-f]{16}) \(rank (\d+)\)")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the SLURM/MPI tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def packages() -> None:
    reason = install_packages()
    if reason:
        _unavailable(reason)


@pytest.fixture(scope="module")
def cluster(packages, tmp_path_factory):
    if os.geteuid() != 0:
        _unavailable("slurmd runs as root (SlurmUser=root) in this test cluster")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _l1ra_config(tmp_path) -> str:
    """zero2_l1ra.json with a strong L1 pull and events every 2 steps, so ranks move within 8 steps."""
    cfg = json.loads((REPO / "ds_configs" / "zero2_l1ra.json").read_text())
    cfg["dynrank"]["l1ra"].update(l1_lambda=4.0, gate_lr=0.05)
    cfg["dynrank"]["schedule"].update(interval=2)
    path = tmp_path / "l1ra.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _train_args(config: str, model, data, out, steps: int = 8) -> list[str]:
    return [
        "--deepspeed",
        config,
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--task",
        "classification",
        "--max_steps",
        str(steps),
        "--eval_interval",
        "0",
        "--eval_samples",
        "16",
        "--output_dir",
        str(out),
    ]


def _checksums(log: str) -> dict[int, str]:
    return {int(rank): digest for digest, rank in CHECKSUM.findall(log)}


def _held_job_env(hold: str, marker: Path) -> dict[str, str]:
    """A job's environment that holds its ranks at `hold` (ds_dynrank/holds.py). Node names do not resolve on this
    machine; the scripts take MASTER_ADDR from the environment when it is set."""
    return subprocess_env(
        PYTHON=PYTHON,
        DS_DYNRANK_REPO=str(REPO),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        DS_DYNRANK_HOLD=hold,
        DS_DYNRANK_HOLD_FILE=str(marker),
    )


def _held(cluster, job: str, log: Path, marker: Path, ranks: int = 2, timeout: float = 240) -> None:
    """Until every rank of `job` holds at its step; fails at once, with the job's log, if the job ends first."""
    deadline = time.time() + timeout
    while not all(Path(f"{marker}.rank{r}").is_file() for r in range(ranks)):
        fields = cluster.fields(job)
        assert fields.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), f"{fields}\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"the job never held at its step ({marker})\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


@pytest.mark.e2e
def test_sbatch_two_nodes_warned_by_the_time_limit_requeued_and_resumed_exactly(
    cluster, tiny_model_dir, tiny_csv, tmp_path, l1ra_run
):
    """launch/slurm/train.sbatch, 2 nodes x 1 task, L1RA, under a real 1-minute time limit with the shipped kind of
    warning (`--signal=B:USR1@20`; the script's own is @120): SLURM itself warns the batch script, at most 40 s in
    (the warning time plus its 30 s check period before the limit), while the tasks hold at step 5 so the run cannot
    end first. The script passes the warning to both tasks through srun; they checkpoint the step they are at and
    exit 75, the job requeues itself (`scontrol requeue`) before the limit, and a second start of the same command
    continues from the checkpoint (`--resume auto`): the allocation history, every step's loss and the final metric
    equal the uninterrupted 2-process run's, and both nodes end with the same allocation."""
    cfg, whole = l1ra_run("zero2_l1ra.json")
    out, log, marker = tmp_path / "run", tmp_path / "job.out", tmp_path / "held"
    env = _held_job_env("step:5", marker)
    args = l1ra_command(cfg, tiny_model_dir, tiny_csv, out, launcher=[])[1:]  # the same job; srun starts the ranks
    limit = ("--time=1", "--signal=B:USR1@20")
    script = REPO / "launch" / "slurm" / "train.sbatch"
    job = cluster.submit(script, args, env=env, cwd=tmp_path, output=log, options=limit)
    deadline = time.time() + 150  # the first attempt: warned, checkpoint, exit 75, `scontrol requeue`
    while "requeueing job" not in (text := log.read_text() if log.exists() else ""):
        assert time.time() < deadline, f"{cluster.fields(job)}\n{text[-3000:]}"
        time.sleep(0.5)
    # Slurm holds a requeued job back for a while before it starts again (BeginTime); rather than wait for that
    # here, cancel it and submit the same command again: the second start is what the requeued one would run
    cluster.wait_requeued(job, timeout=60)
    cluster.signal(job, None)
    cluster.wait_idle(timeout=90)
    text = log.read_text()
    assert "[slurm] warning signal" in text, text[-3000:]
    assert re.search(r"stopped: a stop signal reached rank\(s\) \[[01, ]+\] \(SIGUSR1 here\)", text), text[-3000:]
    assert "DUE TO TIME LIMIT" not in text, text[-3000:]  # warned and gone before the limit
    stopped = re.search(r"checkpoint \S+ is committed at step (\d+)", text)
    assert stopped and 1 <= int(stopped[1]) <= 5, text[-3000:]  # wherever the warning found it, held at 5 at most
    assert (out / "checkpoints" / "latest").read_text() == f"step{stopped[1]}"
    unheld = {k: v for k, v in env.items() if k not in (holds.HOLD, holds.HOLD_FILE)}  # it may resume before 5
    again = cluster.submit(script, args, env=unheld, cwd=tmp_path, output=log)
    fields = cluster.wait(again, timeout=240)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), f"{fields}\n{text[-5000:]}"
    assert fields["NodeList"] == "node[1-2]" and fields["NumTasks"] == "2"
    sums = _checksums(text)
    assert sorted(sums) == [0, 1] and sums[0] == sums[1], f"both tasks must finish with one allocation\n{text[-3000:]}"
    assert_continues_exactly(whole, out)
    assert json.loads((out / "allocation.json").read_text()) == _history_of(out)[-1]["ranks"]


@pytest.mark.e2e
def test_plain_scancel_checkpoints_and_ends_without_requeue(cluster, tiny_model_dir, tiny_csv, tmp_path):
    """A plain `scancel` (SIGTERM to the batch script and every task, as at the time limit itself): both tasks
    checkpoint the step they are at and the job ends cancelled, not requeued; the progress is there to continue."""
    out, log, marker = tmp_path / "run", tmp_path / "job.out", tmp_path / "held"
    env = _held_job_env("step:3", marker)
    args = _train_args(_l1ra_config(tmp_path), tiny_model_dir, tiny_csv, out)
    job = cluster.submit(REPO / "launch" / "slurm" / "train.sbatch", args, env=env, cwd=tmp_path, output=log)
    _held(cluster, job, log, marker)
    cluster.signal(job, None)
    fields = cluster.wait(job, timeout=120)  # CANCELLED at once, while the tasks still save within KillWait
    cluster.wait_idle(timeout=90)  # the nodes are idle only once every process of the step has exited
    text = log.read_text()
    assert (fields["JobState"], fields["Restarts"]) == ("CANCELLED", "0"), f"{fields}\n{text[-5000:]}"
    assert (out / "checkpoints" / "latest").read_text() == "step3", text[-3000:]
    assert not (out / "metrics.json").exists()


@pytest.mark.e2e
def test_srun_mpi_pmix_two_nodes_stopped_by_scancel_signal_usr1(cluster, tiny_model_dir, tiny_csv, tmp_path):
    """launch/slurm/mpi.sbatch: `srun --mpi=pmix` across the two nodes, ranks read from SLURM's environment; held at
    step 3, `scancel --signal=USR1` (to the job's tasks, not the batch script): both tasks checkpoint step 3 and
    exit 75, and the job, not warned itself, ends without requeueing, its progress kept for the next sbatch."""
    out, log, marker = tmp_path / "run", tmp_path / "job.out", tmp_path / "held"
    env = _held_job_env("step:3", marker)
    args = _train_args(str(REPO / "ds_configs" / "zero2.json"), tiny_model_dir, tiny_csv, out, steps=4)
    job = cluster.submit(REPO / "launch" / "slurm" / "mpi.sbatch", args, env=env, cwd=tmp_path, output=log)
    _held(cluster, job, log, marker)
    cluster.signal(job, "USR1")
    fields = cluster.wait(job, timeout=120)
    cluster.wait_idle(timeout=90)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("FAILED", "75:0", "0"), f"{fields}\n{text}"
    assert re.search(r"stopped: a stop signal reached rank\(s\) \[0, 1\] \(SIGUSR1 here\)", text), text[-3000:]
    assert "[slurm] warning signal" not in text  # the tasks got it, not the batch script
    assert (out / "checkpoints" / "latest").read_text() == "step3" and not (out / "metrics.json").exists()


@pytest.mark.e2e
def test_deepspeed_per_node_mpirun_and_single_node_sbatch(cluster, tiny_model_dir, tiny_csv, tmp_path):
    """deepspeed.sbatch (the launcher once per node, hostfile), mpi.sbatch's mpirun variant and single_node.sbatch
    (2 tasks on one node), queued together."""
    mpirun = {
        "DS_DYNRANK_MPIRUN": "1",
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_btl": "self,tcp",
        "OMPI_MCA_btl_tcp_if_include": "lo",
        "OMPI_MCA_oob_tcp_if_include": "lo",
    }
    jobs = {
        "deepspeed": ({"HOSTFILE": str(tmp_path / "hostfile")}, "deepspeed.sbatch"),
        "mpirun": (mpirun, "mpi.sbatch"),
        "single_node": ({}, "single_node.sbatch"),
    }
    submitted = {}
    for name, (extra, script) in jobs.items():
        env = subprocess_env(
            PYTHON=PYTHON, DS_DYNRANK_REPO=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), **extra
        )
        args = _train_args(str(REPO / "ds_configs" / "zero2.json"), tiny_model_dir, tiny_csv, tmp_path / name, 2)
        log = tmp_path / f"{name}.out"
        submitted[name] = (
            cluster.submit(REPO / "launch" / "slurm" / script, args, env=env, cwd=tmp_path, output=log),
            log,
        )
    for name, (job, log) in submitted.items():
        fields = cluster.wait(job, timeout=240)
        text = log.read_text()
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), f"{name} {fields}\n{text[-5000:]}"
        sums = _checksums(text)
        assert sorted(sums) == [0, 1] and sums[0] == sums[1], f"{name}\n{text[-3000:]}"
        assert json.loads((tmp_path / name / "metrics.json").read_text())["world_size"] == 2
        assert fields["NodeList"] == ("node1" if name == "single_node" else "node[1-2]"), fields
    assert (tmp_path / "hostfile").read_text() == "node1 slots=1\nnode2 slots=1\n"


@pytest.mark.e2e
def test_mpirun_two_processes(packages, tiny_model_dir, tiny_csv, tmp_path):
    """`mpirun -np 2 python launch/train.py`: ranks from OMPI_COMM_WORLD_*, rendezvous on loopback."""
    out = tmp_path / "run"
    env = subprocess_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", MASTER_PORT=str(free_port()))
    args = _train_args(str(REPO / "ds_configs" / "zero2.json"), tiny_model_dir, tiny_csv, out, steps=4)
    cmd = [
        "mpirun",
        "-np",
        "2",
        "--mca",
        "btl",
        "self,vader",
        "--mca",
        "oob_tcp_if_include",
        "lo",
        "-x",
        "PYTHONPATH",
        "-x",
        "MASTER_PORT",
        "-x",
        "DS_ACCELERATOR",
        "-x",
        "GLOO_SOCKET_IFNAME",
        "-x",
        "OMP_NUM_THREADS",
        "-x",
        "HF_HUB_OFFLINE",
        "-x",
        "TORCH_EXTENSIONS_DIR",
        PYTHON,
        TRAIN,
        *args,
    ]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"STDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}"
    sums = _checksums(result.stdout)
    assert sorted(sums) == [0, 1] and sums[0] == sums[1], result.stdout[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4


INCONSISTENT = {
    "srun_without_master": (
        {
            "SLURM_STEP_ID": "0",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": "0",
            "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        },
        r"^error: distributed launch: MASTER_ADDR not set for a multi-node run",
    ),
    "mpirun_world_mismatch": (
        {
            "OMPI_COMM_WORLD_RANK": "0",
            "OMPI_COMM_WORLD_SIZE": "2",
            "WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        },
        r"^error: distributed launch: WORLD_SIZE=4 but the launcher started 2 tasks$",
    ),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", sorted(INCONSISTENT))
def test_inconsistent_launch_fails_fast(case, tiny_model_dir, tiny_csv, tmp_path):
    """What srun or mpirun would export, but inconsistent: one line, exit code 2, before any rendezvous can hang."""
    launcher_env, pattern = INCONSISTENT[case]
    env = {k: v for k, v in subprocess_env(**launcher_env).items() if k not in {"MASTER_ADDR", "RANK"}}
    args = _train_args(str(REPO / "ds_configs" / "zero2.json"), tiny_model_dir, tiny_csv, tmp_path / "out")
    result = subprocess.run([PYTHON, TRAIN, *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and re.match(pattern, errors[0]), result.stderr[-3000:]
    assert not (tmp_path / "out").exists()
