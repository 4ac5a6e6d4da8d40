"""``alflow run CONFIG``: run the active-learning loop as a Prefect flow; rerunning resumes.

    alflow run examples/cu_emt/config.yaml          # runs, or resumes where it stopped
    alflow run config.yaml --no-prefect             # the same loop in this process, without Prefect

No Prefect server is needed: without ``PREFECT_API_URL`` a temporary local
server is started for the run (Prefect's ephemeral mode, ``flows.server``: it
dies with the run, even on SIGKILL) whose database lives in
``PREFECT_HOME``: ``execution.prefect_home`` when set, else ``$PREFECT_HOME``
when set, else ``<run_dir>/.prefect`` (set before Prefect is imported). With
``PREFECT_API_URL`` set, the flow run is reported to that server, which must
answer a health check within ``--prefect-timeout`` seconds. Whether a stage
must run is read from ``<run_dir>/state.json``, so a rerun after a crash or a
kill continues; a run that already stopped prints its summary and rewrites the
report. Exit status: 0 done, 1 a stage failed (rerun to resume), 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alflow.results import RunSummary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML run configuration")
    parser.add_argument("--force", action="store_true",
                        help="resume even though the configuration changed outside name/run_dir/loop/execution")
    parser.add_argument("--no-prefect", action="store_true",
                        help="run the loop in this process without Prefect (same run directory and resume)")
    parser.add_argument("--progress", action="store_true", help="progress bars (with --no-prefect)")
    parser.add_argument("--prefect-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="seconds the Prefect API at PREFECT_API_URL has to answer a health check before the "
                             "run stops with a message (default 30)")


def prefect_environment(config: Any) -> dict[str, str]:
    """Set Prefect's environment for this run before Prefect is imported; returns what was set."""
    home = config.execution.prefect_home or os.environ.get("PREFECT_HOME") or str(Path(config.run_dir) / ".prefect")
    Path(home).expanduser().mkdir(parents=True, exist_ok=True)  # Prefect does not create parents
    os.environ["PREFECT_HOME"] = str(home)
    defaults = {
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # a loaded machine starts the server slowly
        "PREFECT_LOGGING_EXTRA_LOGGERS": "alflow",  # alflow's own log lines go to the flow run logs too
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry from compute nodes
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return {"PREFECT_HOME": str(home), **{k: os.environ[k] for k in defaults}}


def _print_summary(summary: RunSummary | dict[str, Any]) -> None:
    """One line on the run (``alflow.results.RunSummary``), the final model, the run directory."""
    print(f"run {summary['name']}: {summary['status']} after {summary['iterations']} iteration(s); "
          f"{summary['labels']} oracle label(s), dataset of {summary['dataset_size']} frames")
    if summary.get("final_model"):
        print(f"final model: {summary['final_model']}")
    print(f"run directory: {summary['run_dir']}")


def _run(args: argparse.Namespace) -> int:
    from alflow.config import load_config
    from alflow.loop import CONFIG, config_changes, run_is_complete, run_loop
    from alflow.report import write_report

    config_path = Path(args.config).resolve()
    config = load_config(config_path)
    from alflow.preflight import preflight

    preflight(config, config_path)  # files, hyperparameters, oracle, device: before any label is computed
    stored = Path(config.run_dir) / CONFIG
    if run_is_complete(config) and not config_changes(load_config(stored), config):
        from alflow.loop import LoopRun, read_state

        summary = LoopRun(config, read_state(config.run_dir), session=-1).summary()
        print(f"the run already stopped ({summary['status']}); nothing to do. Change the loop section "
              "(max_iterations, max_labels, convergence_*) to continue it")
    elif args.no_prefect:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        summary = run_loop(config, force=args.force, progress=args.progress, say=print)
    else:
        if not args.prefect_timeout > 0:
            from alflow.errors import InputError

            raise InputError(f"--prefect-timeout: expected seconds > 0, got {args.prefect_timeout}")
        prefect_environment(config)
        from flows.server import prefect_api

        # SIGTERM unwinds (``run``: the temporary server is stopped, the run lock released); a SIGKILL is
        # covered by the server's watchdog and, failing that, by the next run's reaper (flows.server)
        with prefect_api(config.run_dir, timeout=args.prefect_timeout):
            from flows.active_learning import run_flow

            summary = run_flow(config_path, force=args.force)
    _print_summary(summary)
    report = write_report(config.run_dir)
    print(f"report: {report} and {report.with_suffix('.md')}")
    return 0


KEPT = "every finished stage is kept in the run directory's state.json"
FIX_INPUT = (f"{KEPT}; fix what is named above, then rerun the same command (add --force if that changed the "
             "configuration outside name, run_dir, loop and execution)")


def run(args: argparse.Namespace) -> int:
    from alflow.cli import os_error_message
    from alflow.config import ConfigError
    from alflow.errors import AlflowError
    from alflow.loop import RunLockedError, RunStateError

    from alflow.process import sigterm_exits

    try:
        with sigterm_exits():  # SIGTERM unwinds (children stopped, lock released) and exits 143
            return _run(args)
    except (ConfigError, RunLockedError, RunStateError) as err:
        print(f"alflow run: {err}", file=sys.stderr)
        return 2
    except AlflowError as err:  # bad input found while a stage ran (exit 2), or the stage failed (1)
        advice = FIX_INPUT if err.exit_code == 2 else f"{KEPT}; rerun the same command to resume"
        print(f"alflow run: {err}\n{advice}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # a file that cannot be written (a full disk) or read
        print(f"alflow run: {os_error_message(err)}\n{KEPT}; fix it, then rerun the same command to resume",
              file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a failed stage: state.json keeps what finished
        print(f"alflow run: {type(err).__name__}: {err}\n{KEPT}; rerun the same command to resume once its cause "
              "is fixed", file=sys.stderr)
        return 1
