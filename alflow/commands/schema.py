"""``alflow schema [--output FILE]``: the JSON schema of the run configuration (for editor completion)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from alflow.config import json_schema


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", metavar="FILE", help="write the schema to FILE instead of standard output")


def run(args: argparse.Namespace) -> int:
    from alflow.cli import writing

    text = json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
    if args.output:
        with writing(args.output):  # a missing directory is created; a full disk names the file
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0
