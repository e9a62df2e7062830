"""One view of "who am I in the job": torchrun / deepspeed / Slurm (srun) / single process.

Every launcher describes a rank with different environment variables. ``detect_dist_env``
reads whichever set is present and returns a ``DistEnv``; ``DistEnv.export`` writes the
torch.distributed ``env://`` variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) so that
``torch.distributed.init_process_group`` and ``deepspeed.init_distributed`` work the same under
all of them. ``validate_slurm_env`` turns inconsistent job shapes into a clear error *before*
any process group exists (a mismatched world size otherwise shows up as a silent hang).

Pure Python on purpose: no torch or deepspeed import, so it is cheap to call first thing.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Mapping, MutableMapping, NoReturn

# Exit status of a training process that saved a complete checkpoint because it was asked to
# stop (SIGUSR1/SIGTERM): "checkpointed, please requeue". launch/slurm/run.sh requeues on it.
REQUEUE_EXIT_CODE = 3

# MASTER_PORT under Slurm (unless MASTER_PORT is set): SLURM_PORTS[job_id % len(SLURM_PORTS)].
# Deterministic, so every task of a job computes the same port without talking; consecutive job
# ids get consecutive ports, so jobs sharing a node differ unless their ids differ by a multiple of
# len(SLURM_PORTS) (~18,800). The ports lie below Linux's ephemeral range (32768-60999 by default,
# /proc/sys/net/ipv4/ip_local_port_range), from which the kernel hands out the source ports of
# outgoing connections (NCCL's and Gloo's own sockets among them): a rendezvous port in that range
# can be taken by one of those before rank 0 binds it. Also below Kubernetes' NodePort range
# (30000-32767), and minus ports that well-known services and launchers use.
SLURM_PORT_RANGE = (10000, 30000)         # [lo, hi)
SLURM_PORT_EXCLUDE = (
    (10000, 10100),   # webmin/NDMP 10000, Ray client 10001, Zabbix 10050-10051
    (11211, 11211),   # memcached
    (11434, 11434),   # Ollama
    (15672, 15672),   # RabbitMQ management
    (16992, 16995),   # Intel AMT
    (17500, 17500),   # Dropbox LAN sync
    (19999, 20000),   # netdata, DNP3/usermin
    (24007, 24008),   # GlusterFS
    (25672, 25672),   # RabbitMQ distribution
    (27017, 27019),   # MongoDB
    (28015, 28015),   # RethinkDB
    (29000, 29999),   # torch.distributed/DeepSpeed default 29500, torchrun c10d 29400, and "+N" variants
)
SLURM_PORTS: tuple[int, ...] = tuple(
    p for p in range(*SLURM_PORT_RANGE) if not any(lo <= p <= hi for lo, hi in SLURM_PORT_EXCLUDE))

LAUNCHERS = ("torchrun", "deepspeed", "slurm", "mpi", "single")


class DistConfigError(ValueError):
    """The job's shape is inconsistent (world size, GPUs, batch); raised before any collective."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def export(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Write the ``env://`` rendezvous variables torch.distributed and DeepSpeed read."""
        environ = os.environ if environ is None else environ
        environ.update({
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        })

    def describe(self) -> str:
        """One line per rank for the job log: where it runs and where it will rendezvous."""
        return (f"[dist] launcher={self.launcher} rank={self.rank}/{self.world_size} "
                f"local_rank={self.local_rank}/{self.local_world_size} "
                f"node={self.node_rank}/{self.num_nodes} master={self.master_addr}:{self.master_port}")

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Slurm string formats
# ---------------------------------------------------------------------------------------------
def _split_top_level(s: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets: 'a[1-2,4],b' -> ['a[1-2,4]', 'b']."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm host list {s!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm host list {s!r}")
    parts.append("".join(cur))
    return [p for p in (x.strip() for x in parts) if p]


def _expand_range(spec: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7'] (zero padding kept, as Slurm does)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty range item in {spec!r}")
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {item!r}")
            width = len(lo) if lo.startswith("0") else 0
            out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            if not item.isdigit():
                raise ValueError(f"bad range item {item!r}")
            out.append(item)
    return out


def parse_hostlist(hostlist: str) -> list[str]:
    """Expand Slurm's compressed host list: 'node[01-03,7],gpu-a1' -> node01..node03, node7, gpu-a1.

    Several bracket groups in one name ('rack[1-2]-n[1-2]') expand as a product, in Slurm's
    order. Raises ValueError on syntax it does not understand.
    """
    hosts: list[str] = []
    for part in _split_top_level(hostlist):
        expanded = [""]
        for m in re.finditer(r"([^\[\]]+)|\[([^\]]*)\]", part):
            if m.group(1) is not None:
                expanded = [e + m.group(1) for e in expanded]
            else:
                expanded = [e + x for e in expanded for x in _expand_range(m.group(2))]
        hosts += expanded
    if not hosts:
        raise ValueError(f"empty Slurm host list {hostlist!r}")
    return hosts


def parse_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE: '2(x3),1' -> [2, 2, 2, 1]."""
    out: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"cannot parse Slurm tasks-per-node {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _hostnames_via_scontrol(hostlist: str) -> list[str]:
    r = subprocess.run(["scontrol", "show", "hostnames", hostlist],
                       capture_output=True, text=True, timeout=30, check=True)
    return r.stdout.split()


def slurm_master_addr(hostlist: str) -> str:
    """First host of the job's node list (Slurm puts task 0 on the first node)."""
    try:
        return parse_hostlist(hostlist)[0]
    except ValueError:
        try:  # syntax we do not know: ask Slurm itself
            return _hostnames_via_scontrol(hostlist)[0]
        except (OSError, subprocess.SubprocessError, IndexError) as e:
            raise DistConfigError(
                f"cannot find the first host of SLURM_JOB_NODELIST={hostlist!r} "
                f"(parser and 'scontrol show hostnames' both failed: {e}); set MASTER_ADDR") from e


def slurm_port(job_id: int) -> int:
    """The rendezvous port of a Slurm job: a function of the job id alone (see SLURM_PORTS)."""
    return SLURM_PORTS[int(job_id) % len(SLURM_PORTS)]


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------
def _int(environ: Mapping[str, str], *names: str, default: int | None = None) -> int:
    for n in names:
        v = environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise DistConfigError(f"environment variable {n}={v!r} is not an integer") from None
    if default is None:
        raise DistConfigError(f"none of {names} is set")
    return default


def in_srun_step(environ: Mapping[str, str]) -> bool:
    """True inside an ``srun`` task. The sbatch batch script itself also has SLURM_PROCID=0
    and SLURM_NTASKS=<all tasks>, but it is one process, not rank 0 of a world: only a job
    step (srun) sets SLURM_STEP_ID."""
    return "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and (
        "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ)


def _detect_slurm(environ: Mapping[str, str]) -> DistEnv:
    rank = _int(environ, "SLURM_PROCID")
    world = _int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    node_rank = _int(environ, "SLURM_NODEID", default=0)
    num_nodes = _int(environ, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", default=1)
    tpn = (environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
           or environ.get("SLURM_NTASKS_PER_NODE"))
    if tpn:
        per_node = parse_tasks_per_node(tpn)
        local_world = per_node[node_rank] if node_rank < len(per_node) else per_node[-1]
    else:
        local_world = max(1, world // max(1, num_nodes))
    hostlist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                or environ.get("SLURM_NODELIST"))
    if environ.get("MASTER_ADDR"):
        master = environ["MASTER_ADDR"]
    elif hostlist:
        master = slurm_master_addr(hostlist)
    else:
        raise DistConfigError("running under srun but SLURM_JOB_NODELIST is not set; set MASTER_ADDR")
    if environ.get("MASTER_PORT"):
        port = _int(environ, "MASTER_PORT")
    else:
        port = slurm_port(_int(environ, "SLURM_JOB_ID", "SLURM_JOBID"))
    return DistEnv(rank=rank, local_rank=_int(environ, "SLURM_LOCALID", default=0), world_size=world,
                   local_world_size=local_world, node_rank=node_rank, num_nodes=num_nodes,
                   master_addr=master, master_port=port, launcher="slurm")


def _detect_env_rank(environ: Mapping[str, str]) -> DistEnv:
    """torchrun and the deepspeed launcher both set RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*."""
    world = _int(environ, "WORLD_SIZE", default=1)
    local_world = _int(environ, "LOCAL_WORLD_SIZE", default=0) or None
    # torchrun sets TORCHELASTIC_RUN_ID / GROUP_RANK; deepspeed's launcher sets neither
    launcher = "torchrun" if ("TORCHELASTIC_RUN_ID" in environ or "GROUP_RANK" in environ) else "deepspeed"
    if local_world is None:
        local_world = world
    node_rank = _int(environ, "GROUP_RANK", "NODE_RANK", default=_int(environ, "RANK") // max(1, local_world))
    return DistEnv(rank=_int(environ, "RANK"), local_rank=_int(environ, "LOCAL_RANK", default=0),
                   world_size=world, local_world_size=local_world, node_rank=node_rank,
                   num_nodes=max(1, -(-world // max(1, local_world))),
                   master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                   master_port=_int(environ, "MASTER_PORT", default=29500), launcher=launcher)


def _detect_mpi(environ: Mapping[str, str]) -> DistEnv:
    rank = _int(environ, "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    world = _int(environ, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    local_world = _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", default=1)
    if not environ.get("MASTER_ADDR"):
        raise DistConfigError("launched by mpirun: set MASTER_ADDR (and MASTER_PORT) to rank 0's host")
    return DistEnv(rank=rank, local_rank=_int(environ, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0),
                   world_size=world, local_world_size=local_world, node_rank=rank // max(1, local_world),
                   num_nodes=max(1, -(-world // max(1, local_world))), master_addr=environ["MASTER_ADDR"],
                   master_port=_int(environ, "MASTER_PORT", default=29500), launcher="mpi")


def detect_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables; precedence: RANK (torchrun/deepspeed) > srun > mpirun > single."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ:
        return _detect_env_rank(environ)
    if in_srun_step(environ):
        return _detect_slurm(environ)
    if "OMPI_COMM_WORLD_RANK" in environ or ("PMI_RANK" in environ and "PMI_SIZE" in environ):
        return _detect_mpi(environ)
    return DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, num_nodes=1,
                   master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                   master_port=_int(environ, "MASTER_PORT", default=29500), launcher="single")


# ---------------------------------------------------------------------------------------------
# Validation (before any process group)
# ---------------------------------------------------------------------------------------------
def device_list(value: str) -> list[str]:
    """The devices a GPU list variable names (CUDA_VISIBLE_DEVICES, SLURM_JOB_GPUS): Slurm writes
    NoDevFiles when a job asked for GPUs on a node whose gres has no device files, and CUDA
    treats "-1" (any negative index) as "no device"."""
    items = [d.strip() for d in value.split(",") if d.strip()]
    return [d for d in items if d != "NoDevFiles" and not d.startswith("-")]


def visible_gpus_per_node(environ: Mapping[str, str]) -> int | None:
    """GPUs Slurm gave this node (or CUDA_VISIBLE_DEVICES lists); None when nothing says."""
    if environ.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(environ["SLURM_GPUS_ON_NODE"])
    for name in ("SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        v = environ.get(name)
        if v is not None:
            return len(device_list(v))
    return None


def cuda_device_index(env: DistEnv, n_visible: int) -> int:
    """Which visible CUDA device this rank should use: local_rank when every task sees all the
    node's GPUs, 0 when Slurm bound one GPU per task (--gpus-per-task=1 / --gpu-bind)."""
    if n_visible == 1:
        return 0
    if env.local_rank < n_visible:
        return env.local_rank
    raise DistConfigError(
        f"local rank {env.local_rank} but only {n_visible} visible GPU(s): run one task per GPU")


def validate_slurm_env(env: DistEnv, environ: Mapping[str, str] | None = None, *,
                       global_batch: int | None = None, micro_batch: int | None = None,
                       grad_accum: int | None = None, use_gpus: bool | None = None) -> None:
    """Raise DistConfigError naming the problem and the fix; call before any process group.

    use_gpus: pass ``torch.cuda.is_available()``; None means "if the environment lists GPUs".
    Every rank computes the same verdict from the same inputs, so every rank fails the same
    way and none waits in a collective for a peer that already exited.
    """
    environ = os.environ if environ is None else environ
    problems = []
    gpus = visible_gpus_per_node(environ)
    if use_gpus is None:
        use_gpus = bool(gpus)
    if use_gpus and gpus is not None and gpus != env.local_world_size:
        problems.append(
            f"{env.local_world_size} task(s) per node but {gpus} GPU(s) visible on the node: run exactly "
            f"one task per GPU (sbatch --ntasks-per-node={gpus} with --gres=gpu:{gpus})")
    if use_gpus and env.launcher == "slurm" and env.local_world_size * env.num_nodes != env.world_size:
        # heterogeneous layouts ('2(x3),1') are legal for Slurm but never what a data-parallel
        # job wants: some GPUs would sit idle or be shared
        problems.append(
            f"world size {env.world_size} is not {env.num_nodes} node(s) x {env.local_world_size} "
            "task(s) per node: use --ntasks-per-node so every node runs the same number of ranks")
    if global_batch is not None and micro_batch is not None:
        per_step = micro_batch * env.world_size
        if global_batch % per_step != 0:
            problems.append(
                f"global batch {global_batch} is not divisible by micro batch {micro_batch} x world size "
                f"{env.world_size} = {per_step}: change train.global_batch / train.micro_batch or the "
                "number of GPUs")
        elif grad_accum is not None and grad_accum * per_step != global_batch:
            problems.append(
                f"global batch {global_batch} != micro batch {micro_batch} x grad accum {grad_accum} x "
                f"world size {env.world_size}: leave gradient accumulation to be derived")
    if problems:
        raise DistConfigError("inconsistent distributed job:\n  - " + "\n  - ".join(problems))


class _ConsoleHandler(logging.Handler):
    """Messages as plain lines: errors to stderr, the rest to stdout, looked up at each emit
    (so a redirected sys.stdout, e.g. pytest's capture, is honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.ERROR else sys.stdout
        stream.write(self.format(record) + "\n")
        stream.flush()


def rank0_logger() -> logging.Logger:
    """The one logger for run output ("beit_scale"): rank 0 prints, the other ranks stay quiet
    (RANK as exported by DistEnv.export or set by a launcher; read at each call)."""
    log = logging.getLogger("beit_scale")
    if not any(isinstance(h, _ConsoleHandler) for h in log.handlers):
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if os.environ.get("RANK", "0") in ("0", "") else logging.CRITICAL + 1)
    return log


def say_rank0(msg: str, err: bool = False) -> None:
    """One line from global rank 0 only (rank0_logger: stdout, or stderr when err)."""
    log = rank0_logger()
    (log.error if err else log.info)(msg)


def fail_fast(err: Exception, env: DistEnv, code: int = 2) -> NoReturn:
    """Rank 0 prints the message, every rank exits non-zero; no collective is entered."""
    if env.is_main:
        # One line: srun forwards a rank's output line by line and drops what is still in flight
        # when --kill-on-bad-exit ends the step.
        print("ERROR: " + " ".join(str(err).split()), file=sys.stderr, flush=True)
        linger_before_error_exit(1.0)
    else:
        linger_before_error_exit()
    raise SystemExit(code)


def linger_before_error_exit(seconds: float = 3.0) -> None:
    """Non-zero ranks wait a moment before exiting on a config error: under `srun
    --kill-on-bad-exit` the first rank to exit gets the others killed, and rank 0 must live long
    enough to print the message the user needs."""
    import time
    time.sleep(seconds)

