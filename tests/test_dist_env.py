"""beit_scale.dist.env: launcher variables -> DistEnv, Slurm string formats, validation."""
import subprocess
import sys

import pytest

from beit_scale.dist import env as distenv
from beit_scale.dist.env import (REQUEUE_EXIT_CODE, DistConfigError, DistEnv, cuda_device_index,
                                 detect_dist_env, parse_hostlist, parse_tasks_per_node,
                                 slurm_master_addr, slurm_port, validate_slurm_env)


# ---- Slurm string formats -----------------------------------------------------------------
@pytest.mark.parametrize("spec, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,7],gpu-a1", ["node01", "node02", "node03", "node7", "gpu-a1"]),
    ("gpu-a1,node[1-2]", ["gpu-a1", "node1", "node2"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),  # padding width of the low bound
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("a[1],b.example.com", ["a1", "b.example.com"]),
    ("localhost,vm", ["localhost", "vm"]),
])
def test_parse_hostlist(spec, hosts):
    assert parse_hostlist(spec) == hosts


@pytest.mark.parametrize("bad", ["node[1-3", "node1-3]", "node[a-b]", "node[3-1]", "", "node[]"])
def test_parse_hostlist_rejects_bad_syntax(bad):
    with pytest.raises(ValueError):
        parse_hostlist(bad)


def test_master_addr_falls_back_to_scontrol(monkeypatch):
    calls = []

    def fake(hostlist):
        calls.append(hostlist)
        return ["weird1", "weird2"]
    monkeypatch.setattr(distenv, "_hostnames_via_scontrol", fake)
    assert slurm_master_addr("node[1-2],x") == "node1" and calls == []  # parsed in Python
    assert slurm_master_addr("we{ird}[1-") == "weird1" and calls == ["we{ird}[1-"]


def test_master_addr_error_names_the_fix(monkeypatch):
    def broken(hostlist):
        raise FileNotFoundError("scontrol")
    monkeypatch.setattr(distenv, "_hostnames_via_scontrol", broken)
    with pytest.raises(DistConfigError, match="set MASTER_ADDR"):
        slurm_master_addr("bad[")


@pytest.mark.parametrize("spec, per_node", [
    ("8", [8]), ("8(x2)", [8, 8]), ("2(x3),1", [2, 2, 2, 1]), ("1,2(x2)", [1, 2, 2]),
])
def test_parse_tasks_per_node(spec, per_node):
    assert parse_tasks_per_node(spec) == per_node


def test_parse_tasks_per_node_rejects_garbage():
    with pytest.raises(ValueError, match="tasks-per-node"):
        parse_tasks_per_node("2(3)")


# Linux's default ephemeral range (/proc/sys/net/ipv4/ip_local_port_range): the kernel hands
# these out as source ports of outgoing connections, so a rendezvous port there can be taken.
EPHEMERAL = range(32768, 61000)
WELL_KNOWN = (10000, 10001, 11211, 15672, 27017, 29400, 29500, 29501)


def test_port_is_deterministic_and_in_range():
    n = len(distenv.SLURM_PORTS)
    assert n > 15000 and len(set(distenv.SLURM_PORTS)) == n
    assert slurm_port(123) == slurm_port(123) == slurm_port("123")
    assert slurm_port(123) != slurm_port(124) and slurm_port(0) == slurm_port(n)
    for j in [0, 1, 19999, 20000, 32768, 10**9 + 7, 2**31 - 1, *range(n - 50, n + 50)]:
        p = slurm_port(j)
        assert 10000 <= p < 30000 and p not in EPHEMERAL and p not in WELL_KNOWN, (j, p)


def test_port_never_in_ephemeral_range_or_on_a_known_service():
    ports = set(distenv.SLURM_PORTS)
    assert ports.isdisjoint(EPHEMERAL) and ports.isdisjoint(range(30000, 32768))  # k8s NodePorts too
    assert ports.isdisjoint(WELL_KNOWN) and ports.isdisjoint(range(29000, 30000))
    # and below this machine's ephemeral range, when it is not the default
    try:
        lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        lo = None
    if lo is not None and lo >= 30000:
        assert max(ports) < lo


def test_port_spreads_job_ids():
    n = len(distenv.SLURM_PORTS)
    # consecutive jobs (the usual neighbours on a shared node) never collide within a window of n
    window = [slurm_port(j) for j in range(987_654, 987_654 + n)]
    assert len(set(window)) == n
    # a burst of 2000 consecutive ids uses 2000 distinct ports spread over the range, not a corner
    burst = [slurm_port(j) for j in range(5_000_000, 5_002_000)]
    assert len(set(burst)) == 2000
    # scattered ids land all over the range: every tenth of it gets some
    import random
    rng = random.Random(0)
    scattered = [slurm_port(rng.randrange(10**8)) for _ in range(2000)]
    deciles = {(p - 10000) * 10 // 20000 for p in scattered}
    assert deciles == set(range(10))


# ---- launcher mappings --------------------------------------------------------------------
def srun_env(**kw):
    """What srun sets for task PROCID of a 2 nodes x 2 tasks step (Slurm 22.05 names)."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
           "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NTASKS": "4",
           "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_NUM_NODES": "2", "SLURM_STEP_NUM_NODES": "2",
           "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"}
    env.update(kw)
    return env


def test_slurm_srun_task():
    e = detect_dist_env(srun_env())
    assert e == DistEnv(rank=3, local_rank=1, world_size=4, local_world_size=2, node_rank=1,
                        num_nodes=2, master_addr="gpu07", master_port=slurm_port(4242), launcher="slurm")


def test_slurm_uneven_layout_uses_this_nodes_count():
    env = srun_env(SLURM_STEP_TASKS_PER_NODE="2(x3),1", SLURM_NODEID="3", SLURM_PROCID="6",
                   SLURM_LOCALID="0", SLURM_NTASKS="7", SLURM_STEP_NUM_TASKS="7",
                   SLURM_STEP_NUM_NODES="4")
    e = detect_dist_env(env)
    assert (e.rank, e.local_world_size, e.world_size, e.num_nodes) == (6, 1, 7, 4)


def test_slurm_only_job_level_variables():
    # older Slurm / salloc shells: no SLURM_STEP_* variables besides the step id
    env = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "1", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "1", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODELIST": "a,b"}
    e = detect_dist_env(env)
    assert (e.rank, e.world_size, e.local_world_size, e.master_addr, e.master_port) == \
        (1, 2, 1, "a", slurm_port(7))


def test_every_task_of_a_job_agrees_on_the_port():
    views = [detect_dist_env(srun_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r % 2), SLURM_NODEID=str(r // 2)))
             for r in range(4)]
    assert {(v.master_addr, v.master_port) for v in views} == {("gpu07", slurm_port(4242))}
    other_job = detect_dist_env(srun_env(SLURM_JOB_ID="4243", SLURM_JOBID="4243"))
    assert other_job.master_port != views[0].master_port


def test_slurm_respects_preset_master():
    e = detect_dist_env(srun_env(MASTER_ADDR="10.0.0.5", MASTER_PORT="29999"))
    assert (e.master_addr, e.master_port) == ("10.0.0.5", 29999)


def test_sbatch_batch_step_is_not_a_rank():
    # the batch script has SLURM_PROCID=0 and SLURM_NTASKS=<all tasks> but no step id: it is
    # one process that will call srun, not rank 0 of a 16-rank world (it must not wait for 15 peers)
    env = srun_env(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NTASKS="16")
    del env["SLURM_STEP_ID"], env["SLURM_STEPID"], env["SLURM_STEP_NUM_TASKS"]
    e = detect_dist_env(env)
    assert e.launcher == "single" and e.world_size == 1 and e.rank == 0


@pytest.mark.parametrize("extra, launcher", [
    ({"TORCHELASTIC_RUN_ID": "none", "GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, "torchrun"),
    ({}, "deepspeed"),
])
def test_torchrun_and_deepspeed(extra, launcher):
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h0", "MASTER_PORT": "29501",
           "LOCAL_WORLD_SIZE": "2", **extra}
    e = detect_dist_env(env)
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size) == (3, 1, 4, 2)
    assert (e.node_rank, e.num_nodes, e.master_addr, e.master_port) == (1, 2, "h0", 29501)
    assert e.launcher == launcher


def test_torchrun_inside_slurm_wins():
    # torchrun started by srun (one per node): RANK is torchrun's, not SLURM_PROCID
    env = srun_env(RANK="5", LOCAL_RANK="1", WORLD_SIZE="8", LOCAL_WORLD_SIZE="4", GROUP_RANK="1",
                   TORCHELASTIC_RUN_ID="x", MASTER_ADDR="gpu07", MASTER_PORT="29400")
    e = detect_dist_env(env)
    assert (e.launcher, e.rank, e.world_size) == ("torchrun", 5, 8)


def test_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "h0"}
    e = detect_dist_env(env)
    assert (e.launcher, e.rank, e.local_rank, e.node_rank, e.num_nodes) == ("mpi", 5, 1, 1, 2)
    with pytest.raises(DistConfigError, match="MASTER_ADDR"):
        detect_dist_env({k: v for k, v in env.items() if k != "MASTER_ADDR"})


def test_single_process():
    e = detect_dist_env({})
    assert (e.launcher, e.rank, e.world_size, e.is_main, e.distributed) == ("single", 0, 1, True, False)


def test_export_round_trips_through_env_rank_detection():
    e = detect_dist_env(srun_env())
    out = {}
    e.export(out)
    assert out == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                   "GROUP_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": str(slurm_port(4242))}
    again = detect_dist_env(out)
    assert (again.rank, again.world_size, again.local_rank, again.master_addr, again.master_port) == \
        (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port)


def test_bad_integer_is_a_clear_error():
    with pytest.raises(DistConfigError, match="SLURM_PROCID"):
        detect_dist_env(srun_env(SLURM_PROCID="zero"))


# ---- validation -----------------------------------------------------------------------------
def test_validate_accepts_consistent_job():
    e = detect_dist_env(srun_env())
    validate_slurm_env(e, {"SLURM_GPUS_ON_NODE": "2"}, global_batch=16, micro_batch=2, grad_accum=2)
    validate_slurm_env(e, {}, global_batch=8, micro_batch=2)  # no GPUs listed: no GPU check


def test_validate_indivisible_global_batch():
    e = detect_dist_env(srun_env())
    with pytest.raises(DistConfigError, match=r"global batch 6 is not divisible by micro batch 2 x world size 4"):
        validate_slurm_env(e, {}, global_batch=6, micro_batch=2)


def test_validate_grad_accum_mismatch():
    e = detect_dist_env(srun_env())
    with pytest.raises(DistConfigError, match="grad accum 3"):
        validate_slurm_env(e, {}, global_batch=16, micro_batch=2, grad_accum=3)


@pytest.mark.parametrize("gpu_env", [
    {"SLURM_GPUS_ON_NODE": "8"}, {"SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7"},
    {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"},
])
def test_validate_tasks_vs_gpus(gpu_env):
    e = detect_dist_env(srun_env())  # 2 tasks per node
    with pytest.raises(DistConfigError, match=r"2 task\(s\) per node but 8 GPU\(s\)"):
        validate_slurm_env(e, gpu_env)
    validate_slurm_env(e, gpu_env, use_gpus=False)  # CPU run: GPU count irrelevant


def test_validate_uneven_layout_with_gpus():
    env = srun_env(SLURM_STEP_TASKS_PER_NODE="2,1", SLURM_NODEID="0", SLURM_NTASKS="3",
                   SLURM_STEP_NUM_TASKS="3", SLURM_PROCID="0", SLURM_LOCALID="0")
    e = detect_dist_env(env)
    with pytest.raises(DistConfigError, match="same number of ranks"):
        validate_slurm_env(e, {"SLURM_GPUS_ON_NODE": "2"})


def test_cuda_device_index():
    e = detect_dist_env(srun_env())  # local rank 1
    assert cuda_device_index(e, 2) == 1   # each task sees all GPUs of the node
    assert cuda_device_index(e, 1) == 0   # Slurm bound one GPU per task
    with pytest.raises(DistConfigError):
        cuda_device_index(detect_dist_env(srun_env(SLURM_LOCALID="3")), 2)


def test_fail_fast_rank0_prints_all_exit_nonzero(tmp_path):
    """Every rank exits non-zero without entering a collective; only rank 0 prints."""
    code = ("import sys; from beit_scale.dist import *\n"
            "e = detect_dist_env()\n"
            "try: validate_slurm_env(e, global_batch=6, micro_batch=2)\n"
            "except DistConfigError as err: fail_fast(err, e)\n")
    for rank, should_print in (("0", True), ("1", False)):
        env = {"RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank, "PATH": "/usr/bin:/bin",
               "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1])}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and r.returncode != REQUEUE_EXIT_CODE
        assert ("global batch 6" in r.stderr) == should_print, r.stderr


def test_requeue_exit_code_matches_run_sh():
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "launch/slurm/run.sh").read_text()
    assert f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}" in text


def test_cli_prints_the_rank_view():
    import os
    from pathlib import Path
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD"))},
           **srun_env(), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "beit_scale.dist"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"launcher=slurm rank=3/4 local_rank=1/2 node=1/2 master=gpu07:{slurm_port(4242)}" in r.stdout
