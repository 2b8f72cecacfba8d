"""Process-group and rank facts: the one place that reads launcher variables.

Every process of a run asks :func:`resolve_dist_env` who it is. Three launch styles give the same
answer:

* ``torchrun`` / ``deepspeed`` launcher: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE`` (DeepSpeed: ``LOCAL_SIZE``), ``MASTER_ADDR``, ``MASTER_PORT``.
* Slurm ``srun`` (one task per GPU): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
  ``SLURM_TASKS_PER_NODE`` (``"4(x2)"``), ``SLURM_NODEID``, ``SLURM_JOB_NUM_NODES``,
  ``SLURM_JOB_NODELIST`` (first host = master address); master port derived from the job id.
* nothing: a single process on this machine.

The launcher variables win over Slurm's when both are present (``torchrun`` started inside a Slurm
job describes the real process group; Slurm's describe the ``srun`` step around it). Slurm's
variables are trusted only inside a job step (``SLURM_STEP_ID`` set): the batch script itself also
carries ``SLURM_PROCID=0`` and ``SLURM_NTASKS=N`` although it is one process.

:func:`export_torch_env` writes the resolved facts back as ``RANK``/``WORLD_SIZE``/... so that
``torch.distributed.init_process_group(init_method="env://")`` and ``deepspeed.init_distributed()``
behave the same under Slurm as under ``torchrun``.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import asdict, dataclass
from typing import Mapping, MutableMapping

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# Ports derived from a Slurm job id land in [PORT_BASE, PORT_BASE + PORT_SPAN): below Linux's
# ephemeral range (32768+) so they do not collide with outgoing connections.
PORT_BASE = 10000
PORT_SPAN = 20000

# Variables export_torch_env() owns; the sbatch script clears them before srun so values leaked
# from the submitting shell cannot override Slurm's.
TORCH_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistEnvError(ValueError):
    """The launcher variables are missing, malformed or contradict each other."""


@dataclass(frozen=True)
class DistEnv:
    world_size: int
    rank: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    node_rank: int
    num_nodes: int
    source: str  # "torch" | "slurm" | "slurm-batch" | "default"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DataShard:
    """Which slice of the data-stage work this process does: shard ``index`` of ``count``."""

    index: int
    count: int
    source: str  # "slurm-array" | "dist" | "default"


# --------------------------------------------------------------------------- parsing helpers


def _get(environ: Mapping[str, str], *names: str) -> tuple[str, str] | tuple[None, None]:
    """First of ``names`` that is set to a non-empty value, as (name, value)."""
    for name in names:
        value = environ.get(name)
        if value is not None and value.strip() != "":
            return name, value.strip()
    return None, None


def _int(environ: Mapping[str, str], *names: str, minimum: int = 0) -> tuple[str, int] | tuple[None, None]:
    name, value = _get(environ, *names)
    if name is None:
        return None, None
    try:
        number = int(value)
    except ValueError:
        raise DistEnvError(f"{name}={value!r} is not an integer") from None
    if number < minimum:
        raise DistEnvError(f"{name}={number} must be >= {minimum}")
    return name, number


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside square brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise DistEnvError(f"nested '[' in Slurm node list {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise DistEnvError(f"unbalanced ']' in Slurm node list {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise DistEnvError(f"unbalanced '[' in Slurm node list {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range_set(body: str, whole: str) -> list[str]:
    """``"001-004,007"`` -> ``["001", "002", "003", "004", "007"]`` (zero padding kept)."""
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise DistEnvError(f"bad range {item!r} in Slurm node list {whole!r}")
        lo_s, hi_s = m.group(1), m.group(2)
        if hi_s is None:
            out.append(lo_s)
            continue
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise DistEnvError(f"descending range {item!r} in Slurm node list {whole!r}")
        width = len(lo_s)  # Slurm pads to the width of the lower bound
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list the way ``scontrol show hostnames`` does.

    ``"gpu[001-004,007],cpu1"`` -> ``gpu001 gpu002 gpu003 gpu004 gpu007 cpu1``; several bracket
    groups in one name expand as a product (``"r[1-2]n[1-2]"`` -> ``r1n1 r1n2 r2n1 r2n2``).
    """
    if nodelist is None or not nodelist.strip():
        raise DistEnvError("empty Slurm node list")
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        part = part.strip()
        if not part:
            raise DistEnvError(f"empty host name in Slurm node list {nodelist!r}")
        # literal text and [ranges] alternate: "gpu", "001-004,007", "-ib", ...
        pieces = re.split(r"\[([^\]]*)\]", part)
        choices: list[list[str]] = []
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                if "[" in piece or "]" in piece:
                    raise DistEnvError(f"unbalanced brackets in Slurm node list {nodelist!r}")
                choices.append([piece])
            else:
                choices.append(_expand_range_set(piece, nodelist))
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (the rendezvous/master host)."""
    return expand_nodelist(nodelist)[0]


def parse_tasks_per_node(spec: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` format -> per-node counts: ``"4(x2),3"`` -> ``[4, 4, 3]``."""
    counts: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise DistEnvError(f"cannot parse tasks-per-node value {spec!r} (expected e.g. '4(x2),3')")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def port_from_job_id(job_id: int | str) -> int:
    """A rendezvous port every task of a Slurm job derives the same way (no coordination)."""
    return PORT_BASE + int(job_id) % PORT_SPAN


# --------------------------------------------------------------------------- resolution


def _in_slurm_step(environ: Mapping[str, str]) -> bool:
    return _get(environ, "SLURM_STEP_ID", "SLURM_STEPID")[0] is not None


def _slurm_master(environ: Mapping[str, str]) -> tuple[str, int]:
    addr_name, addr = _get(environ, "MASTER_ADDR")
    if addr_name is None:
        nl_name, nodelist = _get(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        if nl_name is None:
            raise DistEnvError(
                "running as a Slurm step but none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, "
                "SLURM_NODELIST is set, so the master address is unknown; set MASTER_ADDR"
            )
        try:
            addr = first_host(nodelist)
        except DistEnvError as e:
            raise DistEnvError(f"{nl_name}: {e}") from None
    port_name, port = _int(environ, "MASTER_PORT", minimum=1)
    if port_name is None:
        job_name, job_id = _int(environ, "SLURM_JOB_ID", "SLURM_JOBID")
        port = port_from_job_id(job_id) if job_name is not None else DEFAULT_MASTER_PORT
    return addr, port


def _check_port(port: int, name: str = "MASTER_PORT") -> None:
    if not 1 <= port <= 65535:
        raise DistEnvError(f"{name}={port} is not a TCP port (1..65535)")


def _resolve_slurm(environ: Mapping[str, str]) -> DistEnv:
    _, rank = _int(environ, "SLURM_PROCID")
    ntasks_name, world = _int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS", minimum=1)
    if ntasks_name is None:
        raise DistEnvError("SLURM_PROCID is set but none of SLURM_STEP_NUM_TASKS, SLURM_NTASKS, SLURM_NPROCS is")
    if rank >= world:
        raise DistEnvError(f"SLURM_PROCID={rank} is not below {ntasks_name}={world}")

    nn_name, num_nodes = _int(environ, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", minimum=1)
    if nn_name is None:
        nn_name, num_nodes = "(default)", 1
    nid_name, node_rank = _int(environ, "SLURM_NODEID")
    if nid_name is None:
        if num_nodes > 1:
            raise DistEnvError(f"{nn_name}={num_nodes} but SLURM_NODEID is not set")
        nid_name, node_rank = "(default)", 0
    if node_rank >= num_nodes:
        raise DistEnvError(f"SLURM_NODEID={node_rank} is not below {nn_name}={num_nodes}")

    tpn_name, tpn = _get(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if tpn_name is not None:
        try:
            per_node = parse_tasks_per_node(tpn)
        except DistEnvError as e:
            raise DistEnvError(f"{tpn_name}: {e}") from None
        if len(per_node) != num_nodes:
            raise DistEnvError(f"{tpn_name}={tpn!r} lists {len(per_node)} nodes but {nn_name}={num_nodes}")
        if sum(per_node) != world:
            raise DistEnvError(f"{tpn_name}={tpn!r} adds up to {sum(per_node)} tasks but {ntasks_name}={world}")
        local_world = per_node[node_rank]
    else:
        ntpn_name, local_world = _int(environ, "SLURM_NTASKS_PER_NODE", minimum=1)
        if ntpn_name is None:
            if world % num_nodes:
                raise DistEnvError(
                    f"cannot tell tasks per node: {ntasks_name}={world} is not a multiple of "
                    f"{nn_name}={num_nodes} and SLURM_TASKS_PER_NODE is not set"
                )
            ntpn_name, local_world = "(derived)", world // num_nodes
        if local_world * num_nodes != world:
            raise DistEnvError(
                f"SLURM_NTASKS_PER_NODE={local_world} x {nn_name}={num_nodes} != {ntasks_name}={world}"
            )

    lid_name, local_rank = _int(environ, "SLURM_LOCALID")
    if lid_name is None:
        raise DistEnvError("SLURM_PROCID is set but SLURM_LOCALID is not")
    if local_rank >= local_world:
        raise DistEnvError(
            f"SLURM_LOCALID={local_rank} is not below the tasks on this node ({local_world}, from "
            f"{tpn_name or 'SLURM_NTASKS_PER_NODE'})"
        )

    addr, port = _slurm_master(environ)
    _check_port(port)
    return DistEnv(world, rank, local_rank, local_world, addr, port, node_rank, num_nodes, "slurm")


def _resolve_torch(environ: Mapping[str, str]) -> DistEnv:
    rank_name, rank = _int(environ, "RANK")
    world_name, world = _int(environ, "WORLD_SIZE", minimum=1)
    if rank_name is None or world_name is None:
        missing = "RANK" if rank_name is None else "WORLD_SIZE"
        present = "WORLD_SIZE" if rank_name is None else "RANK"
        raise DistEnvError(f"{present} is set but {missing} is not; set both (torchrun/deepspeed set both)")
    if rank >= world:
        raise DistEnvError(f"RANK={rank} is not below WORLD_SIZE={world}")

    lr_name, local_rank = _int(environ, "LOCAL_RANK")
    lws_name, local_world = _int(environ, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", minimum=1)
    if lr_name is None:
        if world > 1:
            raise DistEnvError(f"WORLD_SIZE={world} but LOCAL_RANK is not set (needed to pick the device)")
        local_rank = 0
    if lws_name is None:
        # torchrun always sets LOCAL_WORLD_SIZE; a hand-written env without it is taken as one node.
        if local_rank != rank:
            raise DistEnvError(
                f"LOCAL_RANK={local_rank} != RANK={rank} (several nodes) but LOCAL_WORLD_SIZE is not set"
            )
        lws_name, local_world = "(derived)", world
    if local_rank >= local_world:
        raise DistEnvError(f"LOCAL_RANK={local_rank} is not below {lws_name}={local_world}")
    if world % local_world:
        raise DistEnvError(f"WORLD_SIZE={world} is not a multiple of {lws_name}={local_world}")
    num_nodes = world // local_world
    nr_name, node_rank = _int(environ, "GROUP_RANK", "NODE_RANK", "CROSS_RANK")
    if nr_name is None:
        node_rank = rank // local_world
    elif node_rank >= num_nodes:
        raise DistEnvError(f"{nr_name}={node_rank} is not below WORLD_SIZE/{lws_name}={num_nodes}")

    addr_name, addr = _get(environ, "MASTER_ADDR")
    port_name, port = _int(environ, "MASTER_PORT", minimum=1)
    if addr_name is None or port_name is None:
        if world > 1:
            missing = [n for n, v in (("MASTER_ADDR", addr_name), ("MASTER_PORT", port_name)) if v is None]
            raise DistEnvError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set")
        addr = addr if addr_name is not None else DEFAULT_MASTER_ADDR
        port = port if port_name is not None else DEFAULT_MASTER_PORT
    _check_port(port)
    return DistEnv(world, rank, local_rank, local_world, addr, port, node_rank, num_nodes, "torch")


def resolve_dist_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Who this process is in the run. Raises :class:`DistEnvError` naming the bad variables."""
    if _get(environ, "RANK", "WORLD_SIZE")[0] is not None:
        return _resolve_torch(environ)
    if _get(environ, "SLURM_PROCID")[0] is not None and _in_slurm_step(environ):
        return _resolve_slurm(environ)
    port_name, port = _int(environ, "MASTER_PORT", minimum=1)
    port = port if port_name is not None else DEFAULT_MASTER_PORT
    _check_port(port)
    addr = _get(environ, "MASTER_ADDR")[1] or DEFAULT_MASTER_ADDR
    # Inside a Slurm batch script but outside srun: one process, whatever SLURM_NTASKS says.
    source = "slurm-batch" if _get(environ, "SLURM_JOB_ID", "SLURM_JOBID")[0] is not None else "default"
    return DistEnv(1, 0, 0, 1, addr, port, 0, 1, source)


def export_torch_env(d: DistEnv, environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT from ``d``.

    Afterwards ``torch.distributed.init_process_group(init_method="env://")`` and
    ``deepspeed.init_distributed()`` (which skips its MPI discovery when these are set) see the
    same process group under Slurm as under torchrun. Returns the values written.
    """
    values = {
        "RANK": str(d.rank),
        "WORLD_SIZE": str(d.world_size),
        "LOCAL_RANK": str(d.local_rank),
        "LOCAL_WORLD_SIZE": str(d.local_world_size),
        "MASTER_ADDR": d.master_addr,
        "MASTER_PORT": str(d.master_port),
    }
    environ.update(values)
    return values


def resolve_data_shard(environ: Mapping[str, str] = os.environ, dist: DistEnv | None = None) -> DataShard:
    """The data stage's shard: array task ``SLURM_ARRAY_TASK_ID`` of ``SLURM_ARRAY_TASK_COUNT``.

    When the array task itself runs several ranks, each rank takes its own sub-shard:
    ``index = array_index * world_size + rank``, ``count = array_count * world_size``.
    Outside a job array the shard is the rank among ``world_size`` processes.
    """
    dist = dist if dist is not None else resolve_dist_env(environ)
    id_name, task_id = _int(environ, "SLURM_ARRAY_TASK_ID")
    if id_name is None:
        if dist.world_size > 1:
            return DataShard(dist.rank, dist.world_size, "dist")
        return DataShard(0, 1, "default")
    count_name, count = _int(environ, "SLURM_ARRAY_TASK_COUNT", minimum=1)
    min_name, task_min = _int(environ, "SLURM_ARRAY_TASK_MIN")
    if count_name is None:
        max_name, task_max = _int(environ, "SLURM_ARRAY_TASK_MAX")
        if max_name is None:
            raise DistEnvError("SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX is")
        count = task_max - (task_min or 0) + 1
        count_name = "SLURM_ARRAY_TASK_MAX-MIN+1"
    index = task_id - (task_min or 0)
    if not 0 <= index < count:
        raise DistEnvError(
            f"SLURM_ARRAY_TASK_ID={task_id} (minus SLURM_ARRAY_TASK_MIN={task_min or 0}) is not below "
            f"{count_name}={count}; submit the data stage with --array=0-{count - 1}"
        )
    return DataShard(index * dist.world_size + dist.rank, count * dist.world_size, "slurm-array")
