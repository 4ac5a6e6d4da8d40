"""``alflow train CONFIG [--data PATH] [--out DIR] [--device ...]``: train a committee on a labelled dataset.

Reads the run configuration (``potential``, ``committee``, ``training``, ``seed``,
``execution.device``), the dataset (a dataset directory or any labelled file
``alflow.io.read_frames`` reads; default ``system.initial_dataset``), builds the
committee (``potentials.committee.Committee.build``; ``potential.checkpoint`` warm-starts
it), trains every member (``alflow.train.train_committee``), calibrates α on the validation
frames when ``committee.calibrate`` (``alflow.committee.calibrate_if_enough``) and writes
``OUT/committee.pt``, ``OUT/metrics.json`` and ``OUT/member_<k>/{best.pt,metrics.json}``
(OUT default: ``<run_dir>/train``). Prints a table of errors per member and for the
committee mean. Bad input prints one line to stderr and exits 2; divergence exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML run configuration")
    parser.add_argument("--data", default=None, help="dataset directory or labelled file (default: system.initial_dataset)")
    parser.add_argument("--out", default=None, help="output directory (default: <run_dir>/train)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, ... (default: execution.device)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _frames(path: Path) -> list[Any]:
    from alflow.data import Dataset, read_frames

    if path.is_dir():
        return Dataset(path, create=False).frames()
    return read_frames(path)


def _fmt(value: float | None, factor: float = 1.0, spec: str = ".4f") -> str:
    return "-" if value is None else format(value * factor, spec)


def summary_table(result: Any) -> str:
    """Per member and committee mean: epochs, time, valid/test energy MAE (meV/atom) and force RMSE (eV/Å)."""
    head = f"{'model':<10} {'epochs':>6} {'best':>5} {'time s':>7} {'stop':<10} " \
           f"{'valid E MAE':>11} {'valid F RMSE':>12} {'test E MAE':>10} {'test F RMSE':>11}"
    units = f"{'':<10} {'':>6} {'':>5} {'':>7} {'':<10} {'meV/atom':>11} {'eV/Å':>12} {'meV/atom':>10} {'eV/Å':>11}"
    rows = [head, units]

    def row(name: str, metrics: dict[str, Any], epochs: str, best: str, seconds: float, stop: str) -> str:
        v, t = metrics.get("valid", {}), metrics.get("test", {})
        return (f"{name:<10} {epochs:>6} {best:>5} {seconds:>7.1f} {stop:<10} {_fmt(v.get('energy_mae'), 1e3, '.2f'):>11} "
                f"{_fmt(v.get('forces_rmse')):>12} {_fmt(t.get('energy_mae'), 1e3, '.2f'):>10} {_fmt(t.get('forces_rmse')):>11}")

    for k, m in enumerate(result.members):
        rows.append(row(f"member {k}", m.metrics, str(m.epochs), str(m.best_epoch), m.seconds, m.stop_reason))
    rows.append(row("committee", result.metrics, "", "", result.seconds, ""))
    return "\n".join(rows)


def _run(args: argparse.Namespace) -> int:
    import torch
    from ase.data import atomic_numbers
    from ase.symbols import string2symbols

    import potentials
    from alflow.config import load_config
    from alflow.train import train_committee
    from potentials.committee import Committee

    from alflow.devices import resolve_device

    cfg = load_config(args.config)
    resolve_device(args.device or cfg.execution.device, what="--device" if args.device else "execution.device")
    if pot_checkpoint := cfg.potential.checkpoint:
        if not Path(pot_checkpoint).is_file():
            raise FileNotFoundError(2, "no such model file (potential.checkpoint)", pot_checkpoint)
    data = args.data or cfg.system.initial_dataset
    if data is None:
        raise ValueError("no dataset: give --data PATH or set system.initial_dataset in the configuration")
    frames = _frames(Path(data))
    species = {int(z) for a in frames for z in a.numbers}
    if cfg.system.build is not None:
        species |= {atomic_numbers[s] for s in string2symbols(cfg.system.build.element)}
    if not species:
        raise ValueError(f"{data}: no frames")
    pot = cfg.potential
    committee = Committee.build(pot.architecture, cfg.committee.size, sorted(species), pot.cutoff, seed=cfg.seed,
                                **pot.hparams)
    committee.to(getattr(torch, pot.dtype))
    init_from = potentials.load(pot.checkpoint, device="cpu") if pot.checkpoint else None
    out = Path(args.out) if args.out else Path(cfg.run_dir) / "train"
    if out.exists() and not out.is_dir():
        raise FileExistsError(17, "exists and is not a directory (--out)", str(out))
    device = args.device or cfg.execution.device
    print(f"training {cfg.committee.size} x {pot.architecture} on {len(frames)} frame(s) from {data} "
          f"(device {device}, {pot.dtype}{', bootstrap' if cfg.committee.bootstrap else ''}"
          f"{', warm start from ' + str(pot.checkpoint) if init_from is not None else ''})")
    from alflow.cli import writing

    with writing(out):  # a write on a full disk names the output directory
        result = train_committee(committee, frames, cfg.training, bootstrap=cfg.committee.bootstrap, device=device,
                                 seed=cfg.seed, out_dir=out, progress=not args.quiet, init_from=init_from)
        print(summary_table(result))
        extra = result.extra or {}
        print(f"members trained {extra.get('members_mode', 'sequential')} on {extra.get('device', device)}, "
              f"{extra.get('epochs', sum(m.epochs for m in result.members))} epochs in all, {result.seconds:.1f} s")
        print(f"split: {len(result.train_idx)} train / {len(result.valid_idx)} valid / {len(result.test_idx)} test")
        if cfg.committee.calibrate:
            from alflow.committee import calibrate_if_enough

            committee.eval()
            alpha, note = calibrate_if_enough(committee, [frames[k] for k in result.valid_idx],
                                              cfg.committee.calibration_min_frames)
            potentials.save(committee, out / "committee.pt")
            print(note or f"calibration: alpha = {alpha:.3g} on {len(result.valid_idx)} validation frame(s), stored")
        print(f"wrote {result.checkpoint} and {result.metrics_path}")
    return 0


def run(args: argparse.Namespace) -> int:
    from alflow.config import ConfigError
    from alflow.train import TrainingDivergedError, TrainingError

    try:
        return _run(args)
    except TrainingDivergedError as err:
        print(f"alflow train: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a missing file or directory, a full disk: the file and the reason
        from alflow.cli import os_error_message

        print(f"alflow train: {os_error_message(err)}", file=sys.stderr)
        return 2
    except (ConfigError, ValueError, TrainingError) as err:  # DatasetError/UnknownElementError are ValueErrors
        print(f"alflow train: {err}", file=sys.stderr)
        return 2
