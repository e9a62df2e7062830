"""A real, throw-away Slurm cluster on this machine, for testing the sbatch scripts.

Two virtual nodes (slurmd instances) on one host, one slurmctld and a private munged, all
under one fresh temp dir with their own ports and sockets, so several test sessions (or a
left-over cluster from a crashed run) never collide. Teardown stops only the daemons this
object started, by the PIDs in its own pid files.

Facts this relies on (Debian 12, Slurm 22.05, see /work/shared/ENVIRONMENT.md):
- node names must resolve, because MASTER_ADDR is derived from the job's node list; we use the
  short host name and ``localhost``, both with NodeAddr=127.0.0.1 and distinct ports;
- ``sched_interval=2`` (else jobs wait ~30 s to start) and ``cred_expire=10`` (else a
  requeued job waits ~120 s before it may run again).

Manual use (handy when debugging a script):
    python tests/slurm_cluster.py up      # prints the SLURM_CONF to export, leaves it running
    python tests/slurm_cluster.py down DIR
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SLURM_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "munged"]
TMP_PREFIX = "beit-slurm-"


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or run on this machine at all (tests skip, not fail)."""


def _which(name: str) -> str | None:
    # daemons live in /usr/sbin, which may be missing from PATH in minimal shells
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def ensure_installed(timeout: float = 600) -> None:
    """Install Debian's Slurm + munge if missing; raise SlurmUnavailable if impossible."""
    if all(_which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and we are not root (cannot apt-get install)")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and apt-get is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *SLURM_PACKAGES]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:  # stale package lists: update once, then retry
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=timeout)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    missing = [b for b in BINARIES if not _which(b)]
    if missing:
        raise SlurmUnavailable(
            f"could not install Slurm ({' '.join(cmd)} -> rc {r.returncode}; missing {missing}):\n"
            + r.stderr[-2000:])


def _free_ports(n: int) -> list[int]:
    """n distinct currently-free TCP ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _node_names() -> list[str]:
    """Two node names that resolve on this host (MASTER_ADDR comes from them)."""
    short = socket.gethostname().split(".")[0]
    names = []
    for cand in (short, "localhost"):
        if cand in names:
            continue
        try:
            socket.gethostbyname(cand)
        except OSError:
            continue
        names.append(cand)
    if len(names) < 2:
        raise RuntimeError(
            f"need two resolvable host names for two virtual nodes, found {names}; "
            "add the short host name to /etc/hosts")
    return names


def cleanup_stale(root: str | None = None) -> None:
    """Remove temp dirs of earlier clusters whose daemons are all gone (never kill anything)."""
    root = Path(root or tempfile.gettempdir())
    for d in root.glob(TMP_PREFIX + "*"):
        pids = [_read_pid(p) for p in d.glob("*.pid")]
        if any(p and _pid_alive(p) for p in pids):
            continue  # someone's live cluster: leave it alone
        if time.time() - d.stat().st_mtime > 600:
            shutil.rmtree(d, ignore_errors=True)


class LocalSlurmCluster:
    """One slurmctld + two slurmd (+ private munged) under a fresh temp dir."""

    def __init__(self, cpus_per_node: int = 2, partition: str = "debug"):
        self.cpus_per_node = cpus_per_node
        self.partition = partition
        self.dir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
        os.chmod(self.dir, 0o755)  # munged insists the socket's directory is world-executable
        self.nodes = _node_names()
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge.socket"
        self._pidfiles: list[Path] = []

    # ---- environment for client commands (sbatch, squeue, ...) --------------------------
    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        for k in list(env):  # a surrounding allocation must not leak into our jobs
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del env[k]
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "LocalSlurmCluster":
        try:
            self._start_munge()
            self._write_conf()
            self._start_daemons()
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        keydir = self.dir / "munge"
        keydir.mkdir(mode=0o700)
        key = keydir / "munge.key"
        key.write_bytes(os.urandom(128))  # our own key: independent of the system's munge
        key.chmod(0o600)
        pid = self.dir / "munged.pid"
        self._pidfiles.append(pid)
        self.run(_which("munged"), f"--socket={self.munge_socket}", f"--key-file={key}",
                 f"--pid-file={pid}", f"--seed-file={keydir / 'munged.seed'}",
                 f"--log-file={self.dir / 'munged.log'}", "--force")

    def _write_conf(self) -> None:
        d = self.dir
        for sub in ("state", "log", "spool"):
            (d / sub).mkdir()
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        host = self.nodes[0]
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} "
            f"CPUs={self.cpus_per_node} RealMemory=2000 State=UNKNOWN"
            for n, p in zip(self.nodes, node_ports))
        self.conf.write_text(f"""\
# generated by tests/slurm_cluster.py: a two-node test cluster on one host
ClusterName=beittest{ctld_port}
# job ids (hence MASTER_PORT, dist.env.slurm_port(id)) differ from a concurrent test cluster's
FirstJobId={random.randrange(1000, 1_000_000)}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
{nodes}
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _start_daemons(self) -> None:
        pid = self.dir / "slurmctld.pid"
        self._pidfiles.append(pid)
        # -c: clear saved state (fresh cluster); -i: ignore state errors
        self.run(_which("slurmctld"), "-c", "-i", "-f", str(self.conf))
        for n in self.nodes:
            (self.dir / "spool" / n).mkdir()
            self._pidfiles.append(self.dir / f"slurmd.{n}.pid")
            self.run(_which("slurmd"), "-N", n, "-f", str(self.conf))

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        last = ""
        while time.time() < deadline:
            r = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            last = r.stdout + r.stderr
            states = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
            if r.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes did not become idle in {timeout}s: {last}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*.log")) + [self.dir / "munged.log"]:
            if f.exists():
                lines = f.read_text(errors="replace").splitlines()[-tail:]
                out.append(f"==> {f} <==\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel our jobs, then stop the daemons we started (by pid file, never by name)."""
        if self.conf.exists() and (self.dir / "slurmctld.pid").exists():
            self.run("scancel", "--user", str(os.getuid()), check=False, timeout=20)
            deadline = time.time() + 15
            while time.time() < deadline:
                r = self.run("squeue", "-h", check=False, timeout=10)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        # slurmds and the controller together, munge last (the others talk through it)
        munge = [p for p in self._pidfiles if "munged" in p.name]
        self._terminate([p for p in self._pidfiles if p not in munge])
        self._terminate(munge)

    @staticmethod
    def _terminate(pidfiles: list[Path], grace: float = 10) -> None:
        pids = [p for p in (_read_pid(f) for f in pidfiles) if p is not None and _pid_alive(p)]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        deadline = time.time() + grace
        while any(_pid_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.1)
        for pid in pids:
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    # ---- job helpers --------------------------------------------------------------------------
    def job_state(self, job_id: str) -> str:
        r = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        for tok in r.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"

    TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED")

    def wait_job(self, job_id: str, timeout: float) -> tuple[str, int]:
        """Poll until the job has finished for good (through any requeues): (state, exit code).
        Like `sbatch --wait`, which however polls only every ~10 s."""
        deadline = time.time() + timeout
        while True:
            state = self.job_state(job_id)
            if state in self.TERMINAL:
                code = self.job_field(job_id, "ExitCode") or "-1:0"
                return state, int(code.split(":")[0])
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f}s")
            time.sleep(0.5)

    def job_field(self, job_id: str, field: str) -> str | None:
        r = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        for tok in r.stdout.split():
            if tok.startswith(field + "="):
                return tok.split("=", 1)[1]
        return None


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "up":
        ensure_installed()
        c = LocalSlurmCluster().start()
        print(f"export SLURM_CONF={c.conf}\n# stop with: python {sys.argv[0]} down {c.dir}")
    elif len(sys.argv) == 3 and sys.argv[1] == "down":
        c = LocalSlurmCluster.__new__(LocalSlurmCluster)
        c.dir = Path(sys.argv[2])
        c.conf = c.dir / "slurm.conf"
        c._pidfiles = list(c.dir.glob("slurmd.*.pid")) + [c.dir / "slurmctld.pid", c.dir / "munged.pid"]
        c.stop()
    else:
        sys.exit(__doc__)
