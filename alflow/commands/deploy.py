"""``alflow deploy CONFIG``: run the active-learning flow from a Prefect server (work pool or served).

    prefect server start                                         # once, in another terminal
    prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api
    alflow deploy examples/cu_emt/config.yaml --pool cpu        # register the deployment (and the pool)
    prefect worker start --pool cpu                              # where the flow runs should run
    prefect deployment run 'active-learning-deployment/cu_emt'  # or --run above, or the UI

    alflow deploy config.yaml --serve --run    # no work pool: this process runs the flow runs

Work-pool mode creates the pool (type ``process``) when missing and registers a deployment
whose parameter is the config's absolute path and whose source is this checkout (no image,
nothing copied): workers must run in this Python environment and see the checkout and the
run directory. The flow runs ``active_learning`` with the config's task runner, resuming from
the run directory like ``alflow run``. ``--serve`` registers the same deployment and runs its
flow runs in this process until Ctrl-C (``flow.serve``). ``--pin-config`` stores the config's
sha256 with the deployment: flow runs then refuse another config path or changed content (a
config is code; see docs/security.md, also for ``$ALFLOW_CONFIG_DIR``). Both need ``PREFECT_API_URL`` pointing
at a running server. ``execution.prefect_home``, when set, is used as ``PREFECT_HOME`` here.
Exit status: 0 registered (or served until interrupted), 1 Prefect refused, 2 bad config or no server.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML run configuration")
    parser.add_argument("--pool",
                        help="work pool (created as type 'process' when missing; default: alflow)")
    parser.add_argument("--name", help="deployment name (default: the config's name)")
    parser.add_argument("--work-queue", help="work queue of the pool (default: the pool's default queue)")
    parser.add_argument("--serve", action="store_true",
                        help="no work pool: register the deployment and run its flow runs in this process until Ctrl-C")
    parser.add_argument("--run", action="store_true", help="also start one flow run now and print its id")
    parser.add_argument("--pin-config", action="store_true",
                        help="store the config's sha256 with the deployment: its flow runs refuse another config "
                             "path or a changed config (a config is code: docs/security.md)")
    schedule = parser.add_mutually_exclusive_group()
    schedule.add_argument("--cron", help="schedule: a cron string, e.g. '0 * * * *' (a run that stopped does nothing)")
    schedule.add_argument("--interval", type=float, metavar="SECONDS", help="schedule: a run every SECONDS")


def _say_deployed(info: Any, config_path: Path, run_dir: Path) -> None:
    where = f"work pool {info.pool!r}{' (created, type process)' if info.pool_created else ''}" if info.pool \
        else "this process (served)"
    print(f"deployment '{info.full_name}' ({info.deployment_id}) on {where}")
    print(f"config: {config_path}\nrun directory: {run_dir}")
    if info.pool:
        print(f"start a worker (in this Python environment, where the run directory is visible):\n"
              f"    prefect worker start --pool {info.pool}")
    print(f"start a flow run (or from the UI):\n    prefect deployment run '{info.full_name}'")
    if info.flow_run_id:
        print(f"flow run: {info.flow_run_id}")
    sys.stdout.flush()


def _deploy(args: argparse.Namespace) -> int:
    from alflow.config import load_config

    config_path = Path(args.config).resolve()
    config = load_config(config_path)  # before Prefect: a bad config fails fast, naming the field
    if config.execution.prefect_home:  # as `alflow run`: the config's PREFECT_HOME (profiles) wins
        Path(config.execution.prefect_home).expanduser().mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(config.execution.prefect_home)
    from flows.deploy import deploy, serve

    def say(info: Any) -> None:
        _say_deployed(info, config_path, Path(config.run_dir))

    schedule = {"cron": args.cron, "interval": args.interval}
    if args.serve:
        if args.work_queue or args.pool:
            print("alflow deploy: --serve uses no work pool; --pool/--work-queue ignored", file=sys.stderr)
        serve(config_path, name=args.name, run=args.run, on_ready=say, pin_config=args.pin_config, **schedule)
        return 0
    say(deploy(config_path, pool=args.pool or "alflow", name=args.name, work_queue=args.work_queue, run=args.run,
               say=print, pin_config=args.pin_config, **schedule))
    return 0


def run(args: argparse.Namespace) -> int:
    from alflow.config import ConfigError

    try:
        return _deploy(args)
    except ConfigError as err:
        print(f"alflow deploy: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - no server (2) or Prefect refused the deployment (1)
        module = sys.modules.get("flows.deploy")
        no_server = module is not None and isinstance(err, module.ServerError)
        print(f"alflow deploy: {err if no_server else f'{type(err).__name__}: {err}'}", file=sys.stderr)
        return 2 if no_server else 1
