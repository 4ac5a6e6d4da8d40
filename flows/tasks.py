"""Prefect tasks: one per loop stage, each a thin wrapper over ``alflow.stages.compute_stage``.

Tasks take and return small things only (the run directory as a string, the
iteration, a dict of paths and numbers), so Prefect keeps no frames, arrays or
models in memory or in its database. Results are not persisted and not cached:
whether a stage must run is decided by the run directory's ``state.json``
(``alflow.loop.LoopRun.run_stage``), never by Prefect's cache.

Tags: ``gpu`` for train and explore, ``dft`` for initial, gate and label, so
``prefect concurrency-limit create dft 4`` bounds concurrent oracle stages.
"""

from __future__ import annotations

import math
import os
import socket
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from alflow.config import RunConfig
from alflow.stages import compute_stage

_COMMON: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


def _run(run_dir: str, stage: str, iteration: int | None, inputs: dict[str, Any]) -> dict[str, Any]:
    logger = get_run_logger()
    where = stage if iteration is None else f"{stage} (iteration {iteration})"
    logger.info("%s: starting in %s", where, run_dir)
    result = compute_stage(run_dir, stage, iteration, inputs)
    result["worker"] = f"{socket.gethostname()}:{os.getpid()}"  # where it ran (Dask/worker placement)
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID")
    if job:  # the batch job of the worker (execution.cluster slurm/pbs): sacct -j / qstat -x
        result["batch_job"] = job
    small = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    logger.info("%s: done in %.1f s %s", where, result["seconds"], small)
    return result


@task(name="initial", task_run_name="initial", retries=2, retry_delay_seconds=5, tags=["dft"], **_COMMON)
def initial_task(run_dir: str, stage: str, iteration: int | None, inputs: dict[str, Any]) -> dict[str, Any]:
    """The initial dataset: import and/or label rattled structures (resumes its labels on retry)."""
    return _run(run_dir, stage, iteration, inputs)


@task(name="train", task_run_name="train-{iteration}", retries=0, tags=["gpu"], **_COMMON)
def train_task(run_dir: str, stage: str, iteration: int | None, inputs: dict[str, Any]) -> dict[str, Any]:
    """Train (and calibrate) the committee of one iteration."""
    return _run(run_dir, stage, iteration, inputs)


@task(name="explore", task_run_name="explore-{iteration}", retries=1, retry_delay_seconds=5, tags=["gpu"], **_COMMON)
def explore_task(run_dir: str, stage: str, iteration: int | None, inputs: dict[str, Any]) -> dict[str, Any]:
    """Run the MD walkers with the committee."""
    return _run(run_dir, stage, iteration, inputs)


@task(name="select", task_run_name="select-{iteration}", retries=0, **_COMMON)
def select_task(run_dir: str, stage: str, iteration: int | None, inputs: dict[str, Any]) -> dict[str, Any]:
    """Choose the frames to label."""
    return _run(run_dir, stage, iteration, inputs)


@task(name="label", task_run_name="label-{iteration}", retries=2, retry_delay_seconds=10, tags=["dft"], **_COMMON)
def label_task(run_dir: str, stage: str, iteration: int | None, inputs: dict[str, Any]) -> dict[str, Any]:
    """Label the selected frames (labels already in the dataset are skipped on retry)."""
    return _run(run_dir, stage, iteration, inputs)


@task(name="gate", task_run_name="gate-{iteration}", retries=2, retry_delay_seconds=10, tags=["dft"], **_COMMON)
def gate_task(run_dir: str, stage: str, iteration: int | None, inputs: dict[str, Any]) -> dict[str, Any]:
    """Physics gates (loop.gates): label the gates' structures once, compare the committee with the oracle."""
    return _run(run_dir, stage, iteration, inputs)


TASKS = {"initial": initial_task, "train": train_task, "gate": gate_task, "explore": explore_task,
         "select": select_task, "label": label_task}


def stage_timeouts(config: RunConfig) -> dict[str, float | None]:
    """Generous ``timeout_seconds`` per stage from the config (None: no limit).

    train: every member may use ``training.max_time_s`` plus validation, twice over;
    initial/label: every attempt of every frame at ``labelling.timeout_s``, in
    rounds of ``labelling.max_in_flight`` (default ``execution.max_workers``). Explore and select have no limit.
    The flow applies them with the process and Dask runners only: in a thread
    Prefect cannot interrupt a blocking call (a subprocess wait, a torch kernel)
    and would fail a stage after it finished. Labelling enforces
    ``labelling.timeout_s`` per calculation itself, training ``training.max_time_s``.
    """
    lab = config.labelling
    workers = lab.max_in_flight or config.execution.max_workers

    def labelling(n: int) -> float:
        return lab.timeout_s * (lab.retries + 1) * math.ceil(max(n, 1) / workers) + 600.0

    rattle = config.system.initial_rattle
    train = config.training.max_time_s
    return {
        "initial": labelling(rattle.n_frames if rattle is not None else 1),
        "train": None if train is None else 2.0 * config.committee.size * train + 600.0,
        "explore": None,
        "select": None,
        "label": labelling(config.selection.max_per_iteration),
        "gate": labelling(gate_frames(config)) + (config.loop.gates.rdf.timeout_s if config.loop.gates.rdf else 0.0),
    }


def gate_frames(config: RunConfig) -> int:
    """An upper estimate of the structures the configured gates label (eos points, 12 elastic, phonopy's)."""
    g = config.loop.gates
    n = (g.eos.points if g.eos else 0) + (12 if g.elastic else 0)
    if g.phonons:
        n += 6 * 64  # at most 6 displacements per atom; a generous bound without building the supercells
    return n
