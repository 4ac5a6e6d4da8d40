"""``alflow ipi-driver``: serve a potential or committee to one or more running i-PI servers."""

from __future__ import annotations

import argparse
import math
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model or committee file (potentials.save)")
    parser.add_argument("--structure", required=True, action="append",
                        help="the structure i-PI starts from (any ASE/pymatgen format): gives species and atom order; "
                             "once for all servers or once per --unix")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="NAME", action="append",
                       help="i-PI unix socket address NAME (socket file PREFIX+NAME); repeat to serve several "
                            "servers from this one process, their requests evaluated in one committee call")
    where.add_argument("--host", help="i-PI host for an inet socket (with --port)")
    parser.add_argument("--port", type=int, help="i-PI inet port")
    parser.add_argument("--prefix", default="/tmp/ipi_", help="unix socket prefix, as i-PI's -S (default /tmp/ipi_)")
    parser.add_argument("--connections", type=int, action="append", default=None,
                        help="connections per server (default 1; the bead count for path integrals, so that all "
                             "beads are evaluated together); once for all or once per --unix")
    parser.add_argument("--run-dir", action="append", default=None,
                        help="the walker's run directory, where stop.json/stop.extxyz and i-PI's EXIT file go when "
                             "a stop rule fires; once for all or once per --unix")
    parser.add_argument("--spread-stride", type=int, action="append", default=None,
                        help="MD steps between the steps whose committee extras i-PI records (its trajectories' "
                             "stride): the members' forces are sent, and a shallow committee's heads' spread "
                             "computed, only there (default 1: every step); once for all or once per --unix")
    parser.add_argument("--upper", type=float, default=math.inf,
                        help="stop a walker UNCERTAIN after --patience steps above this max force deviation (eV/Å)")
    parser.add_argument("--patience", type=int, default=20, help="consecutive steps above --upper (default 20)")
    parser.add_argument("--min-distance", type=float, default=0.0,
                        help="stop a walker EXPLODED when two atoms come closer than this (Å)")
    parser.add_argument("--gather", type=float, default=0.05,
                        help="seconds a held request waits for the other servers' before the batch is evaluated")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server socket")
    parser.add_argument("--read-timeout", type=float, default=300.0,
                        help="seconds a connected server may stay silent (i-PI asks every step) before the driver "
                             "gives up on it and exits 1 (default 300; 0 waits forever)")


def run(args: argparse.Namespace) -> int:
    from alflow.explore.ipi_driver import StopRules, run_driver

    if args.host and args.port is None:
        print("alflow ipi-driver: --port is required with --host", file=sys.stderr)
        return 2
    if args.patience < 1 or not args.gather >= 0:
        print("alflow ipi-driver: --patience must be >= 1 and --gather >= 0", file=sys.stderr)
        return 2
    if not 0 <= args.read_timeout < math.inf:
        print(f"alflow ipi-driver: --read-timeout: expected seconds >= 0 (0 waits forever), got {args.read_timeout}",
              file=sys.stderr)
        return 2
    rules = StopRules(upper=args.upper, patience=args.patience, min_distance=args.min_distance)
    try:
        from alflow.devices import resolve_device

        resolve_device(args.device, what="--device")  # before the model is read
        return run_driver(args.model, args.structure, unix=args.unix, host=args.host or "localhost", port=args.port,
                          prefix=args.prefix, device=args.device, timeout=args.timeout,
                          connections=args.connections or 1, run_dir=args.run_dir, rules=rules, gather_s=args.gather,
                          read_timeout=args.read_timeout or None, spread_stride=args.spread_stride or 1)
    except (FileNotFoundError, TimeoutError, ValueError) as exc:
        print(f"alflow ipi-driver: {exc}", file=sys.stderr)
        return 2
