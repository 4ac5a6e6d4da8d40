"""Active (committee) vs random selection on Cu/EMT: held-out force RMSE vs number of labels.

    python benchmarks/active_vs_random.py --quick --plot active_vs_random.png
    python benchmarks/active_vs_random.py --pool production --per-iteration 5 --iterations 15 --plot curve.png
    # or one strategy per process (2 cores), then the same command with both to tabulate and plot:
    python benchmarks/active_vs_random.py --pool production --per-iteration 5 --iterations 15 --strategies random &

Both runs use the same loop (alflow.loop.run_loop, no Prefect) and differ only in
``selection.strategy``: "committee" (frames whose calibrated committee force
deviation lies in [lower, upper], farthest-point sampled) or "random" (a seeded
uniform draw among the same filtered explored frames). Everything else is equal:
the initial dataset (rattled 32-atom fcc Cu, a = 3.61 Å), the model (a small SchNet
committee), the training budget, the walkers (each iteration explores with that
run's current committee: Langevin NVT at 300-1500 K from relaxed, strained, vacancy
and rattled starts; ``--pool`` sets how many near-equilibrium walkers run beside the
hard ones, see ``pool_walkers``) and the label budget per iteration (``--per-iteration``).
A run that finished is resumed, not recomputed (``alflow.loop``): raising
``--iterations`` and rerunning extends both curves. The
committee run may label fewer frames in an iteration when fewer are uncertain; the
curves are therefore plotted against the number of labelled frames.

Held-out test set (never seen by either run): independent EMT Langevin MD of
32-atom cells at 300-1500 K, some strained (``alflow.datasets.cu_emt_dataset``
with its own seed), plus strained (±4 % random symmetric strain) and vacancy
(31-atom) cells, rattled and briefly run with EMT MD, all labelled with EMT
(Jacobsen, Stoltze & Nørskov, Surf. Sci. 366, 394 (1996)).

Each iteration's committee (the mean of its members) is evaluated on the test set;
the table gives the force RMSE (eV/Å) and energy MAE (meV/atom) against the labels
it was trained on, and for each strategy the labels needed to reach ``--target``
force RMSE (eV/Å), or "not reached". Units: eV/Å, meV/atom, K, fs.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, thermalize_momenta

from alflow.keys import REF_ENERGY, REF_FORCES, REF_STRESS

A_CU = 3.61  # Å
STRATEGIES = ("committee", "random")


def base_config(args: argparse.Namespace, strategy: str, run_dir: Path) -> dict[str, Any]:
    """The run configuration shared by both strategies; only selection.strategy differs."""
    walkers = pool_walkers(args.pool, args.steps)
    return {
        "name": f"active-vs-random-{strategy}", "run_dir": str(run_dir), "seed": args.seed,
        "system": {"build": {"element": "Cu", "crystal": "fcc", "a": A_CU, "cubic": True}, "supercell": [2, 2, 2],
                   "initial_rattle": {"n_frames": args.initial, "stdev": 0.05, "strain": 0.02}},
        "potential": {"architecture": "schnet", "cutoff": 4.5,
                      "hparams": {"n_atom_basis": args.features, "n_filters": args.features, "n_interactions": 2,
                                  "n_rbf": 16}},
        "committee": {"size": args.committee, "calibrate": True},
        "training": {"epochs": args.epochs, "batch_size": 4, "lr": 2e-3, "patience": args.epochs,
                     "valid_fraction": 0.15, "warm_start": True, "max_time_s": 600},
        "exploration": {"engine": "ase", "walkers": walkers, "uncertain_patience": 10_000},
        "selection": {"strategy": strategy, "lower": args.lower, "upper": 2.0,
                      "max_per_iteration": args.per_iteration, "diversity": "fps"},
        "labelling": {"oracle": "emt", "timeout_s": 60},
        # a fixed number of iterations: convergence only when every explored frame is trusted
        "loop": {"max_iterations": args.iterations, "convergence_fraction": 1.0, "convergence_patience": 100},
        "execution": {"task_runner": "thread", "max_workers": 1, "device": args.device},
    }


def pool_walkers(pool: str, steps: int) -> list[dict[str, Any]]:
    """The exploration walkers of one iteration (Langevin NVT, 2 fs, ~15 frames each).

    ``balanced``: one walker per condition (300 K; 900 K strained 3 %; 600 K vacancy;
    1500 K rattled), so the explored frames cover the conditions evenly.
    ``production``: as a production campaign spends its MD: five walkers near equilibrium
    (300 K, relaxed starts, different seeds) beside the same three hard ones, so about
    60 % of the explored frames are near-duplicates of each other.
    """
    walker = {"ensemble": "nvt-langevin", "timestep": 2.0, "steps": steps, "stride": max(1, steps // 15)}
    hard = [{**walker, "temperature": 900.0, "start": "strained", "strain": 0.03},
            {**walker, "temperature": 600.0, "start": "vacancy"},
            {**walker, "temperature": 1500.0, "start": "rattled", "rattle_stdev": 0.05}]
    if pool == "balanced":
        return [{**walker, "temperature": 300.0}, *hard]
    return [{**walker, "temperature": 300.0, "replicas": 5}, *hard]


def _labelled(atoms: Atoms, kind: str) -> Atoms:
    frame = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell.array, pbc=True)
    frame.info[REF_ENERGY] = float(atoms.get_potential_energy())
    frame.arrays[REF_FORCES] = np.array(atoms.get_forces())
    frame.info[REF_STRESS] = np.array(atoms.get_stress(voigt=True))
    frame.info["test_kind"] = kind
    return frame


def _md_frames(atoms: Atoms, rng: np.random.Generator, temperature: float, n: int, kind: str) -> list[Atoms]:
    """``n`` EMT Langevin frames (every 10 steps of 4 fs after 40 steps) of ``atoms`` at ``temperature`` K."""
    atoms.calc = EMT()
    thermalize_momenta(atoms, temperature, rng=rng)
    Stationary(atoms)
    atoms.set_constraint(FixCom())
    dyn = Langevin(atoms, 4.0 * units.fs, temperature_K=temperature, friction=0.02 / units.fs, fixcm=False, rng=rng)
    dyn.run(40)
    out = []
    for _ in range(n):
        dyn.run(10)
        out.append(_labelled(atoms, kind))
    return out


def held_out_set(n_md: int, n_defect: int, seed: int) -> list[Atoms]:
    """Held-out frames: EMT MD (300-1500 K, some strained) + strained and vacancy cells (see module docstring)."""
    from alflow.datasets import cu_emt_dataset

    frames = cu_emt_dataset(n_md, seed=seed, sizes=(32,), frames_per_run=max(1, n_md // 8), sample_every=10,
                            equilibration=40)
    for f in frames:
        f.info["test_kind"] = "md"
    rng = np.random.default_rng(seed)
    per_run = 3
    for run in range(max(1, n_defect // (2 * per_run))):
        temperature = float(rng.uniform(300.0, 1500.0))
        strained = bulk("Cu", "fcc", a=A_CU, cubic=True).repeat(2)
        eps = rng.uniform(-0.04, 0.04, size=(3, 3))
        strained.set_cell(strained.cell.array @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
        strained.rattle(0.05, seed=int(rng.integers(2**31)))
        frames += _md_frames(strained, rng, temperature, per_run, "strained")
        vacancy = bulk("Cu", "fcc", a=A_CU, cubic=True).repeat(2)
        del vacancy[int(rng.integers(len(vacancy)))]
        vacancy.rattle(0.05, seed=int(rng.integers(2**31)))
        frames += _md_frames(vacancy, rng, temperature, per_run, "vacancy")
    return frames


def evaluate_run(run_dir: Path, test: list[Atoms], device: str) -> list[dict[str, Any]]:
    """Test errors of each iteration's committee: labels trained on, force RMSE (eV/Å), energy MAE (meV/atom)."""
    import potentials
    from alflow.loop import read_state
    from alflow.metrics import evaluate

    state = read_state(run_dir)
    rows = []
    for key, record in state["stages"].items():
        if not key.endswith("/train"):
            continue
        result = record["result"]
        model = potentials.load(run_dir / result["committee"], device="cpu" if device == "auto" else device)
        m = evaluate(model, test)
        rows.append({"iteration": int(key.split("/")[0].removeprefix("iter_")), "labels": int(result["n_frames"]),
                     "forces_rmse": float(m["forces_rmse"]), "energy_mae_meV": 1000.0 * float(m["energy_mae"])})
    return sorted(rows, key=lambda r: r["iteration"])


def labels_to_reach(rows: list[dict[str, Any]], target: float) -> int | None:
    """The fewest labels at which the test force RMSE is <= ``target`` (eV/Å), or None."""
    return next((r["labels"] for r in rows if r["forces_rmse"] <= target), None)


def plot(curves: dict[str, list[dict[str, Any]]], targets: list[float], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for strategy, rows in curves.items():
        ax.plot([r["labels"] for r in rows], [r["forces_rmse"] for r in rows], "o-", label=strategy)
    for target, style in zip(targets, ("--", ":", "-.")):
        ax.axhline(target, color="grey", ls=style, lw=1, label=f"{target:g} eV/Å")
    ax.set_xlabel("labelled frames (EMT)")
    ax.set_ylabel("test force RMSE (eV/Å)")
    ax.set_yscale("log")
    ax.set_title("Cu/EMT: committee vs random selection")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small budget (~5 min on 2 cores): overrides the sizes below")
    p.add_argument("--iterations", type=int, default=8, help="loop iterations per strategy")
    p.add_argument("--per-iteration", type=int, default=10, help="label budget per iteration (frames)")
    p.add_argument("--initial", type=int, default=10, help="rattled frames labelled before iteration 0")
    p.add_argument("--epochs", type=int, default=60, help="training epochs per iteration (warm start)")
    p.add_argument("--committee", type=int, default=4, help="committee size")
    p.add_argument("--features", type=int, default=32, help="SchNet features and filters")
    p.add_argument("--steps", type=int, default=300, help="MD steps per walker and iteration")
    p.add_argument("--lower", type=float, default=0.05, help="committee trust level (eV/Å)")
    p.add_argument("--test-md", type=int, default=120, help="held-out EMT MD frames")
    p.add_argument("--test-defects", type=int, default=36, help="held-out strained + vacancy frames")
    p.add_argument("--target", type=float, default=0.05, help="target test force RMSE (eV/Å), the issue's")
    p.add_argument("--also-targets", type=float, nargs="*", default=[0.02, 0.015, 0.012, 0.01],
                   help="further targets reported in the labels-to-reach table (eV/Å)")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs (the test set uses seed + 7919)")
    p.add_argument("--out", type=Path, default=Path("runs/active_vs_random"), help="run directories")
    p.add_argument("--plot", type=Path, default=None, help="PNG of force RMSE vs labels")
    p.add_argument("--plot-targets", type=float, nargs="*", default=[], help="more horizontal lines (eV/Å)")
    p.add_argument("--pool", default="production", choices=("production", "balanced"),
                   help="explored conditions per iteration (see pool_walkers)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES,
                   help="run only these (e.g. one per process); a finished run is resumed, not recomputed")
    p.add_argument("--evaluate-only", action="store_true",
                   help="evaluate the finished iterations of the runs in --out without running the loop")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    if args.quick:
        args.iterations, args.per_iteration, args.initial, args.epochs = 4, 6, 6, 25
        args.committee, args.features, args.steps, args.test_md, args.test_defects = 3, 16, 90, 32, 12

    import torch

    from alflow.config import config_from_dict
    from alflow.loop import run_loop

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    test = held_out_set(args.test_md, args.test_defects, args.seed + 7919)
    kinds = {k: sum(f.info["test_kind"] == k for f in test) for k in ("md", "strained", "vacancy")}
    print(f"test set: {len(test)} EMT frames {kinds} ({time.perf_counter() - t0:.0f} s)", flush=True)

    curves: dict[str, list[dict[str, Any]]] = {}
    for strategy in args.strategies:
        t1 = time.perf_counter()
        run_dir = args.out.resolve() / strategy
        if not args.evaluate_only:
            config = config_from_dict(copy.deepcopy(base_config(args, strategy, run_dir)))
            summary = run_loop(config, force=True, say=lambda s: None)
            print(f"{strategy}: {summary['iterations']} iterations, {summary['labels']} labels, stop "
                  f"{summary['status']} ({time.perf_counter() - t1:.0f} s)", flush=True)
        curves[strategy] = evaluate_run(run_dir, test, args.device)

    names = list(curves)
    print("\ntest force RMSE (eV/Å) and energy MAE (meV/atom) vs labelled frames")
    print(f"{'iter':>4} | " + " | ".join(f"{n + ' labels':>16} {'F RMSE':>8} {'E MAE':>7}" for n in names))
    for i in range(max(len(r) for r in curves.values())):
        cells = []
        for name in names:
            rows = curves[name]
            cells.append(f"{rows[i]['labels']:>16} {rows[i]['forces_rmse']:>8.4f} {rows[i]['energy_mae_meV']:>7.2f}"
                         if i < len(rows) else " " * 33)
        print(f"{i:>4} | " + " | ".join(cells))
    targets = sorted({args.target, *args.also_targets}, reverse=True)
    print("\nlabels to reach a test force RMSE <= target (eV/Å):")
    print("| target (eV/Å) | " + " | ".join(names) + (" | random / committee |" if len(names) == 2 else " |"))
    print("|---:|" + "---:|" * (len(names) + (len(names) == 2)))
    for target in targets:
        reached = {n: labels_to_reach(curves[n], target) for n in names}
        cells = [str(reached[n]) if reached[n] is not None else "not reached" for n in names]
        if len(names) == 2:
            c, r = reached.get("committee"), reached.get("random")
            cells.append(f"{r / c:.2f}" if c and r else ("> " + f"{max(x['labels'] for x in curves['random']) / c:.2f}"
                                                         if c and r is None else "—"))
        print(f"| {target:g} | " + " | ".join(cells) + " |")
    for name in names:
        best = min(curves[name], key=lambda r: r["forces_rmse"])
        print(f"  {name}: best {best['forces_rmse']:.4f} eV/Å at {best['labels']} labels")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curves.json").write_text(json.dumps({"target": args.target, "curves": curves}, indent=1))
    if args.plot is not None:
        plot(curves, [args.target, *args.plot_targets], args.plot)
        print(f"plot: {args.plot}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
