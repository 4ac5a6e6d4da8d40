"""``alflow validate CONFIG...``: check run configurations and report every error with its field path.

Besides the file itself (``alflow.config.load_config``), each configuration is checked against
this machine and its files as ``alflow run`` does before its first oracle call
(``alflow.preflight``: structure, dataset and model files, hyperparameter names, the oracle,
the device); ``--file-only`` skips that (a configuration meant for another machine). With ``execution.cluster``
kind slurm or pbs it names the pools; ``--job-script`` prints the batch script of each pool
(``alflow.cluster.job_scripts``: rendered without a scheduler or ``sbatch``).
Exit status: 0 all valid, 2 if any file is invalid.
"""

from __future__ import annotations

import argparse
import sys

from alflow.config import ConfigError, config_to_yaml, load_config
from alflow.errors import AlflowError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML run configuration file(s)")
    parser.add_argument("--resolved", action="store_true",
                        help="also print each valid configuration with all defaults filled in and paths resolved")
    parser.add_argument("--file-only", action="store_true",
                        help="check the file only, not its files, oracle and device on this machine")
    parser.add_argument("--job-script", action="store_true",
                        help="also print the batch script each pool of execution.cluster (slurm, pbs) would submit")


def run(args: argparse.Namespace) -> int:
    """Print ``OK <path>: <summary>`` per valid file, the error list otherwise; 2 if any file is invalid."""
    from alflow.preflight import preflight

    status = 0
    for path in args.configs:
        try:
            cfg = load_config(path)
            if not args.file_only:
                preflight(cfg, path)
        except ConfigError as exc:
            print(f"ERROR {exc}", file=sys.stderr)
            status = 2
            continue
        print(f"OK {path}: {cfg.summary()}")
        if cfg.execution.cluster.kind in ("slurm", "pbs"):
            from alflow.cluster import describe, job_scripts

            print(f"  cluster: {describe(cfg.execution.cluster)}")
            if getattr(args, "job_script", False):
                try:
                    scripts = job_scripts(cfg.execution.cluster)
                except AlflowError as exc:
                    print(f"ERROR {path}: {exc}", file=sys.stderr)
                    status = 2
                    continue
                for pool, script in scripts.items():
                    print(f"# --- job script of pool {pool} (scheduler address filled in at run time) ---\n{script}")
        if args.resolved:
            print(config_to_yaml(cfg))
    return status
