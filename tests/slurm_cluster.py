"""A real 2-node SLURM cluster on this one machine, on loopback: a private munged, slurmctld and two slurmd daemons
(node1, node2) with their own ports, spool and tmp directories. Every daemon writes a PID file, and stop() kills
exactly those PIDs."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from helpers import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "openmpi-bin", "libopenmpi-dev"]
COMMANDS = ["slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey", "mpirun"]
NODES = ("node1", "node2")


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None]


def install_packages() -> str | None:
    """apt-get the Debian packages if a command is missing; the reason it cannot, or None when all is there."""
    if not missing_commands():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"needs root and apt-get to install {', '.join(PACKAGES)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            return f"{' '.join(cmd[:2])} failed: {result.stderr.strip()[-500:]}"
    missing = missing_commands()
    return f"still missing after install: {', '.join(missing)}" if missing else None


def slurm_conf(root: Path, munge_socket: Path) -> str:
    """The essentials for daemons without systemd or cgroups, nodes told apart by %n."""
    lines = [
        "ClusterName=dsdynrank",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        "SlurmUser=root",
        f"AuthInfo=socket={munge_socket}",
        "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
        f"StateSaveLocation={root}/state",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmdLogFile={root}/slurmd-%n.log",
        f"TmpFS={root}/tmp/%n",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerParameters=batch_sched_delay=0",
        "ReturnToService=2",
        "MpiDefault=none",
        "SlurmdParameters=config_overrides",
        "MailProg=/bin/true",
    ]
    lines += [
        f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={free_port()} CPUs=2 State=UNKNOWN" for n in NODES
    ]
    lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


class Cluster:
    """start() brings the daemons up and waits until both nodes are idle; stop() is safe to call at any point."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def pid_files(self) -> list[Path]:
        return [self.root / "munged.pid", self.root / "slurmctld.pid"] + [self.root / f"slurmd-{n}.pid" for n in NODES]

    def start(self, timeout: float = 60.0) -> None:
        for sub in ("munge", "state", *(f"spool/{n}" for n in NODES), *(f"tmp/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        self._run(["mungekey", "--create", f"--keyfile={key}"])
        os.chmod(key, 0o400)
        self._run(
            [
                "munged",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'munged.pid'}",
                f"--log-file={self.root / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'seed'}",
            ]
        )
        self.conf.write_text(slurm_conf(self.root, self.munge_socket))
        self._run(["slurmctld", "-f", str(self.conf)])
        for node in NODES:
            self._run(["slurmd", "-N", node, "-f", str(self.conf)])
        self.wait_idle(timeout)

    def _run(self, cmd: list[str]) -> None:
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({result.returncode}): {result.stderr.strip()}\n{self.logs()}")

    def wait_idle(self, timeout: float) -> None:
        """Until both nodes are idle: after a cancel, nodes stay 'completing' until the step's processes are gone."""
        deadline, out = time.time() + timeout, ""
        while time.time() < deadline:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True, timeout=30
            ).stdout
            if sorted(out.split()) == sorted([*NODES, "idle", "idle"]):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout:.0f} s: {out!r}\n{self.logs()}")

    def submit(
        self, script: Path, args: list[str], *, env: dict[str, str], cwd: Path, output: Path, options: tuple = ()
    ) -> str:
        """sbatch `script` with `args`; `options` are sbatch's own (they win over the script's #SBATCH lines)."""
        cmd = ["sbatch", "--parsable", f"--output={output}", "--export=ALL", *options, str(script), *args]
        result = subprocess.run(
            cmd, env={**env, "SLURM_CONF": str(self.conf)}, cwd=cwd, capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr.strip()}\n{self.logs()}")
        return result.stdout.strip().split(";")[0]

    def signal(self, job_id: str, name: str | None, batch: bool = False) -> None:
        """`scancel` the job: with a signal name, only signal it (`batch`: the batch script alone, as
        `--signal=B:<name>@<time>` does); without, cancel it (SIGTERM to every process, SIGKILL after KillWait)."""
        cmd = ["scancel", *([f"--signal={name}"] if name else []), *(["--batch"] if batch else []), job_id]
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")

    def fields(self, job_id: str) -> dict[str, str]:
        out = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True, text=True, timeout=30
        ).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_requeued(self, job_id: str, timeout: float) -> None:
        """Until Slurm counts the job's restart (it is back in the queue)."""
        deadline = time.time() + timeout
        while self.fields(job_id).get("Restarts", "0") == "0":
            assert time.time() < deadline, f"job {job_id} was not requeued: {self.fields(job_id)}"
            time.sleep(0.5)

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """Poll `scontrol show job` (sbatch --wait polls at 2, 8, 32 s); the job's fields once it has ended."""
        deadline, fields = time.time() + timeout, {}
        while time.time() < deadline:
            out = subprocess.run(
                ["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True, text=True, timeout=30
            ).stdout
            fields = dict(re.findall(r"(\w+)=(\S*)", out))
            if fields.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
                return fields
            time.sleep(1)
        subprocess.run(["scancel", job_id], env=self.env, timeout=30)
        raise TimeoutError(f"job {job_id} still {fields.get('JobState')} after {timeout:.0f} s\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for log in sorted(self.root.glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGTERM each daemon we started (by its PID file), then SIGKILL what is left after a few seconds."""
        pids = [int(p.read_text().split()[0]) for p in self.pid_files() if p.exists() and p.read_text().strip()]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + 10
            while time.time() < deadline and any(_alive(pid) for pid in pids):
                time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
