"""Dask workers from the batch scheduler a group already has: Slurm or PBS jobs through dask-jobqueue.

``execution.cluster`` (``alflow.config.ClusterConfig``) names where the workers of
``task_runner: dask`` come from: ``local`` (a LocalCluster on this machine),
``address`` (a scheduler someone started), or ``slurm`` / ``pbs``: one Dask
scheduler in the flow's process and batch jobs, each job one (or ``processes``)
Dask worker(s), submitted with ``sbatch`` / ``qsub``.

Pools: a campaign wants different jobs for different stages -- training and
exploration on GPU nodes, DFT labels on CPU nodes. dask-jobqueue's clusters hold
one job template each and start their own scheduler, so two clusters would be two
schedulers. ``BatchCluster`` keeps ONE scheduler (a ``JobQueueCluster``, itself a
``distributed.SpecCluster``) and puts one worker spec per job into its
``worker_spec``, each spec with its own pool's job class options (partition,
GPUs, prologue, ``--resources``): ``SpecCluster`` starts, watches and cancels
them all the same way. A pool's workers advertise ``resources`` (``--resources
GPU=1``); ``execution.dask_resources`` annotates each stage with what it needs, so
the scheduler sends ``train`` to GPU jobs and ``label`` to CPU jobs.

``adapt`` (one pool only: Dask's adaptive scaling counts tasks, not which pool's
resources they need) lets Dask submit and cancel jobs between ``minimum_jobs``
and ``maximum_jobs``.

``job_scripts(cluster)`` renders the script of each pool without a scheduler,
``sbatch`` or ``qsub``: what ``alflow validate`` prints.

dask-jobqueue is the optional extra ``cluster`` (``pip install 'alflow[cluster]'``).
"""

from __future__ import annotations

import sys
from typing import Any

from alflow.config import ClusterConfig, PoolConfig
from alflow.errors import InputError

DUMMY_SCHEDULER = "tcp://<scheduler-address>:8786"  # what a rendered script shows before a scheduler exists


def _jobqueue() -> Any:
    try:
        import dask_jobqueue
    except ImportError as err:
        raise InputError("execution.cluster.kind slurm/pbs needs dask-jobqueue: pip install 'alflow[cluster]' "
                         "(or pip install dask-jobqueue)") from err
    return dask_jobqueue


def job_class(kind: str) -> type:
    """dask-jobqueue's job class of ``kind`` (slurm, pbs)."""
    jq = _jobqueue()
    if kind == "slurm":
        return jq.slurm.SLURMJob
    if kind == "pbs":
        return jq.pbs.PBSJob
    raise InputError(f"execution.cluster.kind: expected slurm or pbs for batch jobs, got {kind!r}")


def _memory_mb(memory: str) -> int:
    from dask.utils import parse_bytes

    return max(1, -(-parse_bytes(memory) // 2**20))  # MiB, rounded up


def job_options(cluster: ClusterConfig, name: str, pool: PoolConfig) -> dict[str, Any]:
    """Keyword arguments of dask-jobqueue's job class for one job of pool ``name``."""
    directives = list(pool.directives)
    extra_args = []
    if pool.resources:
        extra_args += ["--resources", ",".join(f"{k}={v:g}" for k, v in pool.resources.items())]
    options: dict[str, Any] = {
        "cores": pool.cores, "memory": pool.memory, "processes": pool.processes, "walltime": pool.walltime,
        "queue": pool.queue, "account": pool.account, "job_name": f"alflow-{name}",
        "job_script_prologue": list(pool.prologue), "worker_extra_args": extra_args,
        "python": cluster.python or sys.executable, "interface": cluster.interface,
        "log_directory": cluster.log_directory,
    }
    if cluster.kind == "slurm":
        if pool.gpus:
            directives.append(f"--gres=gpu:{pool.gpus}" if pool.gpu_directive == "gres" else f"--gpus={pool.gpus}")
    else:  # PBS Pro: GPUs are a chunk resource of the select statement
        spec = f"select=1:ncpus={pool.cores}" + (f":ngpus={pool.gpus}" if pool.gpus else "")
        options["resource_spec"] = f"{spec}:mem={_memory_mb(pool.memory)}mb"
    options["job_extra_directives"] = directives
    return options


def job_scripts(cluster: ClusterConfig, scheduler: str = DUMMY_SCHEDULER) -> dict[str, str]:
    """The batch script each pool's jobs run (pool name -> script); needs no scheduler, sbatch or qsub."""
    if cluster.kind not in ("slurm", "pbs"):
        return {}
    cls = job_class(cluster.kind)
    return {name: _job(cls, cluster, name, pool, scheduler).job_script() for name, pool in cluster.pools.items()}


def _job(cls: type, cluster: ClusterConfig, name: str, pool: PoolConfig, scheduler: str) -> Any:
    options = job_options(cluster, name, pool)
    try:
        return cls(scheduler, name=f"{name}-0", **options)
    except (TypeError, ValueError) as err:
        raise InputError(f"execution.cluster.pools.{name}: dask-jobqueue refused the job settings: {err}") from err


def worker_specs(cluster: ClusterConfig) -> dict[str, dict[str, Any]]:
    """One ``SpecCluster`` worker spec per job (``<pool>-<i>`` -> {cls, options[, group]})."""
    cls = job_class(cluster.kind)
    specs: dict[str, dict[str, Any]] = {}
    for name, pool in cluster.pools.items():
        options = job_options(cluster, name, pool)
        for i in range(pool.jobs):
            spec: dict[str, Any] = {"cls": cls, "options": dict(options)}
            if pool.processes > 1:
                spec["group"] = [f"-{j}" for j in range(pool.processes)]
            specs[f"{name}-{i}"] = spec
    return specs


def BatchCluster(cluster: dict[str, Any], asynchronous: bool = False, **_: Any) -> Any:  # noqa: N802
    """A dask-jobqueue cluster for ``cluster`` (a ``ClusterConfig`` as dict): one scheduler, every pool's jobs.

    A callable for prefect-dask's ``DaskTaskRunner(cluster_class=..., cluster_kwargs={"cluster": ...})``;
    the runner enters it as a context manager, so the jobs are cancelled when the flow ends.
    """
    cfg = ClusterConfig.model_validate(cluster)
    jq = _jobqueue()
    cls = jq.SLURMCluster if cfg.kind == "slurm" else jq.PBSCluster
    first, pool = next(iter(cfg.pools.items()))
    options = job_options(cfg, first, pool)
    scheduler_options = {"dashboard_address": cfg.dashboard_address}
    if cfg.interface is None:  # the workers on other nodes must reach it: the host's name, not loopback
        import socket

        scheduler_options["host"] = socket.gethostname()
    batch = cls(n_workers=0, asynchronous=asynchronous, scheduler_options=scheduler_options, **options)
    if cfg.adapt is None:
        batch.worker_spec.update(worker_specs(cfg))
        batch.sync(batch._correct_state)  # submit them (SpecCluster's own way of acting on worker_spec)
    elif pool.jobs:
        batch.scale(jobs=pool.jobs)
    return batch


def adapt_kwargs(cluster: ClusterConfig) -> dict[str, int]:
    """``JobQueueCluster.adapt`` arguments of ``cluster.adapt`` (empty: no adaptive scaling)."""
    if cluster.adapt is None:
        return {}
    return {"minimum_jobs": cluster.adapt.minimum_jobs, "maximum_jobs": cluster.adapt.maximum_jobs}


def describe(cluster: ClusterConfig) -> str:
    """One line: the kind and the pools (jobs x cores, GPUs, resources)."""
    if cluster.kind == "address":
        return f"Dask scheduler at {cluster.address}"
    if cluster.kind == "local":
        return "a local Dask cluster"
    parts = []
    for name, p in cluster.pools.items():
        res = ",".join(f"{k}={v:g}" for k, v in p.resources.items())
        parts.append(f"{name}: {p.jobs} job(s) x {p.cores} core(s)" + (f", {p.gpus} GPU(s)" if p.gpus else "")
                     + (f", resources {res}" if res else "") + (f", partition {p.queue}" if p.queue else ""))
    scale = (f"; adaptive {cluster.adapt.minimum_jobs}..{cluster.adapt.maximum_jobs} jobs" if cluster.adapt else "")
    return f"{cluster.kind} jobs ({'; '.join(parts)}){scale}"

