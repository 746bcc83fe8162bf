"""A real two-node Slurm cluster on this machine, for the tests: slurmctld and two slurmd (n1, n2) on one host.

Debian's Slurm is built with MULTIPLE_SLURMD, so two slurmd daemons can serve two node names from one host on
two ports. Everything (config, state, spool, logs, PID files) lives in one folder; the daemons are stopped by
their PID files, never by name. ../shared/notes/slurm-test-cluster.md has the measurements behind each line."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ("n1", "n2")

CONFIG = """\
ClusterName=ftscale-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs restart after ~11 s instead of ~141 s.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=30
MailProg=/bin/true
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started on this machine; the reason says why."""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def install_slurm() -> None:
    """Debian's Slurm and munge, unless present (apt-get update only when the package lists are stale)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and cannot be: installing it needs root and apt-get")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if _run(cmd, env=env).returncode != 0:
        _run(["apt-get", "update"], env=env)
        proc = _run(cmd, env=env)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr[-1000:]}")


class SlurmCluster:
    def __init__(self, root: Path, cpus_per_node: int = 1):
        self.root = root
        self.conf = root / "slurm.conf"
        self.cpus_per_node = cpus_per_node
        self.pids: list[int] = []

    @property
    def env(self) -> dict[str, str]:
        """The environment for sbatch/squeue/scontrol: clients (and the jobs) find the cluster through SLURM_CONF."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> SlurmCluster:
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test cluster runs its daemons as root (SlurmUser=root); run the tests as root")
        # Imported here: helpers imports torch, and this file also runs as the sbatch-and-wait script, which stays light.
        from helpers import free_port

        install_slurm()
        self._start_munge()
        for d in ("state", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs={self.cpus_per_node} RealMemory=4000"
            for n in NODES
        )
        self.conf.write_text(CONFIG.format(host=host, ctld_port=free_port(), root=self.root, nodes=nodes, node_list=",".join(NODES)))
        self._daemon(["slurmctld", "-f", str(self.conf)], self.root / "slurmctld.pid")
        for n in NODES:
            self._daemon(["slurmd", "-N", n, "-f", str(self.conf)], self.root / f"slurmd-{n}.pid")
        self._wait_idle()
        return self

    def _start_munge(self) -> None:
        if _run(["sh", "-c", "munge -n | unmunge"]).returncode == 0:
            return  # a munged is already running (the machine's own, or one from an earlier session)
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
        proc = _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
        if proc.returncode != 0 and _run(["sh", "-c", "munge -n | unmunge"]).returncode != 0:
            raise SlurmUnavailable(f"munged did not start: {proc.stderr.strip()}")

    def _daemon(self, cmd: list[str], pid_file: Path) -> None:
        proc = _run(cmd, env=self.env)
        end = time.monotonic() + 20
        while not pid_file.exists():
            if time.monotonic() > end:
                raise SlurmUnavailable(f"{cmd[0]} did not start ({proc.stderr.strip()}); log: {self.log_tail()}")
            time.sleep(0.1)
        time.sleep(0.05)
        self.pids.append(int(pid_file.read_text().split()[0]))

    def _wait_idle(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            proc = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env)
            states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
            if proc.returncode == 0 and all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"the nodes never became idle: {proc.stdout or proc.stderr}; log: {self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        logs = sorted((self.root / "log").glob("*.log")) if (self.root / "log").exists() else []
        return "\n".join(f"== {p.name}\n{p.read_text()[-n:]}" for p in logs)

    def stop(self) -> None:
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        self.pids.clear()


# `sbatch --wait` polls the job with doubling sleeps (2, 4, 8, 16, 32 s), so a 12-second job is noticed after 30 s.
# The tests submit through this instead: the same exit code, noticed within half a second.
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def sbatch_wait_cmd(sbatch_args: list[str]) -> list[str]:
    """A command that submits a job and exits with the job's exit code once it has finished (through requeues)."""
    return [sys.executable, __file__, *sbatch_args]


def _job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def _sbatch_and_wait(sbatch_args: list[str]) -> int:
    submitted = subprocess.run(["sbatch", "--parsable", *sbatch_args], capture_output=True, text=True)
    if submitted.returncode != 0:
        sys.stderr.write(submitted.stderr)
        return submitted.returncode
    job_id = submitted.stdout.strip().split(";")[0]
    print(f"Submitted batch job {job_id}", flush=True)
    seen = None
    while True:
        fields = _job_fields(job_id)
        now = (fields.get("JobState"), fields.get("Restarts"))
        # A finished state must hold for two polls with the same restart count: a requeue in progress moves on.
        if now[0] in FINISHED and now == seen:
            code, sig = (int(v) for v in fields.get("ExitCode", "1:0").split(":"))
            return code or (128 + sig if sig else 0 if now[0] == "COMPLETED" else 1)
        seen = now
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(_sbatch_and_wait(sys.argv[1:]))
