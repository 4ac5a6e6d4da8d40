"""``alflow select``: choose the frames to label from scored trajectories (one extxyz per walker).

    alflow select traj/walker-*.extxyz --dataset data/ --out selected.extxyz --lower 0.05 --upper 0.5

Thresholds come from ``--config run.yaml`` (its ``selection`` section) and are
overridden by the options. Writes the selected frames (``info[selection_reason]``),
optionally the rejected frames (``info[rejection_reason]``) and the summary as JSON,
and prints the summary. Bad input prints one line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OVERRIDES = {
    "lower": float, "upper": float, "energy_lower": float, "energy_upper": float, "adaptive_fraction": float,
    "max_per_iteration": int, "max_per_walker": int, "min_stride": int, "min_interatomic_distance": float,
    "max_force": float, "covalent_fraction": float, "dataset_distance": float,
}


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a seed, a budget)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trajectories", nargs="+", help="scored extxyz trajectories, one per walker")
    parser.add_argument("--out", required=True, help="extxyz file for the selected frames")
    parser.add_argument("--dataset", default=None, help="current dataset directory (skips known/near frames)")
    parser.add_argument("--config", default=None, help="run configuration YAML: use its selection section")
    parser.add_argument("--rejected", default=None, help="extxyz file for frames rejected by the filters")
    parser.add_argument("--summary", default=None, help="JSON file for the summary")
    parser.add_argument("--strategy", choices=("committee", "random"), default=None)
    parser.add_argument("--diversity", choices=("fps", "none"), default=None)
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random strategy (>= 0)")
    parser.add_argument("--budget", type=non_negative_int, default=None,
                        help="frames to select (>= 0; default max_per_iteration)")
    for name, typ in OVERRIDES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None)


def check_output_file(path: str, option: str) -> None:
    """An output file ``path`` can be created: its directory exists and it is not a directory itself."""
    from alflow.errors import FileMissingError, InputError

    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise FileMissingError(f"{option} {path}: directory {parent} does not exist (create it first)")
    if target.is_dir():
        raise InputError(f"{option} {path}: is a directory; expected a file name")


def _format(summary: dict) -> str:
    head = (f"{summary['n_frames']} frame(s): {summary['n_accurate']} accurate, {summary['n_candidate']} candidate, "
            f"{summary['n_failed']} failed; {summary['n_filtered']} filtered, {summary['n_near_dataset']} near dataset, "
            f"{summary['n_duplicate']} already in dataset; selected {summary['n_selected']} "
            f"(strategy {summary['strategy']}{', adaptive' if summary['adaptive'] else ''})")
    lines = [head, f"{'walker':<16} {'accurate':>8} {'candidate':>9} {'failed':>6} {'filtered':>8} {'selected':>8}"]
    for w, c in summary["per_walker"].items():
        lines.append(f"{w:<16} {c['accurate']:>8} {c['candidate']:>9} {c['failed']:>6} {c['filtered']:>8} {c['selected']:>8}")
    if summary["rejections"]:
        lines.append("rejections: " + ", ".join(f"{k} {v}" for k, v in summary["rejections"].items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from alflow.config import ConfigError, SelectionConfig, load_config
    from alflow.data import Dataset
    from alflow.io import write_extxyz_atomic
    from alflow.select import load_scored, select_frames

    try:
        for option in ("out", "rejected", "summary"):  # before any work: where the results go must exist
            if (value := getattr(args, option)) is not None:
                check_output_file(value, f"--{option}")
        base = load_config(args.config).selection.model_dump() if args.config else {}
        for name in (*OVERRIDES, "strategy", "diversity"):
            if getattr(args, name) is not None:
                base[name] = getattr(args, name)
        cfg = SelectionConfig(**base)
        trajectories = {Path(p).stem: t for p, t in zip(args.trajectories, load_scored(args.trajectories))}
        dataset = Dataset(args.dataset, create=False) if args.dataset else None
        sel = select_frames(trajectories, cfg, dataset, seed=args.seed, budget=args.budget)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                             for e in err.errors(include_url=False))
        print(f"alflow select: {problems}", file=sys.stderr)
        return 2
    except (ValueError, ConfigError) as err:
        print(f"alflow select: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    except OSError as err:  # a missing trajectory or dataset: the file and the reason
        from alflow.cli import os_error_message

        print(f"alflow select: {os_error_message(err)}", file=sys.stderr)
        return 2
    from alflow.cli import writing

    with writing(args.out):
        write_extxyz_atomic(sel.frames, args.out)
    if args.rejected:
        with writing(args.rejected):
            write_extxyz_atomic(sel.rejected, args.rejected)
    if args.summary:
        with writing(args.summary):
            Path(args.summary).write_text(json.dumps(sel.summary, indent=1))
    print(_format(sel.summary))
    print(f"wrote {len(sel.frames)} frame(s) to {args.out}")
    return 0
