"""The active-learning loop as a Prefect flow; it resumes from the run directory, not from Prefect.

``active_learning(config_path)`` opens the run directory (``alflow.loop.LoopRun``:
lock, config check, ``state.json``) and drives ``alflow.loop.drive`` with an
executor that submits each unfinished stage as its Prefect task
(``flows.tasks``) and waits for it. Finished stages are read from ``state.json``
and never submitted, so rerunning the flow, in a new flow run, on another
Prefect server or with none, continues where the last one stopped. A task that
fails after its retries raises out of the flow: the flow run fails, the state
keeps every finished stage.

At the end (and on failure) the flow publishes a table artifact of the
per-iteration metrics; on success it writes the report (``alflow.report``) and
publishes it as a markdown artifact.

``run_flow(config_path)`` picks the task runner from ``execution.task_runner``:
``thread`` (ThreadPoolTaskRunner with ``max_workers``), ``process``
(ProcessPoolTaskRunner) or ``dask`` (prefect-dask's DaskTaskRunner on ``execution.cluster``:
a LocalCluster of ``max_workers`` single-threaded workers, a scheduler ``address``, or Slurm/PBS
jobs through ``alflow.cluster.BatchCluster``).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from alflow.config import ExecutionConfig, load_config
from alflow.loop import LoopRun, drive
from flows.tasks import TASKS, stage_timeouts


LOCAL_DASHBOARD = "127.0.0.1:8787"  # a local cluster's dashboard on loopback (Dask's default binds every interface)


def task_runner(execution: ExecutionConfig) -> Any:
    """The Prefect task runner for ``execution`` (see module docstring)."""
    if execution.task_runner == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=execution.max_workers)
    if execution.task_runner == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=execution.max_workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:
        raise RuntimeError("execution.task_runner: dask needs the prefect-dask package; install it with "
                           "`pip install prefect-dask` (or use task_runner: thread)") from err
    cluster = execution.resolved_cluster  # the deprecated dask_address is kind address
    if cluster.kind == "address":
        return DaskTaskRunner(address=cluster.address)
    if cluster.kind in ("slurm", "pbs"):  # one scheduler here, every pool's batch jobs (alflow.cluster)
        from alflow.cluster import BatchCluster, adapt_kwargs, job_class

        job_class(cluster.kind)  # dask-jobqueue installed? (an InputError naming the extra, before the flow starts)
        return DaskTaskRunner(cluster_class=BatchCluster, cluster_kwargs={"cluster": cluster.model_dump(mode="json")},
                              adapt_kwargs=adapt_kwargs(cluster) or None)
    return DaskTaskRunner(cluster_kwargs={"n_workers": execution.max_workers, "threads_per_worker": 1,
                                          "dashboard_address": cluster.dashboard_address or LOCAL_DASHBOARD})


def worker_resources(execution: ExecutionConfig, stage: str) -> contextlib.AbstractContextManager:
    """Dask annotation of the worker resources ``stage`` needs (``execution.dask_resources``), else a no-op.

    The Dask scheduler then runs the stage only on workers started with those resources
    (``dask worker ADDRESS --resources GPU=1``): training and exploration on GPU nodes,
    labels on CPU nodes.
    """
    needs = execution.dask_resources.get(stage) if execution.task_runner == "dask" else None
    if not needs:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources=dict(needs))


def artifact_key(name: str, suffix: str) -> str:
    """A valid artifact key (lowercase letters, digits, dashes) from the run name."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "alflow"
    return f"{slug}-{suffix}"


def metrics_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per iteration for the table artifact (fractions 0..1, eV/atom, eV/Å, s)."""
    return [{
        "iteration": r["iteration"],
        "frames_trained_on": r["dataset_size"],
        "frames_explored": r["n_explored"],
        "accurate_fraction": round(r["accurate_fraction"], 4),
        "candidate_fraction": round(r["candidate_fraction"], 4),
        "failed_fraction": round(r["failed_fraction"], 4),
        "selected": r["n_selected"],
        "labels_added": r["labels_added"],
        "label_failures": r["label_failures"],
        "valid_energy_mae_eV_per_atom": r.get("valid_energy_mae"),
        "valid_forces_rmse_eV_per_A": r.get("valid_forces_rmse"),
        "new_frames_forces_rmse_eV_per_A": r.get("new_forces_rmse"),
        "training_seconds": round(r["train_seconds"], 2),
        "walkers": ", ".join(f"{k}:{v}" for k, v in sorted(r["walker_status"].items())),
        "stop": r.get("stop") or "",
    } for r in rows]


@flow(name="active-learning")
def active_learning(config_path: str, force: bool = False, config_sha256: str | None = None) -> dict[str, Any]:
    """Run or resume the active-learning loop of ``config_path``; returns the final summary (small dict).

    ``config_sha256``: the digest the config file must have (a pinned deployment, ``flows.deploy``)."""
    from alflow.report import write_report

    logger = get_run_logger()
    config = load_config(config_path, sha256=config_sha256)
    # a thread cannot be interrupted: Prefect would only warn, then fail a finished stage; no limits there
    timeouts = stage_timeouts(config) if config.execution.task_runner != "thread" else {}
    run_dir = str(config.run_dir)

    def submit(stage: str, iteration: int | None, inputs: dict[str, Any]) -> dict[str, Any]:
        task = TASKS[stage].with_options(timeout_seconds=timeouts.get(stage))
        with worker_resources(config.execution, stage):
            future = task.submit(run_dir, stage, iteration, inputs)
        return future.result()  # raises when the task failed

    logger.info("%s", config.summary())
    with LoopRun.open(config, force=force, engine="prefect") as run:
        done = len(run.state["stages"])
        if done:
            logger.info("resuming %s: %d stage(s) already finished (session %d)", run_dir, done, run.session)
        try:
            summary = drive(run, submit, say=logger.info)
        finally:
            rows = run.state["iterations"]
            if rows:
                create_table_artifact(table=metrics_table(rows), key=artifact_key(config.name, "metrics"),
                                      description=f"alflow per-iteration metrics of {run_dir}")
    report = write_report(run_dir)
    markdown = Path(run_dir, "report.md").read_text()
    markdown = re.sub(r"!\[[^\]]*\]\([^)]*\)", f"(figure in {report})", markdown)
    create_markdown_artifact(markdown=markdown, key=artifact_key(config.name, "report"),
                             description=f"alflow report of {run_dir}")
    logger.info("report: %s", report)
    return {**summary, "report": str(report)}


def run_flow(config_path: str | Path, force: bool = False, config_sha256: str | None = None) -> dict[str, Any]:
    """Run ``active_learning`` with the task runner the config asks for; returns the summary.

    ``config_sha256``: the digest the config file must have (checked on every read of it)."""
    path = Path(config_path).resolve()
    config = load_config(path, sha256=config_sha256)
    flow_ = active_learning.with_options(task_runner=task_runner(config.execution), flow_run_name=config.name)
    return flow_(str(path), force, config_sha256)
