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
    parser.add_argument("--dry-run", action="store_true",
                        help="print what the run would spend (oracle labels, calls, time from labels measured in the "
                             "run directory) and exit without computing anything")
    parser.add_argument("--label-seconds", type=float, default=None, metavar="S",
                        help="with --dry-run: seconds one oracle label takes (e.g. timed by hand), instead of the "
                             "median of the labels made in the run directory")
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


def dry_run_plan(config: Any, label_seconds: float | None = None) -> list[str]:
    """What the run would spend at most, without calling the oracle (docs/foundation.md: the dry run).

    Labels: the initial rattled frames, the gates' structures (paid once) and ``max_per_iteration`` per
    iteration for ``max_iterations``, capped by ``loop.max_labels``; calls: labels × (1 + retries) at most;
    time: labels × the median compute time of labels already made with this oracle in the run directory.
    """
    import json
    import statistics

    from alflow.label import LABELLED
    from alflow.oracles import source_of

    lab, loop, sel = config.labelling, config.loop, config.selection
    initial = config.system.initial_rattle.n_frames if config.system.initial_rattle is not None else 0
    if config.system.initial_from_foundation is not None:
        initial += config.system.initial_from_foundation.n_frames
    gates = 0
    for name, spec in loop.gates.configured().items():
        gates += getattr(spec, "points", None) or (12 if name == "elastic" else 1)
    per_iteration = sel.max_per_iteration
    total = initial + gates + per_iteration * loop.max_iterations
    capped = min(total, loop.max_labels) if loop.max_labels is not None else total
    lines = [f"dry run of {config.name}: nothing is computed, the oracle is not called",
             f"oracle: {lab.oracle} (label source {source_of(lab.oracle)})",
             f"initial set: {initial} frame(s) to label (rattled, picked from MD with the foundation)"
             + (f" plus the frames of {config.system.initial_dataset} (imported, no oracle call)"
                if config.system.initial_dataset else ""),
             f"loop: at most {per_iteration} label(s) per iteration x {loop.max_iterations} iteration(s) = "
             f"{per_iteration * loop.max_iterations}" + (f"; gates: about {gates} label(s), paid once" if gates else ""),
             f"oracle labels at most: {capped}" + (f" (loop.max_labels caps {total})" if capped < total else ""),
             f"oracle calls at most: {capped * (1 + lab.retries)} (labels x (1 + labelling.retries {lab.retries}))"]
    times = []
    for path in sorted(Path(config.run_dir).rglob(LABELLED)):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("oracle") == lab.oracle and isinstance(rec.get("compute_s"), (int, float)):
                times.append(float(rec["compute_s"]))
    if times or label_seconds:
        per = float(label_seconds) if label_seconds else statistics.median(times)
        workers = config.execution.max_workers
        source = ("--label-seconds" if label_seconds else
                  f"median of {len(times)} label(s) made with {lab.oracle} in {config.run_dir}")
        lines.append(f"estimated oracle time: {capped} x {per:.3g} s ({source}) = {capped * per / 3600:.3g} h of "
                     f"labelling (x labelling.threads {lab.threads} cores), "
                     f"~{capped * per / workers / 3600:.3g} h on {workers} concurrent worker(s)")
    else:
        lines.append(f"estimated oracle time: unknown (no label made with {lab.oracle} in {config.run_dir} yet; "
                     "pass --label-seconds with the time of one label)")
    return lines


def _run(args: argparse.Namespace) -> int:
    from alflow.config import load_config
    from alflow.loop import CONFIG, config_changes, run_is_complete, run_loop
    from alflow.report import write_report

    config_path = Path(args.config).resolve()
    config = load_config(config_path)
    from alflow.preflight import preflight

    preflight(config, config_path)  # files, hyperparameters, oracle, device: before any label is computed
    if getattr(args, "dry_run", False):
        if args.label_seconds is not None and not args.label_seconds > 0:
            from alflow.errors import InputError

            raise InputError(f"--label-seconds: expected seconds > 0, got {args.label_seconds}")
        print("\n".join(dry_run_plan(config, args.label_seconds)))
        return 0
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
    from alflow.process import TERMINATED, sigterm_exits

    try:
        with sigterm_exits():  # SIGTERM unwinds (children stopped, lock released) and exits 143
            return _run(args)
    except Exception as err:  # noqa: BLE001 - a failed stage: state.json keeps what finished
        if TERMINATED.is_set():  # SIGTERM's SystemExit came back wrapped in a library's error (prefect/pydantic)
            print(f"alflow run: stopped by SIGTERM ({type(err).__name__}); {KEPT}", file=sys.stderr)
            return 143
        return _failure(err)


def _failure(err: Exception) -> int:
    """Print what went wrong with the advice for its kind; return the exit code."""
    from alflow.cli import os_error_message
    from alflow.config import ConfigError
    from alflow.errors import AlflowError
    from alflow.loop import RunLockedError, RunStateError

    if isinstance(err, (ConfigError, RunLockedError, RunStateError)):
        print(f"alflow run: {err}", file=sys.stderr)
        return 2
    if isinstance(err, AlflowError):  # bad input found while a stage ran (exit 2), or the stage failed (1)
        advice = FIX_INPUT if err.exit_code == 2 else f"{KEPT}; rerun the same command to resume"
        print(f"alflow run: {err}\n{advice}", file=sys.stderr)
        return err.exit_code
    if isinstance(err, OSError):  # a file that cannot be written (a full disk) or read
        print(f"alflow run: {os_error_message(err)}\n{KEPT}; fix it, then rerun the same command to resume",
              file=sys.stderr)
        return 2
    print(f"alflow run: {type(err).__name__}: {err}\n{KEPT}; rerun the same command to resume once its cause "
          "is fixed", file=sys.stderr)
    return 1
