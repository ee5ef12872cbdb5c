"""The pure mapping from a launcher's environment (mpirun, srun) to what DeepSpeed's env:// rendezvous reads."""

from __future__ import annotations

import pytest

from ds_dynrank.errors import UserInputError
from ds_dynrank.launch_env import check_launch_env, launch_env

SRUN_TASK = {
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "MASTER_ADDR": "node1",
}
MPIRUN_RANK = {
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_SIZE": "2",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
}


def test_a_launcher_that_set_rank_is_left_alone():
    assert launch_env({"RANK": "0", "WORLD_SIZE": "2", **SRUN_TASK, **MPIRUN_RANK}) == {}
    assert launch_env({}) == {}


def test_srun_task_maps_to_rank_world_local():
    assert launch_env(SRUN_TASK) == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "2",
        "MASTER_ADDR": "node1",
        "MASTER_PORT": "29500",
    }


def test_uneven_tasks_per_node_take_this_nodes_count():
    env = {
        **SRUN_TASK,
        "SLURM_NTASKS": "5",
        "SLURM_PROCID": "4",
        "SLURM_NODEID": "2",
        "SLURM_LOCALID": "0",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2),1",
    }
    assert launch_env(env)["LOCAL_SIZE"] == "1"


def test_the_batch_shell_and_one_task_steps_stay_single_process():
    batch_shell = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}
    assert launch_env(batch_shell) == {}
    assert launch_env({**SRUN_TASK, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == {}


def test_mpirun_on_one_host_defaults_to_loopback():
    assert launch_env({**MPIRUN_RANK, "MASTER_PORT": "29611"}) == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29611",
    }


def test_mpirun_wins_over_the_srun_step_it_runs_in():
    assert launch_env({**SRUN_TASK, **MPIRUN_RANK})["RANK"] == "1"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({**SRUN_TASK, "MASTER_ADDR": ""}, r"^distributed launch: MASTER_ADDR not set for a multi-node run"),
        ({**MPIRUN_RANK, "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}, r"MASTER_ADDR not set"),
        ({**SRUN_TASK, "WORLD_SIZE": "8"}, r"^distributed launch: WORLD_SIZE=8 but the launcher started 4 tasks$"),
    ],
)
def test_inconsistent_starts_fail_with_one_line(env, message):
    with pytest.raises(UserInputError, match=message) as err:
        launch_env(env)
    assert "\n" not in str(err.value)


def test_check_launch_env_sees_the_mapped_variables():
    check_launch_env(SRUN_TASK)  # complete after mapping
    with pytest.raises(UserInputError, match="RANK=2 is outside WORLD_SIZE=2"):
        check_launch_env({**MPIRUN_RANK, "OMPI_COMM_WORLD_RANK": "2"})
    with pytest.raises(UserInputError, match="RANK set but WORLD_SIZE, MASTER_ADDR, MASTER_PORT missing"):
        check_launch_env({"RANK": "0"})
