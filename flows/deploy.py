"""Run the active-learning flow from a Prefect server: a work-pool deployment or a served process.

``deploy(config_path, pool=...)`` registers a deployment of the ``active-learning-deployment``
flow (``deployed_active_learning`` below) with ``config_path`` as its parameter on a work pool
(created as a ``process`` pool when missing); a worker (``prefect worker start --pool POOL``)
started in this Python environment runs its flow runs. ``serve(config_path)`` registers the
same deployment and runs its flow runs itself until stopped (``flow.serve``; no work pool).

Trust: a config is code (``docs/security.md``). ``pin_config`` stores the config's sha256 with
the deployment, and its flow runs refuse another ``config_path`` or a config whose content
changed (``check_pinned``); ``$ALFLOW_CONFIG_DIR`` in the flow run's environment restricts the
directories a config may come from.

The code is not copied anywhere: the deployment's source is this checkout (the directory
holding ``flows/``, ``Flow.from_source`` with a local path), so workers must see it and the
run directory at the same paths (one machine, or a shared filesystem).

Why a second flow: a deployment stores an entrypoint, not a flow object, so
``active_learning.with_options(task_runner=...)`` would be lost. The entrypoint flow reads
the config when it runs and calls ``active_learning`` as a subflow with the task runner of
``execution.task_runner`` (``flows.active_learning.run_flow``), exactly as ``alflow run`` does.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.flows import Flow

from alflow.config import ConfigError, check_config_location, config_digest, load_config
from flows.active_learning import run_flow
from alflow.errors import InputError

FLOW_NAME = "active-learning-deployment"
SOURCE = Path(__file__).resolve().parents[1]  # the directory holding flows/ (this checkout)
ENTRYPOINT = "flows/deploy.py:deployed_active_learning"
ENV = {"PREFECT_LOGGING_EXTRA_LOGGERS": "alflow"}  # alflow's log lines in the flow run logs
TAGS = ["alflow"]
START_SERVER = ("start one with `prefect server start` (UI and API on http://127.0.0.1:4200) and point "
                "Prefect at it: `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api` "
                "(or export PREFECT_API_URL)")


class ServerError(InputError):
    """No Prefect server (``PREFECT_API_URL`` unset or not answering)."""


def deployment_parameters(deployment_id: Any) -> dict[str, Any]:
    """The parameters stored with the deployment itself (not a flow run's overrides); {} without one."""
    if not deployment_id:
        return {}
    with get_client(sync_client=True) as client:
        return dict(client.read_deployment(deployment_id).parameters or {})


def check_pinned(config_path: str | Path, config_sha256: str | None = None,
                 deployment_id: Any = None) -> str | None:
    """The sha256 that ``config_path`` must have for this flow run, after the deployment's checks.

    A deployment made with ``--pin-config`` stores ``config_sha256`` with its parameters; a flow run
    may not choose another config path or digest (a run's parameters can be overridden by whoever
    starts it, the deployment's cannot), else ``ConfigError``. ``$ALFLOW_CONFIG_DIR`` (the flow run's
    environment) restricts the directories a config may come from. Returns the digest to enforce.
    """
    stored = deployment_parameters(deployment_id)
    pinned = stored.get("config_sha256")
    if pinned:
        same_path = Path(os.path.realpath(config_path)) == Path(os.path.realpath(stored.get("config_path", "")))
        if not same_path or config_sha256 not in (None, pinned):
            raise ConfigError(f"config_path {config_path}: this deployment is pinned to {stored.get('config_path')} "
                              f"(sha256 {pinned}); a flow run cannot choose another config")
        config_sha256 = pinned
    check_config_location(config_path)
    return config_sha256


@flow(name=FLOW_NAME)
def deployed_active_learning(config_path: str, force: bool = False, config_sha256: str | None = None) -> dict[str, Any]:
    """Run or resume ``config_path``'s loop: ``active_learning`` as a subflow with the configured task runner.

    ``config_sha256`` (set by ``alflow deploy --pin-config``): the config's content must have this
    digest (``check_pinned``; the deployment's stored value wins over a flow run's).
    """
    from prefect.runtime import deployment

    sha = check_pinned(config_path, config_sha256, deployment.id)
    return run_flow(config_path, force, config_sha256=sha)


@dataclass
class Deployed:
    """What ``deploy``/``serve`` registered."""

    deployment_id: str
    full_name: str  # "<flow>/<deployment>", as `prefect deployment run` wants it
    pool: str | None  # None when served
    pool_created: bool
    flow_run_id: str | None  # with run=True


def require_server() -> str:
    """The API URL of a Prefect server that answers; raises ``ServerError`` saying how to start one."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ServerError(f"PREFECT_API_URL is not set: a deployment needs a running Prefect server; {START_SERVER}")
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise ServerError(f"no Prefect server answers at PREFECT_API_URL={url} ({error}); {START_SERVER}")
    return str(url)


def ensure_pool(name: str, say: Callable[[str], Any] = print) -> bool:
    """Create work pool ``name`` (type ``process``) unless it exists; True when created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(
                    name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
            except ObjectAlreadyExists:  # created meanwhile by someone else
                return False
            return True
    if pool.type != "process":
        say(f"warning: work pool {name!r} is of type {pool.type!r}: its workers must see {SOURCE} and the "
            "run directory at the same paths, with alflow installed")
    return False


def _source_flow() -> Flow[..., Any]:
    """The entrypoint flow, loaded from this checkout as a deployment source (local directory, no image)."""
    return Flow.from_source(source=str(SOURCE), entrypoint=ENTRYPOINT)


def _schedule(cron: str | None, interval: float | None) -> dict[str, Any]:
    return {"cron": cron, "interval": timedelta(seconds=interval) if interval else None}


def _start_run(deployment_id: Any) -> str:
    with get_client(sync_client=True) as client:
        return str(client.create_flow_run_from_deployment(deployment_id, tags=TAGS).id)


def _prepare(config_path: str | Path, name: str | None, pin_config: bool = False) -> tuple[Path, str, dict[str, Any]]:
    """Validate the config (``ConfigError`` names the field) and check the server; absolute path, name and
    the deployment's parameters (with ``config_sha256`` when ``pin_config``)."""
    path = Path(config_path).resolve()  # a worker runs elsewhere: every path must be absolute
    digest = config_digest(path) if pin_config else None
    config = load_config(path, sha256=digest)
    require_server()
    parameters: dict[str, Any] = {"config_path": str(path)}
    if digest:
        parameters["config_sha256"] = digest
    return path, name or config.name, parameters


def deploy(config_path: str | Path, *, pool: str, name: str | None = None, work_queue: str | None = None,
           cron: str | None = None, interval: float | None = None, run: bool = False,
           say: Callable[[str], Any] = print, pin_config: bool = False) -> Deployed:
    """Register the deployment of ``config_path`` on work pool ``pool`` (created when missing).

    ``name`` defaults to the config's ``name``; ``cron``/``interval`` (s) add a schedule; ``run``
    also starts one flow run (a worker picks it up). At most one flow run of the deployment runs
    at a time (the run directory admits one process anyway); more wait in the queue.
    ``pin_config``: store the config's sha256; flow runs refuse another config or changed content.
    """
    path, name, parameters = _prepare(config_path, name, pin_config)
    created = ensure_pool(pool, say=say)
    deployment_id = _source_flow().deploy(
        name=name, work_pool_name=pool, work_queue_name=work_queue, parameters=parameters,
        job_variables={"env": dict(ENV)}, concurrency_limit=1, tags=TAGS,
        description=f"alflow active-learning loop of {path}", print_next_steps=False, ignore_warnings=True,
        **_schedule(cron, interval))
    flow_run_id = _start_run(deployment_id) if run else None
    return Deployed(str(deployment_id), f"{FLOW_NAME}/{name}", pool, created, flow_run_id)


def serve(config_path: str | Path, *, name: str | None = None, cron: str | None = None,
          interval: float | None = None, run: bool = False,
          on_ready: Callable[[Deployed], Any] | None = None, pin_config: bool = False) -> None:
    """Register the deployment of ``config_path`` and run its flow runs in this process until interrupted.

    Like ``flow.serve``: no work pool and no worker; flow runs start as subprocesses of this
    process, one at a time. ``on_ready`` gets the ``Deployed`` record before serving starts.
    """
    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    path, name, parameters = _prepare(config_path, name, pin_config)
    for key, value in ENV.items():  # flow runs are subprocesses: they inherit this environment
        os.environ.setdefault(key, value)
    runner = Runner(name=f"alflow-{name}", limit=1)
    deployment_id = runner.add_flow(_source_flow(), name=name, parameters=parameters, tags=TAGS,
                                    description=f"alflow active-learning loop of {path}", **_schedule(cron, interval))
    flow_run_id = _start_run(deployment_id) if run else None
    if on_ready is not None:
        on_ready(Deployed(str(deployment_id), f"{FLOW_NAME}/{name}", None, False, flow_run_id))
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):  # Ctrl-C / SIGTERM: stop serving (schedules are paused)
        pass
