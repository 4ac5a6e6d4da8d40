"""``alflow label``: label frames with an oracle and append them to a dataset, restartably.

    alflow label selected.extxyz --oracle gpaw --param mode.ecut=400 --kpoint-density 3.5 --dataset data/

Rerunning the same command after a kill continues where it stopped (frames in
the dataset, or finally failed with the same oracle settings, are skipped and
counted; ``--retry-failed`` tries the failed ones again). Failures go to
``WORKDIR/failures.jsonl``. Exit status 0 when every frame given is in the
dataset afterwards, 1 otherwise (failed now, failed before with the same
settings, or a structure the dataset refuses), 2 for bad input or an oracle
that cannot be built; 1 at once, changing nothing, when another process labels
into the same dataset (its pid is named). ``--config run.yaml`` takes the ``labelling``
section of a run configuration; command-line options override it.
Bad input prints one line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from alflow.oracles import BUILTIN


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("frames", nargs="+", help="structure files (extxyz, ...) with the frames to label")
    parser.add_argument("--dataset", required=True, help="dataset directory (created if absent)")
    parser.add_argument("--oracle", default=None, help=f"{', '.join(BUILTIN)} or module:Class")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="oracle parameter (YAML value; dotted keys nest: mode.ecut=400); repeatable")
    parser.add_argument("--fallback", action="append", default=[], metavar="YAML",
                        help="parameter overrides for a retry, e.g. '{mixing_beta: 0.1}'; repeatable (in order)")
    parser.add_argument("--config", default=None, help="run configuration YAML: use its labelling section")
    parser.add_argument("--kpoint-density", type=float, default=None, help="k-points per Å⁻¹ (Γ-centred grid)")
    parser.add_argument("--timeout", type=float, default=None, help="wall-clock limit per calculation (s)")
    parser.add_argument("--threads", type=int, default=None, help="OMP threads per calculation")
    parser.add_argument("--retries", type=int, default=None, help="retries of a failed calculation")
    parser.add_argument("--max-force-warning", type=float, default=None, metavar="EV_PER_A",
                        help="warn about labels with a force above this (eV/Å; default 50)")
    parser.add_argument("--workers", type=int, default=1, help="calculations at once (default 1)")
    parser.add_argument("--workdir", default=None, help="scratch + failures.jsonl (default DATASET/labelling)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="try frames again that finally failed with the same oracle settings")
    parser.add_argument("--keep-scratch", action="store_true", help="keep scratch dirs of successful calculations")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["a=1", "mode.ecut=400", "xc=PBE"]`` -> ``{"a": 1, "mode": {"ecut": 400}, "xc": "PBE"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {item!r}: expected KEY=VALUE")
        value = yaml.safe_load(text) if text else ""
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--param {item!r}: {part!r} is already set to a non-mapping value")
        node[parts[-1]] = value
    return out


def _config(args: argparse.Namespace):
    from alflow.config import LabellingConfig, load_config
    from alflow.oracles import deep_merge

    base = load_config(args.config).labelling.model_dump() if args.config else {}
    if args.oracle is not None:
        if base.get("oracle") not in (None, args.oracle):
            base["parameters"] = {}
        base["oracle"] = args.oracle
    base["parameters"] = deep_merge(base.get("parameters", {}), parse_params(args.param))
    if args.fallback:
        fallbacks = [yaml.safe_load(f) for f in args.fallback]
        if not all(isinstance(f, dict) for f in fallbacks):
            raise ValueError("--fallback: expected YAML mappings such as '{mixing_beta: 0.1}'")
        base["fallback_parameters"] = fallbacks
    for key, value in (("kpoint_density", args.kpoint_density), ("timeout_s", args.timeout),
                       ("threads", args.threads), ("retries", args.retries),
                       ("max_force_warning", args.max_force_warning)):
        if value is not None:
            base[key] = value
    return LabellingConfig(**base)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from alflow.config import ConfigError
    from alflow.data import Dataset, DatasetError
    from alflow.io import read_frames
    from alflow.label import label_frames

    try:
        cfg = _config(args)
        frames = []
        for f in args.frames:
            frames += read_frames(f)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                             for e in err.errors(include_url=False))
        print(f"alflow label: {problems}", file=sys.stderr)
        return 2
    except (ValueError, ConfigError, FileNotFoundError, DatasetError) as err:
        print(f"alflow label: {err}", file=sys.stderr)
        return 2
    from alflow.oracles import OracleError, missing_requirement

    if problem := missing_requirement(cfg.oracle, cfg.parameters):  # before any worker starts
        raise OracleError(f"labelling.oracle: {problem}")
    ds = Dataset(args.dataset)
    workdir = Path(args.workdir) if args.workdir else ds.path / "labelling"
    print(f"labelling {len(frames)} frame(s) with {cfg.oracle} -> {ds.path} (work: {workdir})", file=sys.stderr)
    res = label_frames(frames, cfg, ds, workdir, progress=not args.no_progress, max_workers=args.workers,
                       retry_failed=args.retry_failed, keep_scratch=args.keep_scratch)
    print(f"labelled {res.n_labelled}, failed {res.n_failed}, already in the dataset {res.n_in_dataset}, "
          f"skipped {res.n_failed_before + len(res.rejected)} of {res.n_frames} frame(s) in {res.elapsed_s:.1f} s; "
          f"dataset has {len(ds)} frame(s)")
    if res.n_failed_before:
        print(f"skipped {res.n_failed_before}: failed before with the same oracle settings (see {res.failures}); "
              f"use --retry-failed to try them again, or change the oracle settings")
    if res.rejected:
        print(f"skipped {len(res.rejected)}: structure a dataset cannot hold, never sent to the oracle:")
        for _h, reason in res.rejected:
            print(f"  {reason}")
    if res.n_failed:
        print(f"failure records: {res.failures}")
    if res.high_force:
        print(f"warning: {len(res.high_force)} label(s) with max |F| above {cfg.max_force_warning:g} eV/Å "
              f"(overlapping atoms?): " + ", ".join(f"{h[:12]} ({f:.1f} eV/Å)" for h, f in res.high_force)
              + f"; remove with `alflow data remove {ds.path} --hash HASH`", file=sys.stderr)
    return 0 if res.complete else 1  # 1: some frame given is not in the dataset (failed now, before, or rejected)
