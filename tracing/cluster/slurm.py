"""What Slurm itself says: partition limits (preflight before a submission), the queue, sbatch's refusals.

    preflight({"slurm_partition": "gpu", "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 80, ...})
        # TracingError "--mem_gb 80 can never run on partition gpu: its largest node has 23 GB; ..."
    queue(["123_0", "123_1"])         # {"123_1": ("PENDING", "Resources")}: the jobs Slurm still holds
    sbatch_error(FailedJobError(...))  # one TracingError line with the flag to change

A request that no node of the partition can ever satisfy would pend forever (reason PartitionConfig) or be
refused by sbatch with a bare error; preflight names the flag and the largest value that fits instead.
When scontrol does not answer, preflight says so and lets sbatch decide.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TextIO

from tracing.errors import TracingError

# pending reasons after which a job never starts without someone changing it
NEVER_STARTS = ("PartitionConfig", "PartitionTimeLimit", "PartitionNodeLimit", "BadConstraints", "InvalidQOS",
                "InvalidAccount", "DependencyNeverSatisfied", "ReqNodeNotAvail")
_FIELD = re.compile(r"(\w+)=(\S*)")


def _run(cmd: list[str], timeout: float = 30) -> str | None:
    """stdout of a Slurm command, None when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _fields(line: str) -> dict[str, str]:
    return dict(_FIELD.findall(line))


def _int(text: str | None) -> int | None:
    """'UNLIMITED' / 'NONE' / missing -> None."""
    return int(text) if text and text.isdigit() else None


def minutes(text: str | None) -> int | None:
    """Slurm time limit ('UNLIMITED', 'MM', 'HH:MM:SS', 'D-HH:MM:SS', 'D-HH') -> minutes (None: no limit)."""
    if not text or text.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        return int(days) * 1440 + parts[0] * 60 + parts[1] + (parts[2] > 0)
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:  # MM:SS
        return parts[0] + (parts[1] > 0)
    return parts[0] * 60 + parts[1] + (parts[2] > 0)


def gpus(gres: str | None) -> int:
    """GPUs in a node's Gres string: 'gpu:a100:4(S:0-1),shard:8' -> 4; '(null)' -> 0."""
    total = 0
    for item in (gres or "").split(","):
        name, *rest = item.split("(")[0].split(":")
        if name == "gpu" and rest and rest[-1].isdigit():
            total += int(rest[-1])
    return total


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int


@dataclass(frozen=True)
class Partition:
    name: str
    default: bool
    state: str
    nodes: tuple[Node, ...]
    max_time_min: int | None
    max_nodes: int | None
    max_cpus_per_node: int | None
    max_mem_per_node_mb: int | None


def partitions() -> dict[str, Partition] | None:
    """Every partition with its nodes, from `scontrol show partition/node -o`; None when Slurm does not answer."""
    parts, nodes = _run(["scontrol", "show", "partition", "-o"]), _run(["scontrol", "show", "node", "-o"])
    if parts is None or nodes is None:
        return None
    by_part: dict[str, list[Node]] = {}
    for line in nodes.splitlines():
        f = _fields(line)
        if "NodeName" not in f:
            continue
        node = Node(f["NodeName"], _int(f.get("CPUEfctv")) or _int(f.get("CPUTot")) or 0,
                    _int(f.get("RealMemory")) or 0, gpus(f.get("Gres")))
        for p in f.get("Partitions", "").split(","):
            by_part.setdefault(p, []).append(node)
    out = {}
    for line in parts.splitlines():
        f = _fields(line)
        if "PartitionName" in f:
            name = f["PartitionName"]
            out[name] = Partition(name, f.get("Default") == "YES", f.get("State", "UP"), tuple(by_part.get(name, ())),
                                  minutes(f.get("MaxTime")), _int(f.get("MaxNodes")),
                                  _int(f.get("MaxCPUsPerNode")), _int(f.get("MaxMemPerNode")))
    return out


def _pick(parts: dict[str, Partition], name: str | None) -> Partition:
    names = ", ".join(sorted(parts))
    if name:
        if name not in parts:
            raise TracingError(f"Slurm has no partition '{name}': pass --partition with one of {names}")
        return parts[name]
    default = [p for p in parts.values() if p.default]
    if not default:
        raise TracingError(f"Slurm has no default partition: pass --partition with one of {names}")
    return default[0]


def preflight(params: dict, out: TextIO | None = None) -> Partition | None:
    """Refuse a request (submitit parameters) that no node of its partition can ever run, naming the flag and
    the largest value that fits. Returns the partition checked (None when Slurm could not be asked)."""
    parts = partitions()
    if parts is None:
        if out is not None:
            print("preflight: scontrol did not answer; submitting without checking the partition's limits",
                  file=out, flush=True)
        return None
    part = _pick(parts, params.get("slurm_partition"))
    where = f"partition {part.name}"
    if not part.nodes:
        raise TracingError(f"{where} has no nodes: pass --partition with one of {', '.join(sorted(parts))}")
    cap = {"cpus_per_task": min(x for x in (max(n.cpus for n in part.nodes), part.max_cpus_per_node) if x),
           "mem_gb": min(x for x in (max(n.mem_mb for n in part.nodes), part.max_mem_per_node_mb) if x) // 1024,
           "gpus_per_node": max(n.gpus for n in part.nodes)}
    asked = {"cpus_per_task": int(params.get("cpus_per_task") or 1), "mem_gb": float(params.get("mem_gb") or 0),
             "gpus_per_node": int(params.get("gpus_per_node") or 0)}
    for key, unit in (("gpus_per_node", "GPUs"), ("cpus_per_task", "CPUs"), ("mem_gb", "GB of memory")):
        if asked[key] > cap[key]:
            what = "no GPUs" if key == "gpus_per_node" and cap[key] == 0 else f"at most {cap[key]} {unit}"
            raise TracingError(f"--{key} {asked[key]:g} can never run on {where}: its nodes have {what}; "
                               f"pass --{key} {cap[key]} (or set it in the YAML's slurm: block)")
    fits = [n for n in part.nodes if n.cpus >= asked["cpus_per_task"] and n.mem_mb >= asked["mem_gb"] * 1024
            and n.gpus >= asked["gpus_per_node"]]
    if not fits:
        raise TracingError(f"no node of {where} has {asked['cpus_per_task']} CPUs, {asked['mem_gb']:g} GB and "
                           f"{asked['gpus_per_node']} GPUs at once: lower --cpus_per_task, --mem_gb or "
                           f"--gpus_per_node (sinfo -N -l -p {part.name} lists the nodes)")
    nodes = int(params.get("nodes") or 1)
    most = min(x for x in (len(fits), part.max_nodes) if x)
    if nodes > most:
        raise TracingError(f"--nodes {nodes} can never run on {where}: at most {most} node(s) fit; pass nodes: {most}")
    timeout = int(params.get("timeout_min") or 0)
    if part.max_time_min is not None and timeout > part.max_time_min:
        raise TracingError(f"--timeout_min {timeout} can never run on {where}: its time limit is "
                           f"{part.max_time_min} minutes; pass --timeout_min {part.max_time_min}")
    if part.state != "UP" and out is not None:
        print(f"warning: {where} is {part.state}: jobs will pend until it is UP", file=out, flush=True)
    return part


_SBATCH_HINTS = (("generic resource", "no GPUs (GRES) here: pass --gpus_per_node 0"),
                 ("gres", "pass --gpus_per_node 0 on a partition without GPUs"),
                 ("partition", "pass --partition with a partition sinfo lists"),
                 ("feature", "pass --constraint with a feature the nodes have (sinfo -o '%N %f'), or none"),
                 ("constraint", "pass --constraint with a feature the nodes have (sinfo -o '%N %f'), or none"),
                 ("account", "pass --account with an account you belong to (sacctmgr show assoc user=$USER)"),
                 ("qos", "pass --qos with a QOS your account may use, or none"),
                 ("time limit", "lower --timeout_min"),
                 ("memory", "lower --mem_gb"),
                 ("node configuration", "lower --cpus_per_task, --mem_gb or --gpus_per_node"))


def sbatch_error(exc: BaseException) -> TracingError:
    """sbatch's refusal (submitit's FailedJobError text) as one line naming the flag to change."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()] or lines or [type(exc).__name__]
    msg = errors[-1].removeprefix("sbatch: error: ")
    hint = next((h for key, h in _SBATCH_HINTS if key in msg.lower()),
                "check --partition, --gpus_per_node, --cpus_per_task, --mem_gb, --timeout_min, --account, --qos")
    return TracingError(f"sbatch refused the job array: {msg}; {hint}")


def queue(job_ids: Iterable[str]) -> dict[str, tuple[str, str]] | None:
    """{job id: (state, reason)} of the given jobs that Slurm still holds (array tasks one by one: 123_4);
    a job missing from the answer has ended (done, failed, cancelled, or never started and cancelled).
    None when squeue does not answer."""
    wanted = set(job_ids)
    text = _run(["squeue", "-h", "-r", "-o", "%i|%T|%r"])
    if text is None:
        return None
    out = {}
    for line in text.splitlines():
        job, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if job in wanted:
            out[job] = (state, reason if reason not in ("None", "(null)") else "")
    return out
