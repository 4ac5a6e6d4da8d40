"""The ``alflow`` command: a thin dispatcher over ``alflow.commands.*``.

Each subcommand is a module in ``alflow/commands`` with ``add_arguments(parser)``
and ``run(args) -> int``. Modules are imported only when their command runs, so
``alflow --help`` stays fast. To add a command, add one row to ``COMMANDS``.

Errors are caught once, here: an ``AlflowError`` prints its message (which names the thing)
and exits with its ``exit_code`` (2 bad input, 1 a failure at run time); an ``OSError`` (a
missing directory, a full disk, permissions) prints ``PATH: reason`` and exits 2. Neither
prints a traceback; anything else is a bug and does. ``writing(path)`` lends a file name to
the kernel's errors that carry none (a write on a full disk).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator, Sequence

from alflow.errors import AlflowError

# name -> (module under alflow.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("validate", "check a run configuration (YAML) and report every error with its field path"),
    "schema": ("schema", "print the JSON schema of the run configuration (for editors)"),
    "data": ("data", "inspect and import labelled datasets (summary, import, export, split, e0)"),
    "label": ("label", "label frames with an oracle (a built-in code, listed by `alflow label --help`, or any ASE calculator)"),
    "select": ("select", "choose frames to label from scored trajectories"),
    "train": ("train", "train a committee of potentials on a labelled dataset"),
    "md": ("md", "run MD walkers (ASE or i-PI) with a committee and score every frame"),
    "ipi-driver": ("ipi_driver", "serve a potential or committee to an i-PI server over a socket"),
    "run": ("run", "run the active-learning loop from a config (Prefect flow; resumes where it stopped)"),
    "deploy": ("deploy", "deploy the loop to a Prefect server's work pool (or --serve it) to run from there"),
    "report": ("report", "write the HTML/Markdown report with plots for a run directory"),
}


def build_parser() -> argparse.ArgumentParser:
    from alflow import __version__

    parser = argparse.ArgumentParser(
        prog="alflow",
        description="Active learning of machine-learned interatomic potentials for periodic materials.",
    )
    parser.add_argument("--version", action="version", version=f"alflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        args = parser.parse_args(argv)  # prints help / errors for unknown commands
        parser.print_help()
        return 0 if not argv else 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(f"alflow.commands.{module_name}")
    sub = argparse.ArgumentParser(prog=f"alflow {name}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except AlflowError as err:  # every error a user can fix: its message, no traceback
        print(f"alflow {name}: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # a file that cannot be read or written (missing directory, full disk, permissions)
        print(f"alflow {name}: error: {os_error_message(err)}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Inside the block, an OSError that names no file (a write on a full disk) names ``path``."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:  # a kernel error without a file; not our own messages
            raise type(err)(err.errno, err.strerror or str(err), str(path)) from err
        raise


def os_error_message(err: OSError) -> str:
    """``PATH: reason`` for an OSError (the file it names; a full disk says so and what to do)."""
    import errno

    if err.errno is None:  # raised with a message of its own, which names the file
        return str(err)
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (the disk or quota is full: free space there, or write elsewhere)"
    elif err.errno == errno.EFBIG:
        reason += " (the file size limit was reached: ulimit -f, or the file system's limit)"
    where = [str(f) for f in (err.filename, err.filename2) if f is not None]
    return f"{' -> '.join(where)}: {reason}" if where else f"{type(err).__name__}: {reason}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
