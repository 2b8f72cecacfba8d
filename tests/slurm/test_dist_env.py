"""dist_env: rank facts from torchrun/deepspeed variables, Slurm's variables, or nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orthrus_train.launch.dist_env import (
    DistEnv,
    DistEnvError,
    expand_nodelist,
    export_torch_env,
    first_host,
    parse_tasks_per_node,
    port_from_job_id,
    resolve_data_shard,
    resolve_dist_env,
)

REPO = Path(__file__).resolve().parents[2]

# What srun gives task 1 of `sbatch --nodes=1 --ntasks-per-node=2` (captured on Slurm 22.05).
SLURM_STEP_TASK1 = {
    "SLURM_JOB_ID": "1",
    "SLURM_JOBID": "1",
    "SLURM_JOB_NODELIST": "vm",
    "SLURM_NODELIST": "vm",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_NNODES": "1",
    "SLURM_NODEID": "0",
    "SLURM_LOCALID": "1",
    "SLURM_PROCID": "1",
    "SLURM_NTASKS": "2",
    "SLURM_NPROCS": "2",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_TASKS_PER_NODE": "2",
    "SLURM_STEP_ID": "0",
    "SLURM_STEPID": "0",
    "SLURM_STEP_NODELIST": "vm",
    "SLURM_STEP_NUM_NODES": "1",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2",
}


def slurm_multi(procid: int, localid: int, nodeid: int, **extra) -> dict:
    """Task of a 2-node x 4-task step on gpu[001-002]."""
    env = {
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[001-002]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": str(nodeid),
        "SLURM_LOCALID": str(localid),
        "SLURM_PROCID": str(procid),
        "SLURM_NTASKS": "8",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_ID": "0",
    }
    env.update(extra)
    return env


# --------------------------------------------------------------------------- defaults / torchrun


def test_no_variables_is_a_single_process():
    d = resolve_dist_env({})
    assert d == DistEnv(1, 0, 0, 1, "127.0.0.1", 29500, 0, 1, "default")
    assert d.is_main and d.is_local_main and not d.is_distributed


def test_torchrun_single_node():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29501"}
    assert resolve_dist_env(env) == DistEnv(4, 3, 3, 4, "10.1.2.3", 29501, 0, 1, "torch")


def test_torchrun_multi_node_uses_group_rank():
    env = {"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1",
           "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    d = resolve_dist_env(env)
    assert (d.rank, d.local_rank, d.node_rank, d.num_nodes, d.local_world_size) == (13, 5, 1, 2, 8)


def test_deepspeed_launcher_local_size_and_cross_rank():
    env = {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_SIZE": "8", "CROSS_RANK": "1",
           "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}
    d = resolve_dist_env(env)
    assert (d.local_world_size, d.node_rank, d.num_nodes) == (8, 1, 2)


def test_torch_variables_win_over_slurm():
    # torchrun started inside a Slurm step: the torchrun group is the real one
    env = dict(SLURM_STEP_TASK1, RANK="5", WORLD_SIZE="8", LOCAL_RANK="5", LOCAL_WORLD_SIZE="8",
               MASTER_ADDR="h", MASTER_PORT="1234")
    d = resolve_dist_env(env)
    assert (d.source, d.rank, d.world_size) == ("torch", 5, 8)


@pytest.mark.parametrize(
    "env, names",
    [
        ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, ["RANK=4", "WORLD_SIZE=4"]),
        ({"RANK": "0"}, ["WORLD_SIZE", "RANK"]),
        ({"WORLD_SIZE": "2"}, ["RANK", "WORLD_SIZE"]),
        ({"RANK": "x", "WORLD_SIZE": "2"}, ["RANK='x'"]),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, ["RANK=-1"]),
        ({"RANK": "0", "WORLD_SIZE": "0"}, ["WORLD_SIZE=0"]),
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, ["LOCAL_RANK"]),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, ["MASTER_ADDR", "MASTER_PORT"]),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "a",
          "MASTER_PORT": "1"}, ["LOCAL_RANK=2", "LOCAL_WORLD_SIZE=2"]),
        ({"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "a",
          "MASTER_PORT": "1"}, ["WORLD_SIZE=3", "LOCAL_WORLD_SIZE=2"]),
        ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"}, ["MASTER_PORT=70000"]),
    ],
)
def test_torch_errors_name_the_variables(env, names):
    with pytest.raises(DistEnvError) as e:
        resolve_dist_env(env)
    for name in names:
        assert name in str(e.value)


# --------------------------------------------------------------------------- Slurm


def test_slurm_step_task():
    d = resolve_dist_env(SLURM_STEP_TASK1)
    assert d == DistEnv(2, 1, 1, 2, "vm", port_from_job_id(1), 0, 1, "slurm")


def test_slurm_multi_node_every_task():
    seen = set()
    for node in range(2):
        for local in range(4):
            d = resolve_dist_env(slurm_multi(node * 4 + local, local, node))
            assert (d.world_size, d.local_world_size, d.num_nodes, d.node_rank) == (8, 4, 2, node)
            assert d.local_rank == local and d.master_addr == "gpu001"
            assert d.master_port == port_from_job_id(123456)
            seen.add(d.rank)
    assert seen == set(range(8))


def test_slurm_uneven_tasks_per_node():
    env = slurm_multi(4, 0, 2, SLURM_JOB_NODELIST="a[1-3]", SLURM_JOB_NUM_NODES="3", SLURM_NTASKS="5",
                      SLURM_TASKS_PER_NODE="2(x2),1")
    d = resolve_dist_env(env)
    assert (d.rank, d.local_world_size, d.node_rank, d.num_nodes) == (4, 1, 2, 3)


def test_slurm_ntasks_per_node_when_tasks_per_node_missing():
    env = slurm_multi(5, 1, 1)
    del env["SLURM_TASKS_PER_NODE"]
    env["SLURM_NTASKS_PER_NODE"] = "4"
    assert resolve_dist_env(env).local_world_size == 4


def test_slurm_step_values_win_over_job_values():
    # a step smaller than the allocation: srun -n 2 inside a 4-task job
    env = dict(SLURM_STEP_TASK1, SLURM_NTASKS="4", SLURM_TASKS_PER_NODE="4", SLURM_STEP_NUM_TASKS="2",
               SLURM_STEP_TASKS_PER_NODE="2")
    d = resolve_dist_env(env)
    assert (d.world_size, d.local_world_size) == (2, 2)


def test_slurm_master_addr_and_port_overrides():
    env = dict(SLURM_STEP_TASK1, MASTER_ADDR="10.0.0.7", MASTER_PORT="4242")
    d = resolve_dist_env(env)
    assert (d.master_addr, d.master_port, d.source) == ("10.0.0.7", 4242, "slurm")


def test_slurm_batch_shell_is_one_process():
    # The batch script has SLURM_PROCID=0 and SLURM_NTASKS=2 but is one process: no step id.
    env = {k: v for k, v in SLURM_STEP_TASK1.items() if not k.startswith("SLURM_STEP")}
    env.update(SLURM_PROCID="0", SLURM_LOCALID="0")
    d = resolve_dist_env(env)
    assert (d.world_size, d.rank, d.source) == (1, 0, "slurm-batch")


def test_job_id_port_is_stable_and_outside_ephemeral_range():
    ports = {port_from_job_id(j) for j in range(0, 100000, 7)}
    assert all(10000 <= p < 30000 for p in ports)
    assert port_from_job_id("4242") == port_from_job_id(4242) == 10000 + 4242


@pytest.mark.parametrize(
    "change, names",
    [
        ({"SLURM_PROCID": "8"}, ["SLURM_PROCID=8", "SLURM_NTASKS=8"]),
        ({"SLURM_LOCALID": "4"}, ["SLURM_LOCALID=4", "SLURM_TASKS_PER_NODE"]),
        ({"SLURM_NODEID": "2"}, ["SLURM_NODEID=2", "SLURM_JOB_NUM_NODES=2"]),
        ({"SLURM_NTASKS": "two"}, ["SLURM_NTASKS='two'"]),
        ({"SLURM_TASKS_PER_NODE": "4(x3)"}, ["SLURM_TASKS_PER_NODE", "3 nodes", "SLURM_JOB_NUM_NODES=2"]),
        ({"SLURM_TASKS_PER_NODE": "4,3"}, ["SLURM_TASKS_PER_NODE", "7 tasks", "SLURM_NTASKS=8"]),
        ({"SLURM_TASKS_PER_NODE": "4x2"}, ["SLURM_TASKS_PER_NODE", "'4x2'"]),
        ({"SLURM_JOB_NODELIST": "gpu[001-002"}, ["SLURM_JOB_NODELIST", "unbalanced"]),
        ({"SLURM_LOCALID": None}, ["SLURM_LOCALID"]),
        ({"SLURM_NTASKS": None}, ["SLURM_NTASKS"]),
        ({"SLURM_JOB_NODELIST": None}, ["SLURM_JOB_NODELIST", "MASTER_ADDR"]),
    ],
)
def test_slurm_errors_name_the_variables(change, names):
    env = slurm_multi(7, 3, 1)
    for k, v in change.items():
        if v is None:
            env.pop(k)
        else:
            env[k] = v
    with pytest.raises(DistEnvError) as e:
        resolve_dist_env(env)
    for name in names:
        assert name in str(e.value), str(e.value)


# --------------------------------------------------------------------------- node lists


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("vm", ["vm"]),
        ("gpu[001-004,007],cpu1", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu007", "cpu1"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[08-11]", ["n08", "n09", "n10", "n11"]),
        ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
        ("node-[3,1]-ib", ["node-3-ib", "node-1-ib"]),
        ("h1.example.org,h2.example.org", ["h1.example.org", "h2.example.org"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("bad", ["", "gpu[1-2", "gpu1-2]", "gpu[a-b]", "gpu[3-1]", "a,,b", "x[[1]]"])
def test_expand_nodelist_errors(bad):
    with pytest.raises(DistEnvError):
        expand_nodelist(bad)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed: nothing to compare with")
@pytest.mark.parametrize("nodelist", ["gpu[001-004,007],cpu1", "n[8-11]", "rack[1-2]-node[01-02]", "a,b[1-2],c"])
def test_expand_nodelist_matches_scontrol(nodelist):
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert expand_nodelist(nodelist) == out.stdout.split()


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert parse_tasks_per_node("8") == [8]
    with pytest.raises(DistEnvError):
        parse_tasks_per_node("4(2)")


# --------------------------------------------------------------------------- data shards


def test_data_shard_from_job_array():
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}
    s = resolve_data_shard(env)
    assert (s.index, s.count, s.source) == (3, 4, "slurm-array")


def test_data_shard_array_with_offset_and_ranks():
    # --array=10-13, each array task runs 2 ranks: 8 sub-shards in all
    env = dict(SLURM_STEP_TASK1, SLURM_ARRAY_TASK_ID="12", SLURM_ARRAY_TASK_MIN="10", SLURM_ARRAY_TASK_MAX="13")
    s = resolve_data_shard(env)
    assert (s.index, s.count) == (2 * 2 + 1, 4 * 2)


def test_data_shard_without_array_uses_ranks():
    s = resolve_data_shard(SLURM_STEP_TASK1)
    assert (s.index, s.count, s.source) == (1, 2, "dist")
    assert resolve_data_shard({}).count == 1


def test_data_shard_errors():
    with pytest.raises(DistEnvError, match="SLURM_ARRAY_TASK_ID=5.*SLURM_ARRAY_TASK_COUNT=4"):
        resolve_data_shard({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4"})
    with pytest.raises(DistEnvError, match="SLURM_ARRAY_TASK_COUNT"):
        resolve_data_shard({"SLURM_ARRAY_TASK_ID": "1"})


# --------------------------------------------------------------------------- export to torch


def test_export_torch_env_sets_the_env_init_variables():
    env: dict[str, str] = {}
    d = resolve_dist_env(slurm_multi(6, 2, 1))
    written = export_torch_env(d, env)
    assert env == written == {
        "RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu001", "MASTER_PORT": str(port_from_job_id(123456)),
    }
    # the exported variables resolve to the same facts (torchrun path == Slurm path)
    again = resolve_dist_env(env)
    assert again.as_dict() | {"source": "slurm"} == d.as_dict()


def test_two_processes_from_slurm_variables_form_a_process_group(tmp_path):
    """Two real processes given only Slurm variables init torch.distributed via env:// (gloo)."""
    script = tmp_path / "member.py"
    script.write_text(textwrap.dedent(
        """
        import sys, torch, torch.distributed as dist
        from orthrus_train.launch.dist_env import resolve_dist_env, export_torch_env
        d = resolve_dist_env()
        export_torch_env(d)
        dist.init_process_group("gloo", init_method="env://")
        t = torch.tensor([d.rank + 1])
        dist.all_reduce(t)
        print(d.rank, dist.get_rank(), dist.get_world_size(), int(t.item()))
        dist.destroy_process_group()
        """
    ))
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in
            ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    base["PYTHONPATH"] = os.pathsep.join([str(REPO), base.get("PYTHONPATH", "")])
    job = str(20000 + os.getpid() % 5000)  # a port nobody else derives in this test run
    procs = []
    for rank in range(2):
        env = dict(base, SLURM_JOB_ID=job, SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1",
                   SLURM_NODEID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2",
                   SLURM_TASKS_PER_NODE="2", SLURM_STEP_ID="0")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(out.split())
    assert sorted(results) == [["0", "0", "2", "3"], ["1", "1", "2", "3"]]
