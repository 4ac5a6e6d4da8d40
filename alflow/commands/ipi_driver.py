"""``alflow ipi-driver``: serve a potential or committee to a running i-PI server."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model or committee file (potentials.save)")
    parser.add_argument("--structure", required=True,
                        help="the structure i-PI starts from (any ASE/pymatgen format): gives species and atom order")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="NAME", help="i-PI unix socket address NAME (socket file PREFIX+NAME)")
    where.add_argument("--host", help="i-PI host for an inet socket (with --port)")
    parser.add_argument("--port", type=int, help="i-PI inet port")
    parser.add_argument("--prefix", default="/tmp/ipi_", help="unix socket prefix, as i-PI's -S (default /tmp/ipi_)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server socket")


def run(args: argparse.Namespace) -> int:
    from alflow.explore.ipi_driver import run_driver

    if args.host and args.port is None:
        print("alflow ipi-driver: --port is required with --host", file=sys.stderr)
        return 2
    try:
        return run_driver(args.model, args.structure, unix=args.unix, host=args.host or "localhost", port=args.port,
                          prefix=args.prefix, device=args.device, timeout=args.timeout)
    except (FileNotFoundError, TimeoutError, ValueError) as exc:
        print(f"alflow ipi-driver: {exc}", file=sys.stderr)
        return 2
