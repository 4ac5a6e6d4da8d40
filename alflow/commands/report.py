"""``alflow report RUN_DIR``: write report.md and report.html (with plots) for a run directory.

Works on finished and unfinished runs; see ``alflow.report``.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (holds state.json)")


def run(args: argparse.Namespace) -> int:
    from alflow.cli import writing
    from alflow.report import write_report

    try:
        with writing(args.run_dir):  # a full disk names the run directory
            html = write_report(args.run_dir)
    except FileNotFoundError as err:
        print(f"alflow report: {err}", file=sys.stderr)
        return 2
    print(f"wrote {html} and {html.with_suffix('.md')} (figures in {html.parent / 'report'})")
    return 0
