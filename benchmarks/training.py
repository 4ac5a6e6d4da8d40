"""Training accuracy and cost on the reference Cu/EMT dataset: SchNet and PaiNN committees, warm vs scratch.

    python benchmarks/training.py [--frames 500] [--members 4] [--archs schnet painn]
                                  [--max-time 120] [--threads 1] [--device cpu] [--no-warm]
    python benchmarks/training.py --speed [--speed-epochs 2] [--device cuda]   # old vs new trainer only
    python benchmarks/training.py --parity schnet painn mace ...               # grouped = sequential?

0. ``--speed`` (or ``--speed-too``): the trainer before issue 13 (``alflow/train.py`` at commit
   ``OLD_COMMIT``, read with ``git show``: members one after another, frames collated per step,
   a host read per step) against the new one (``alflow.train``: packed graphs gathered by index,
   sequential and grouped members, optionally an atom budget), committee of ``--members``
   SchNets (first ``MODELS`` entry), batch ``--batch-size``, ``--speed-epochs`` epochs each,
   no early stop; seconds per committee epoch (training + validation of every member) from the
   members' histories, interleaved old/new ``--repeats`` times (best of).

1. ``alflow.datasets.cu_emt_dataset(500, seed=0)`` (cached in benchmarks/.cache/),
   split 80/10/10 by seed 0 (train/valid/test, shared by every member).
2. Per architecture a committee of ``--members`` members trained one after another
   (``alflow.train.train_committee``; each member at most ``--max-time`` s); test
   force RMSE (eV/Å) and energy MAE (meV/atom) per member and for the committee mean.
   The issue's target: test force RMSE <= 0.05 eV/Å.
3. Warm start vs scratch (first architecture): a model trained on the training frames
   below the median MD temperature (the previous active-learning iteration, which has
   not seen the hot frames) warm-starts on all training frames; the
   time to reach the validation force RMSE of scratch member 0's best weights, against
   member 0's own time to reach it (both timed from the start of their training, per epoch).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's packages, whatever the install state

import numpy as np  # noqa: E402
import torch  # noqa: E402

from alflow.config import TrainingConfig  # noqa: E402
from alflow.datasets import cu_emt_dataset  # noqa: E402
from alflow.train import train_committee, train_potential  # noqa: E402
from potentials.committee import Committee  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
TARGET = 0.05  # eV/Å, test force RMSE
MODELS = {  # architecture -> (cutoff Å, hyperparameters, lr)
    "schnet": (4.0, dict(n_atom_basis=32, n_filters=32, n_interactions=3, n_rbf=16), 3e-3),
    "painn": (4.0, dict(n_atom_basis=32, n_interactions=3), 2e-3),
}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), platform.processor())
    except OSError:
        return platform.processor()


def first_time_below(history: tuple[dict, ...], threshold: float) -> float | None:
    """Seconds (from the start of training) of the first epoch whose validation force RMSE <= threshold."""
    return next((h["seconds"] for h in history if h["valid_forces_rmse"] <= threshold), None)


OLD_COMMIT = "6ff0ba3"  # alflow/train.py before issue 13


def old_trainer():
    """``alflow/train.py`` as of ``OLD_COMMIT``, imported as ``alflow._train_before_issue13``."""
    import importlib.util

    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:alflow/train.py"], capture_output=True,
                            text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("alflow._train_before_issue13", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    exec(compile(source, f"{OLD_COMMIT}:alflow/train.py", "exec"), module.__dict__)
    return module


def committee_epoch_seconds(result, grouped: bool) -> float:
    """Mean seconds per committee epoch (epochs >= 1: training + validation of every member) from the histories."""
    def per_epoch(history):
        s = [h["seconds"] for h in history]
        return [b - a for a, b in zip(s[:-1], s[1:])]

    if grouped:  # the members share one clock
        return float(np.mean(per_epoch(result.members[0].history)))
    return float(sum(np.mean(per_epoch(m.history)) for m in result.members))


def speed(args: argparse.Namespace, frames: list, report: dict) -> None:
    """Old trainer vs new trainer: seconds per committee epoch (see module doc, step 0)."""
    arch = args.archs[0]
    cutoff, hp, lr = MODELS[arch]
    old = old_trainer()
    base = dict(epochs=args.speed_epochs, batch_size=args.batch_size, lr=lr, patience=10**6, ema_decay=0.99,
                grad_clip=10.0, energy_weight=10.0, forces_weight=10.0, valid_fraction=0.1, test_fraction=0.1)
    runs = {"old (before issue 13)": (old.train_committee, {}),
            "new, sequential members": (train_committee, {"members": "sequential"}),
            "new, grouped members": (train_committee, {"members": "grouped"})}
    if args.batch_atoms:
        runs[f"new, grouped, batch_atoms {args.batch_atoms}"] = (train_committee, {"members": "grouped",
                                                                                   "batch_atoms": args.batch_atoms})
    best: dict[str, float] = {}
    print(f"\n## speed: committee of {args.members} {arch} ({hp}), batch {args.batch_size}, "
          f"{args.speed_epochs} epochs per run, device {args.device}, best of {args.repeats} interleaved rounds")
    for r in range(args.repeats):
        for name, (fn, extra) in runs.items():
            committee = Committee.build(arch, args.members, ["Cu"], cutoff, seed=0, **hp)
            result = fn(committee, frames, TrainingConfig(**base, **extra), device=args.device, seed=0, progress=False)
            grouped = (result.extra or {}).get("members_mode") == "grouped"
            sec = committee_epoch_seconds(result, grouped)
            best[name] = min(best.get(name, math.inf), sec)
            print(f"round {r}: {name:<36} {sec:8.2f} s per committee epoch  (valid F RMSE "
                  f"{result.metrics['valid']['forces_rmse']:.4f} eV/Å after {result.members[0].epochs} epochs)")
    ref = best["old (before issue 13)"]
    print(f"{'path':<36} {'s / committee epoch':>20} {'speed-up vs old':>16}")
    for name, sec in best.items():
        print(f"{name:<36} {sec:>20.2f} {ref / sec:>15.2f}x")
    report["speed"] = {"arch": arch, "hparams": hp, "batch_size": args.batch_size, "epochs": args.speed_epochs,
                       "repeats": args.repeats, "seconds_per_committee_epoch": best}


def parity(archs: list[str]) -> None:
    """Grouped vs sequential members per architecture (default hparams): 2 members, 12 four-atom Cu frames,
    float64, bootstrap, 2 epochs; the largest relative difference of the validation losses and the mode used."""
    import warnings

    import potentials

    frames = cu_emt_dataset(12, seed=1, sizes=(4,), frames_per_run=6, equilibration=10, sample_every=3)
    print(f"\n## grouped vs sequential members (float64): {', '.join(archs)}")
    for arch in archs:
        losses, modes = {}, {}
        for mode in ("sequential", "grouped"):
            models = []
            for seed in (1, 2):
                torch.manual_seed(seed)
                models.append(potentials.build(arch, species=["Cu"], cutoff=4.0))
            cfg = TrainingConfig(epochs=2, batch_size=3, lr=5e-3, ema_decay=0.9, valid_fraction=0.25, members=mode)
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = train_committee(models, frames, cfg, bootstrap=True, device="cpu", dtype="float64", seed=3,
                                    progress=False)
            losses[mode] = np.array([h["valid_loss"] for m in r.members for h in m.history])
            modes[mode] = (r.extra["members_mode"], time.perf_counter() - t)
        diff = float(np.max(np.abs(losses["grouped"] - losses["sequential"]) / np.abs(losses["sequential"])))
        print(f"{arch:<10} grouped ran as {modes['grouped'][0]:<10} max rel. diff {diff:.1e}   "
              f"s: sequential {modes['sequential'][1]:.1f}, grouped {modes['grouped'][1]:.1f}")


def config(args: argparse.Namespace, lr: float) -> TrainingConfig:
    return TrainingConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr, patience=args.patience,
                          ema_decay=0.99, grad_clip=10.0, energy_weight=10.0, forces_weight=10.0,
                          valid_fraction=0.1, test_fraction=0.1, max_time_s=args.max_time)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=500)
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--archs", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--max-time", type=float, default=120.0, help="wall-time budget per member (s)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-warm", action="store_true", help="skip the warm-start comparison")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--speed", action="store_true", help="only the old vs new trainer speed comparison")
    p.add_argument("--speed-too", action="store_true", help="the speed comparison, then the accuracy runs")
    p.add_argument("--speed-epochs", type=int, default=2, help="epochs per speed run")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds of the speed comparison (best of)")
    p.add_argument("--batch-atoms", type=int, default=None, help="also time grouped members with this atom budget")
    p.add_argument("--parity", nargs="+", default=None, metavar="ARCH",
                   help="only: grouped vs sequential members for these architectures (float64, tiny data)")
    args = p.parse_args()
    if args.parity:
        torch.set_num_threads(args.threads)
        parity(args.parity)
        return 0
    torch.set_num_threads(args.threads)
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # one-off import of torch._dynamo, outside the timings
    report: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
                    "threads": args.threads, "device": args.device, "torch": torch.__version__, "args": vars(args)}
    print(f"# {report['date']}  {report['cpu']}  torch {torch.__version__}  threads {args.threads}  device {args.device}")

    t = time.perf_counter()
    path = CACHE / f"cu_emt_{args.frames}_seed0.extxyz"
    cached = path.is_file()
    frames = cu_emt_dataset(args.frames, seed=0, path=path)
    report["dataset"] = {"frames": len(frames), "atoms": sum(len(a) for a in frames), "seconds": time.perf_counter() - t,
                         "cached": cached}
    print(f"dataset: {len(frames)} frames, {report['dataset']['atoms']} atoms, "
          f"{'read from cache' if cached else 'generated'} in {report['dataset']['seconds']:.1f} s ({path})")

    if args.speed or args.speed_too:
        speed(args, frames, report)
        if args.speed:
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2, default=str))
            return 0

    report["committees"] = {}
    first = None
    for arch in args.archs:
        cutoff, hp, lr = MODELS[arch]
        committee = Committee.build(arch, args.members, ["Cu"], cutoff, seed=0, **hp)
        n_params = sum(p.numel() for p in committee.members[0].parameters())
        print(f"\n## {arch}: cutoff {cutoff} Å, {hp}, {n_params} parameters/member, lr {lr}, "
              f"batch {args.batch_size}, budget {args.max_time:.0f} s/member")
        result = train_committee(committee, frames, config(args, lr), device=args.device, seed=0,
                                 out_dir=CACHE / "runs" / arch, progress=args.progress)
        print(f"{'model':<10} {'epochs':>6} {'train s':>8} {'test F RMSE eV/Å':>17} {'test E MAE meV/atom':>20} {'target':>7}")
        for k, m in enumerate(result.members):
            f, e = m.metrics["test"]["forces_rmse"], m.metrics["test"]["energy_mae"] * 1e3
            print(f"member {k:<3} {m.epochs:>6} {m.seconds:>8.1f} {f:>17.4f} {e:>20.2f} {'ok' if f <= TARGET else 'MISS':>7}")
        f, e = result.metrics["test"]["forces_rmse"], result.metrics["test"]["energy_mae"] * 1e3
        print(f"{'committee':<10} {'':>6} {result.seconds:>8.1f} {f:>17.4f} {e:>20.2f} {'ok' if f <= TARGET else 'MISS':>7}")
        report["committees"][arch] = {"cutoff": cutoff, "hparams": hp, "lr": lr, "n_params": n_params,
                                      "result": result.to_dict()}
        if first is None:
            first = (arch, result, committee)

    if not args.no_warm and first is not None:
        arch, result, committee = first
        cutoff, hp, lr = MODELS[arch]
        train = [frames[i] for i in result.train_idx]
        valid = [frames[i] for i in result.valid_idx]
        scratch = result.members[0]
        threshold = scratch.metrics["valid"]["forces_rmse"]  # scratch member 0's best (returned) weights
        print(f"\n## warm start vs scratch ({arch}): time to a validation force RMSE <= {threshold:.4f} eV/Å")
        t_split = float(np.median([a.info["temperature_K"] for a in train]))
        cold = [a for a in train if a.info["temperature_K"] < t_split]
        previous = Committee.build(arch, 1, ["Cu"], cutoff, seed=100, **hp).members[0]
        old = train_potential(previous, cold, [a for a in valid if a.info["temperature_K"] < t_split],
                              config(args, lr), device=args.device, seed=100, progress=args.progress)
        print(f"previous iteration: the {old.n_train} training frames below {t_split:.0f} K, {old.seconds:.1f} s, "
              f"its valid F RMSE {old.metrics['valid']['forces_rmse']:.4f} eV/Å")
        fresh = Committee.build(arch, 1, ["Cu"], cutoff, seed=0, **hp).members[0]
        warm = train_potential(fresh, train, valid, config(args, lr), device=args.device, seed=0, init_from=previous,
                               progress=args.progress)
        t_scratch, t_warm = first_time_below(scratch.history, threshold), first_time_below(warm.history, threshold)
        print(f"{'run':<8} {'valid F RMSE at start':>22} {'final':>8} {'s to threshold':>15}")
        for name, r, tt in (("scratch", scratch, t_scratch), ("warm", warm, t_warm)):
            print(f"{name:<8} {r.history[0]['valid_forces_rmse']:>22.4f} {r.metrics['valid']['forces_rmse']:>8.4f} "
                  f"{(f'{tt:.1f}' if tt is not None else 'not reached'):>15}")
        if t_scratch and t_warm:
            print(f"warm start reaches it {t_scratch / t_warm:.1f}x faster")
        report["warm_start"] = {"threshold": threshold, "split_temperature_K": t_split, "scratch_seconds": t_scratch, "warm_seconds": t_warm,
                                "previous": old.to_dict(), "warm": warm.to_dict()}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
