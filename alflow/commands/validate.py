"""``alflow validate CONFIG...``: check run configurations and report every error with its field path."""

from __future__ import annotations

import argparse
import sys

from alflow.config import ConfigError, config_to_yaml, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML run configuration file(s)")
    parser.add_argument("--resolved", action="store_true",
                        help="also print each valid configuration with all defaults filled in and paths resolved")


def run(args: argparse.Namespace) -> int:
    """Print ``OK <path>: <summary>`` per valid file, the error list otherwise; 1 if any file is invalid."""
    status = 0
    for path in args.configs:
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            print(f"ERROR {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"OK {path}: {cfg.summary()}")
        if args.resolved:
            print(config_to_yaml(cfg))
    return status
