"""``alflow md CONFIG --model PATH``: run the configured walkers and score every frame."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alflow.ensembles import ENGINES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run configuration (YAML)")
    parser.add_argument("--model", required=True, help="potential or committee file (potentials.save)")
    parser.add_argument("--out", help="output directory (default: <run_dir>/md)")
    parser.add_argument("--engine", choices=ENGINES, help="override exploration.engine")
    parser.add_argument("--device", help="auto, cpu or cuda (default: execution.device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from alflow.config import ConfigError, load_config
    from alflow.explore.runner import explore

    try:
        config = load_config(args.config)
        if args.engine:
            config.exploration.engine = args.engine
    except (ConfigError, FileNotFoundError) as exc:
        print(f"alflow md: {exc}", file=sys.stderr)
        return 2
    from alflow.devices import resolve_device

    resolve_device(args.device or config.execution.device, what="--device" if args.device else "execution.device")
    if not Path(args.model).is_file():
        raise FileNotFoundError(2, "no such model file (--model)", args.model)
    out = Path(args.out) if args.out else Path(config.run_dir) / "md"
    if out.exists() and not out.is_dir():
        raise FileExistsError(17, "exists and is not a directory (--out)", str(out))
    from alflow.process import sigterm_exits

    with sigterm_exits():  # SIGTERM stops i-PI, the driver and the workers on the way out (SIGKILL: they die too)
        results = explore(config, args.model, out, device=args.device, progress=not args.no_progress)
    width = max(len(r["name"]) for r in results)
    for r in results:
        print(f"{r['name']:<{width}}  {r['status']:<9} steps={r['steps']:<6} frames={r['frames']:<5} -> {r['trajectory']}")
    return 0 if all(r["status"] in ("DONE", "UNCERTAIN", "EXPLODED") for r in results) else 1
