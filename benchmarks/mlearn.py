"""The mlearn DFT benchmark (Zuo et al., J. Phys. Chem. A 124, 731 (2020)): train a committee per element.

    python benchmarks/mlearn.py [--elements Si Ge Mo Li] [--members 4] [--epochs N] [--max-time S]
                                [--arch painn] [--device auto] [--out benchmarks/.cache/mlearn]
                                [--data-dir ../shared/data/mlearn] [--threads 1] [--json FILE]

For each element: the run configuration ``examples/mlearn/<El>.yaml`` (the recipe chosen for
it, docs/training.md) with the command line's overrides (``--epochs`` → training.epochs, with training.final_epochs scaled to keep its share,
``--max-time`` → a wall cap for the whole committee: training.max_time_s = S / members, which
the trainer gives K times to members trained together; ``--members`` → committee.size,
``--arch``/``--hparams`` → potential; ``--members-mode`` → training.members; ``--training JSON`` → any
training field, e.g. the recipe before issue 13 for a comparison) and
``system.initial_dataset`` = ``<data-dir>/<El>_train.extxyz`` is written to
``<out>/<El>/config.yaml``, and ``alflow train <out>/<El>/config.yaml --out <out>/<El>`` trains
on it: the committee is saved as ``<out>/<El>/committee.pt``, the metrics as
``<out>/<El>/metrics.json``; rerunning that command reproduces the run. The validation split is
the trainer's own (``training.valid_fraction`` of the training file, by ``seed``); the test sets of
the benchmark are held out by the project's owners and never read here.

Printed per element: validation energy MAE (meV/atom) and force MAE (eV/Å) of the committee mean
and the range over members, epochs per member, training seconds, device and members mode.
Published test errors of the best of GAP and MTP, the targets (meV/atom / eV/Å): Si 2.2 / 0.06,
Ge 1.8 / 0.05, Mo 2.2 / 0.09, Li 0.49 / 0.01 (validation errors are only a proxy for them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's packages, whatever the install state

import torch  # noqa: E402
import yaml  # noqa: E402

ELEMENTS = ("Si", "Ge", "Mo", "Li")
TARGETS = {"Si": (2.2, 0.06), "Ge": (1.8, 0.05), "Mo": (2.2, 0.09), "Li": (0.49, 0.01)}  # meV/atom, eV/Å
EXAMPLES = ROOT / "examples" / "mlearn"


def element_config(element: str, args: argparse.Namespace, data: Path, out: Path) -> dict:
    """``examples/mlearn/<El>.yaml`` with the command line's overrides, as a dict."""
    cfg = yaml.safe_load((EXAMPLES / f"{element}.yaml").read_text())
    cfg["run_dir"] = str(out.resolve())
    cfg.setdefault("system", {})["initial_dataset"] = str(data.resolve())
    training = cfg.setdefault("training", {})
    if args.epochs is not None:  # the final stage keeps its share of the budget
        full = training.get("epochs", 200)
        if training.get("final_epochs"):
            training["final_epochs"] = max(1, round(training["final_epochs"] * args.epochs / full))
        training["epochs"] = args.epochs
    if args.max_time is not None:
        training["max_time_s"] = args.max_time / (args.members or cfg.get("committee", {}).get("size", 4))
    if args.members_mode is not None:
        training["members"] = args.members_mode
    if args.training:
        training.update(json.loads(args.training))
    if args.members is not None:
        cfg.setdefault("committee", {})["size"] = args.members
    if args.arch is not None:
        cfg.setdefault("potential", {})["architecture"] = args.arch
        cfg["potential"]["hparams"] = json.loads(args.hparams) if args.hparams else {}
    if args.device is not None:
        cfg.setdefault("execution", {})["device"] = args.device
    return cfg


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elements", nargs="+", default=list(ELEMENTS), choices=list(ELEMENTS))
    p.add_argument("--members", type=int, default=None, help="committee size (default: the example's, 4)")
    p.add_argument("--epochs", type=int, default=None, help="epoch budget (default: the example's)")
    p.add_argument("--max-time", type=float, default=None, help="wall-time cap per committee (s)")
    p.add_argument("--arch", default=None, help="architecture instead of the example's (with --hparams JSON)")
    p.add_argument("--hparams", default=None, help='hyperparameters for --arch, JSON, e.g. \'{"n_atom_basis": 64}\'')
    p.add_argument("--members-mode", choices=("auto", "grouped", "sequential"), default=None)
    p.add_argument("--training", default=None,
                   help='overrides of the training section, JSON, e.g. \'{"schedule": "plateau", "final_epochs": 0}\'')
    p.add_argument("--device", default=None, help="auto, cpu, cuda (default: the example's execution.device)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / ".cache" / "mlearn"))
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mlearn"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the table to this JSON file")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from alflow.cli import main as alflow_main

    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"# {stamp}  {platform.processor() or platform.machine()}  torch {torch.__version__}  threads {args.threads}")
    rows = []
    for element in args.elements:
        data = Path(args.data_dir) / f"{element}_train.extxyz"
        if not data.is_file():
            print(f"{element}: {data} not found (see ../shared/data/mlearn/README.md)", file=sys.stderr)
            return 2
        out = Path(args.out) / element
        out.mkdir(parents=True, exist_ok=True)
        cfg = element_config(element, args, data, out)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        command = ["train", str(out / "config.yaml"), "--out", str(out)] + ([] if args.progress else ["--quiet"])
        print(f"\n## {element}: alflow {' '.join(command)}", flush=True)
        t = time.perf_counter()
        code = alflow_main(command)
        seconds = time.perf_counter() - t
        if code != 0:
            print(f"{element}: alflow train exited {code}", file=sys.stderr)
            return code
        metrics = json.loads((out / "metrics.json").read_text())
        valid = metrics["metrics"]["valid"]
        members = [m["metrics"]["valid"] for m in metrics["members"]]
        row = {"element": element, "architecture": cfg["potential"]["architecture"],
               "members": len(metrics["members"]), "n_train": len(metrics["train_idx"]),
               "n_valid": len(metrics["valid_idx"]), "energy_mae_meV": 1e3 * valid["energy_mae"],
               "forces_mae": valid["forces_mae"],
               "member_energy_mae_meV": [1e3 * m["energy_mae"] for m in members],
               "member_forces_mae": [m["forces_mae"] for m in members],
               "epochs": [m["epochs"] for m in metrics["members"]], "train_seconds": metrics["seconds"],
               "seconds": seconds, "device": metrics.get("extra", {}).get("device"),
               "members_mode": metrics.get("extra", {}).get("members_mode"), "target": TARGETS[element]}
        rows.append(row)
    print(f"\n{'El':<3} {'arch':<8} {'K':>2} {'train/valid':>11} {'E MAE meV/atom':>15} {'(members)':>13} "
          f"{'F MAE eV/Å':>11} {'(members)':>15} {'epochs':>9} {'train s':>8} {'device':>7} {'mode':<10} target")
    for r in rows:
        e_lo, e_hi = min(r["member_energy_mae_meV"]), max(r["member_energy_mae_meV"])
        f_lo, f_hi = min(r["member_forces_mae"]), max(r["member_forces_mae"])
        ep = f"{min(r['epochs'])}-{max(r['epochs'])}" if min(r["epochs"]) != max(r["epochs"]) else str(r["epochs"][0])
        print(f"{r['element']:<3} {r['architecture']:<8} {r['members']:>2} {r['n_train']:>5}/{r['n_valid']:<5} "
              f"{r['energy_mae_meV']:>15.2f} {e_lo:>6.2f}-{e_hi:<6.2f} {r['forces_mae']:>11.4f} "
              f"{f_lo:>7.4f}-{f_hi:<7.4f} {ep:>9} {r['train_seconds']:>8.1f} {str(r['device']):>7} "
              f"{str(r['members_mode']):<10} {r['target'][0]} / {r['target'][1]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": stamp, "args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
