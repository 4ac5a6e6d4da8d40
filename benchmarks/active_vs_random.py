"""Active (full / shallow committee) vs random selection on Cu/EMT and CuNi/EMT: held-out force RMSE vs labels.

    python benchmarks/active_vs_random.py --quick --system cu --strategies committee --seeds 0
    # the issue-14 campaign, one process per strategy and seed (see "Sizing" below), resumable:
    python benchmarks/active_vs_random.py --preset session --system cuni --strategies shallow --seeds 1
    # then, on any clone, from the committed result JSONs alone:
    python benchmarks/active_vs_random.py --table-only --plot curves.png

Systems (``--system``). ``cu``: 32-atom fcc Cu (a = 3.61 Å). ``cuni``: random fcc
Cu(1-x)Ni(x) alloys with composition disorder, 32-atom cells (2x2x2 cubic fcc, Vegard
lattice constant between Cu 3.61 Å and Ni 3.52 Å); the starting and exploration
structures are four cells around x = 0.5 (x = 0.5, 0.375, 0.625, 0.5: 16, 12, 20, 16 Ni;
``--start-compositions 0.5 0.25 0.75 0.5`` spans the test set's compositions instead)
with seeded random site occupation, written as extxyz files into the run directory (``system.structures``;
the walkers cycle through them and prepare relaxed/strained/vacancy/rattled starts
from them). Both are labelled with EMT (Jacobsen, Stoltze & Nørskov, Surf. Sci. 366,
394 (1996)), which covers Cu and Ni.

Strategies (``--strategies``), all with the same loop (alflow.loop.run_loop, no
Prefect), initial data, walkers, training budget and label budget per iteration:
``committee`` (a full committee of independently trained SchNet members, uncertainty
selection: calibrated max force deviation in [lower, upper], farthest-point sampled),
``shallow`` (the same selection with ``committee: {kind: shallow, heads: 4}``: one trunk,
four readout heads, force-NLL fine-tuned; potentials/shallow.py) and ``random`` (a seeded
uniform draw among the same filtered explored frames, full committee as the model).
The committee run may label fewer frames in an iteration when fewer are uncertain; the
curves are therefore against the number of labelled frames.

Held-out test set (never seen by any run, seed-independent): ``cu``: independent EMT
Langevin MD of 32-atom cells at 300-1500 K, some strained (``alflow.datasets.cu_emt_dataset``);
``cuni``: independent EMT Langevin MD of fresh random alloys at x = 0.25, 0.5, 0.75 (300-1500 K);
both plus strained (±4 % random symmetric strain) and vacancy (31-atom) cells, rattled and
briefly run with EMT MD.

Results. Runs go to ``<out>/<system>/<strategy>/seed<k>`` and resume from there (a run that
stopped is not recomputed; raising ``--iterations`` extends it). Each finished run's evaluated
curve (labels, forces_rmse (eV/Å), energy_mae_meV (meV/atom) per iteration, the run's seconds,
the arguments) goes to ``benchmarks/results/active_vs_random/<system>_<strategy>_seed<k>.json``;
runs with such a file are skipped unless ``--rerun``. The table gives, per target force RMSE,
the labels to reach it as mean ± spread (min–max) over the seeds that reached it, "k/n reached",
and the ratios random/committee and random/shallow of the means.

Sizing (``--preset session``: one strategy × one seed × one system in about 15–20 min on
one core, OMP_NUM_THREADS=1 --threads 1; batched exploration engine, the training section of
base_config, the trainer's defaults otherwise). Measured here (2 shared cores, a second
benchmark on the other core): full committee, cuni (the session sizes: 8 labels per iteration, 4 SchNet members of 32
features, 60 epochs per iteration with warm start, 8 walkers × 300 steps, batched engine):
iteration 0 (8 frames) 58 s (train 22, explore 26, select 0.5, label 9 s), iteration 1 (16
frames) 59 s (train 27 s), iteration 2 (24 frames) train 37 s, explore 28 s; training grows by
~1 s per labelled frame, so 10 iterations (80 labels) take ~15-16 min plus the test set
(15-20 s) and the evaluation. Shallow committee, cuni: iteration 0 33 s (train 10, explore 15,
label 8 s), iteration 1 train 20 s, explore 20 s. Random costs what the full committee costs.
Commands: ``OMP_NUM_THREADS=1 python benchmarks/active_vs_random.py --system cuni --strategies
committee --iterations 3 --per-iteration 8 --initial 8`` (189 s for 3 iterations) and
``... --preset session --system cuni --strategies shallow --iterations 2`` (81 s).
Units: eV/Å, meV/atom, K, fs, s.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
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

from alflow.errors import InputError
from alflow.keys import REF_ENERGY, REF_FORCES, REF_STRESS

SESSION_ITERATIONS = 10  # ~16 min for a full committee on one core (measured: see the module docstring)
A_CU, A_NI = 3.61, 3.52  # Å (EMT-near experimental fcc lattice constants)
STRATEGIES = ("committee", "shallow", "random")
SYSTEMS = ("cu", "cuni")
START_COMPOSITIONS = (0.5, 0.375, 0.625, 0.5)  # Ni fractions of the cuni start cells (walkers cycle through them)
N_START_ALLOYS = len(START_COMPOSITIONS)
TEST_COMPOSITIONS = (0.25, 0.5, 0.75)  # Ni fractions of the cuni held-out MD
RESULTS = Path(__file__).resolve().parent / "results" / "active_vs_random"
# default targets (eV/Å) per system: the style, around what the presets reach
TARGETS = {"cu": [0.05, 0.03, 0.02, 0.015, 0.01, 0.0075], "cuni": [0.05, 0.03, 0.02, 0.015, 0.01]}


def alloy_cell(x_ni: float, rng: np.random.Generator, repeat: int = 2) -> Atoms:
    """A random fcc Cu(1-x)Ni(x) cell: ``repeat``³ cubic cells (32 atoms for 2), round(x N) Ni on random sites.

    The lattice constant follows Vegard's law between Cu (3.61 Å) and Ni (3.52 Å) at the actual composition.
    """
    if not 0.0 <= x_ni <= 1.0:
        raise InputError(f"x_ni: expected a Ni fraction in [0, 1], got {x_ni}")
    n = 4 * repeat**3
    n_ni = int(round(x_ni * n))
    a = A_CU + (A_NI - A_CU) * n_ni / n
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(repeat)
    symbols = np.array(["Cu"] * n)
    symbols[rng.choice(n, size=n_ni, replace=False)] = "Ni"
    atoms.set_chemical_symbols(list(symbols))
    atoms.pbc = True
    return atoms


def write_start_alloys(run_dir: Path, seed: int, compositions: tuple[float, ...] = START_COMPOSITIONS) -> list[str]:
    """Seeded random cells at ``compositions`` (Ni fractions) as extxyz files in ``run_dir/structures``; their paths.

    Not all at x = 0.5: with one composition only, the Cu and Ni reference energies could not be told apart
    and the energy at other compositions would be extrapolated blindly.
    """
    from ase.io import write

    rng = np.random.default_rng([seed, 14])
    folder = run_dir / "structures"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, x in enumerate(compositions):
        path = folder / f"cuni_{k}_x{round(100 * x):03d}.extxyz"
        atoms = alloy_cell(x, rng)
        if not path.exists():  # a resumed run keeps its structures
            write(path, atoms, format="extxyz")
        paths.append(str(path))
    return paths


def system_section(system: str, run_dir: Path, seed: int, initial: int,
                   compositions: tuple[float, ...] = START_COMPOSITIONS) -> dict[str, Any]:
    rattle = {"n_frames": initial, "stdev": 0.05, "strain": 0.02}
    if system == "cu":
        return {"build": {"element": "Cu", "crystal": "fcc", "a": A_CU, "cubic": True}, "supercell": [2, 2, 2],
                "initial_rattle": rattle}
    return {"structures": write_start_alloys(run_dir, seed, compositions), "initial_rattle": rattle}


def base_config(args: argparse.Namespace, system: str, strategy: str, seed: int, run_dir: Path) -> dict[str, Any]:
    """The run configuration shared by all strategies; only selection.strategy and committee.kind differ."""
    walkers = pool_walkers(args.pool, args.steps)
    committee: dict[str, Any] = {"size": args.committee, "calibrate": True}
    if strategy == "shallow":
        committee.update(kind="shallow", heads=4)
    return {
        "name": f"active-vs-random-{system}-{strategy}-seed{seed}", "run_dir": str(run_dir), "seed": seed,
        "system": system_section(system, run_dir, seed, args.initial, tuple(args.start_compositions)),
        "potential": {"architecture": "schnet", "cutoff": 4.5,
                      "hparams": {"n_atom_basis": args.features, "n_filters": args.features, "n_interactions": 2,
                                  "n_rbf": 16}},
        "committee": committee,
        "training": {"epochs": args.epochs, "batch_size": 4, "lr": 2e-3, "patience": args.epochs,
                     "valid_fraction": 0.15, "warm_start": True, "max_time_s": 600},
        "exploration": {"engine": args.engine, "walkers": walkers, "uncertain_patience": 10_000},
        "selection": {"strategy": "random" if strategy == "random" else "committee", "lower": args.lower,
                      "upper": args.upper, "max_per_iteration": args.per_iteration, "diversity": args.diversity,
                      "max_per_walker": args.max_per_walker, "fps_pool": args.fps_pool,
                      "adaptive_fraction": args.adaptive},
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


def _strain(atoms: Atoms, rng: np.random.Generator, magnitude: float = 0.04) -> Atoms:
    eps = rng.uniform(-magnitude, magnitude, size=(3, 3))
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
    return atoms


def held_out_set(system: str, n_md: int, n_defect: int, seed: int) -> list[Atoms]:
    """Held-out frames: EMT MD (300-1500 K) + strained and vacancy cells (see module docstring)."""
    rng = np.random.default_rng(seed)
    per_run = 3
    if system == "cu":
        from alflow.datasets import cu_emt_dataset

        frames = cu_emt_dataset(n_md, seed=seed, sizes=(32,), frames_per_run=max(1, n_md // 8), sample_every=10,
                                equilibration=40)
        for f in frames:
            f.info["test_kind"] = "md"
    else:  # independent MD of fresh random alloys at each test composition, some strained
        frames = []
        n_runs = max(len(TEST_COMPOSITIONS), n_md // 8)
        per_md = max(1, n_md // n_runs)
        for run in range(n_runs):
            cell = alloy_cell(TEST_COMPOSITIONS[run % len(TEST_COMPOSITIONS)], rng)
            if run % 2:
                _strain(cell, rng, 0.02)
            frames += _md_frames(cell, rng, float(rng.uniform(300.0, 1500.0)), per_md, "md")

    def fresh() -> Atoms:
        if system == "cu":
            return bulk("Cu", "fcc", a=A_CU, cubic=True).repeat(2)
        return alloy_cell(float(rng.choice(TEST_COMPOSITIONS)), rng)

    for _ in range(max(1, n_defect // (2 * per_run))):
        temperature = float(rng.uniform(300.0, 1500.0))
        strained = _strain(fresh(), rng)
        strained.rattle(0.05, seed=int(rng.integers(2**31)))
        frames += _md_frames(strained, rng, temperature, per_run, "strained")
        vacancy = fresh()
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


# ---- result files and the aggregate (pure: no training, no torch) ----

def result_path(results: Path, system: str, strategy: str, seed: int) -> Path:
    return results / f"{system}_{strategy}_seed{seed}.json"


def load_results(results: Path) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """{system: {strategy: {seed: record}}} from the ``<system>_<strategy>_seed<k>.json`` files in ``results``."""
    out: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for path in sorted(results.glob("*_seed*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: expected a result JSON, got unreadable text ({err})") from None
        for key in ("system", "strategy", "seed", "curve"):
            if not isinstance(record, dict) or key not in record:
                raise InputError(f"{path}: expected a result with key {key!r} (system, strategy, seed, curve)")
        out.setdefault(record["system"], {}).setdefault(record["strategy"], {})[int(record["seed"])] = record
    return out


def aggregate(curves: list[list[dict[str, Any]]], target: float) -> dict[str, Any]:
    """Labels to reach ``target`` over seeds: mean, min, max over the seeds that reached it, reached, n."""
    reached = [x for x in (labels_to_reach(c, target) for c in curves) if x is not None]
    if not reached:
        return {"mean": None, "min": None, "max": None, "reached": 0, "n": len(curves)}
    return {"mean": float(np.mean(reached)), "min": min(reached), "max": max(reached), "reached": len(reached),
            "n": len(curves)}


def _cell(a: dict[str, Any]) -> str:
    if a["n"] == 0:
        return "—"
    if a["mean"] is None:
        return f"not reached (0/{a['n']})"
    return f"{a['mean']:.0f} ± [{a['min']}–{a['max']}] ({a['reached']}/{a['n']} reached)"


def _ratio(num: dict[str, Any], den: dict[str, Any], num_labels: int | None) -> str:
    """mean(num) / mean(den); "> x" where only den reached it (x: num's most labels / mean(den))."""
    if den["mean"] is None:
        return "—"
    if num["mean"] is None:
        return f"> {num_labels / den['mean']:.2f}" if num_labels else "—"
    return f"{num['mean'] / den['mean']:.2f}"


def tightest_random_target(runs: dict[str, dict[int, dict[str, Any]]]) -> float | None:
    """The tightest force RMSE (eV/Å, rounded up to 1e-4) that random selection reaches on every seed, or None."""
    bests = [min(x["forces_rmse"] for x in r["curve"]) for r in runs.get("random", {}).values() if r["curve"]]
    return math.ceil(max(bests) * 1e4 - 1e-9) / 1e4 if bests else None


def verdict(runs: dict[str, dict[int, dict[str, Any]]], targets: list[float]) -> list[str]:
    """The issue's two checks, per selecting strategy: labels at random's tightest target (ratio >= 2 wanted) and,
    at every looser target, the strategy's mean within random's seed spread (mean <= random's max)."""
    tight = tightest_random_target(runs)
    if tight is None or "random" not in runs:
        return []
    curves = {s: [r["curve"] for _, r in sorted(runs.get(s, {}).items())] for s in STRATEGIES}
    rand = aggregate(curves["random"], tight)
    lines = [f"Random reaches {tight:g} eV/Å on every seed ({_cell(rand)})."]
    for s in ("committee", "shallow"):
        if not curves[s]:
            continue
        a = aggregate(curves[s], tight)
        if a["mean"] is None:
            lines.append(f"- {s}: does not reach {tight:g} on any seed.")
            continue
        looser = [t for t in targets if t > tight]
        worse = [t for t in looser if (x := aggregate(curves[s], t))["mean"] is not None
                 and (y := aggregate(curves["random"], t))["mean"] is not None and x["mean"] > y["max"]]
        missed = [t for t in looser if (x := aggregate(curves[s], t))["reached"] < x["n"]]
        checks = ([f"more labels than random's worst seed at {', '.join(f'{t:g}' for t in worse)}"] if worse else []) + \
                 ([f"not reached on every seed at {', '.join(f'{t:g}' for t in missed)}"] if missed else [])
        lines.append(f"- {s}: {_cell(a)} at {tight:g} eV/Å: random / {s} = {rand['mean'] / a['mean']:.2f} "
                     f"(target >= 2: {'met' if rand['mean'] / a['mean'] >= 2 and a['reached'] == a['n'] else 'not met'}); "
                     + ("; ".join(checks) if checks else
                        f"never more labels than random's worst seed at the looser targets ({', '.join(f'{t:g}' for t in looser)})"))
    return lines


def table(system: str, runs: dict[str, dict[int, dict[str, Any]]], targets: list[float]) -> str:
    """Markdown: per target, labels to reach it per strategy (mean ± [min–max], k/n reached) and the ratios;
    random's tightest every-seed target is added as a row, and the verdict follows the table."""
    names = [s for s in STRATEGIES if s in runs]
    tight = tightest_random_target(runs)
    if tight is not None:
        targets = sorted(set(targets) | {tight}, reverse=True)
    lines = [f"**{system}** — labels to reach a held-out force RMSE <= target (eV/Å); mean ± [min–max] over the "
             "seeds that reached it",
             "", "| target (eV/Å) | " + " | ".join(names) + " | random / committee | random / shallow |",
             "|---:|" + "---:|" * (len(names) + 2)]
    for target in sorted(targets, reverse=True):
        agg = {s: aggregate([r["curve"] for _, r in sorted(runs.get(s, {}).items())], target) for s in STRATEGIES}
        most = max((x["labels"] for r in runs.get("random", {}).values() for x in r["curve"]), default=None)
        lines.append(f"| {target:g} | " + " | ".join(_cell(agg[s]) for s in names)
                     + f" | {_ratio(agg['random'], agg['committee'], most)} | "
                     f"{_ratio(agg['random'], agg['shallow'], most)} |")
    lines.append("")
    for s in names:
        best = [min(r["curve"], key=lambda x: x["forces_rmse"]) for r in runs[s].values() if r["curve"]]
        secs = [r.get("seconds", float("nan")) for r in runs[s].values()]
        if best:
            lines.append(f"- {s}: seeds {sorted(runs[s])}, best force RMSE "
                         + ", ".join(f"{b['forces_rmse']:.4f} at {b['labels']}" for b in best)
                         + f" labels; run time {np.nanmean(secs):.0f} s mean")
    verdict_lines = verdict(runs, targets)
    if verdict_lines:
        lines += ["", *verdict_lines]
    return "\n".join(lines)


def plot(system: str, runs: dict[str, dict[int, dict[str, Any]]], targets: list[float], path: Path) -> None:
    """Mean force RMSE per strategy vs labels with a min–max band over seeds (on the labels all seeds have)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for strategy in [s for s in STRATEGIES if s in runs]:
        curves = [r["curve"] for r in runs[strategy].values() if r["curve"]]
        grid = np.array(sorted({x["labels"] for c in curves for x in c}), dtype=float)
        grid = grid[grid <= min(max(x["labels"] for x in c) for c in curves)]
        ys = np.array([np.interp(grid, [x["labels"] for x in c], [x["forces_rmse"] for x in c]) for c in curves])
        line, = ax.plot(grid, ys.mean(axis=0), "-", label=f"{strategy} ({len(curves)} seeds)")
        ax.fill_between(grid, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.2, lw=0)
    for target, style in zip(targets, ("--", ":", "-.", (0, (1, 3)), (0, (5, 5)))):
        ax.axhline(target, color="grey", ls=style, lw=1, label=f"{target:g} eV/Å")
    ax.set_xlabel("labelled frames (EMT)")
    ax.set_ylabel("test force RMSE (eV/Å)")
    ax.set_yscale("log")
    ax.set_title(f"{'Cu' if system == 'cu' else 'CuNi'}/EMT: committee, shallow and random selection")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


PRESETS: dict[str, dict[str, Any]] = {
    # ~5 min per strategy and seed on 2 cores: a smoke run of the whole pipeline
    "quick": dict(iterations=4, per_iteration=6, initial=6, epochs=25, committee=3, features=16, steps=90,
                  test_md=32, test_defects=12),
    # one strategy × one seed × one system in ~15-20 min on one core (measured, see the module docstring)
    "session": dict(iterations=SESSION_ITERATIONS, per_iteration=8, initial=8, epochs=60, committee=4, features=32,
                    steps=300, pool="production", test_md=120, test_defects=36),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Arguments; ``--preset``/``--quick`` set the defaults, so explicit options still override them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--system", default=None, choices=SYSTEMS,
                   help="cu: fcc Cu; cuni: random fcc CuNi alloys (default cu; --table-only: both)")
    p.add_argument("--preset", default=None, choices=tuple(PRESETS), help="sizes (see PRESETS); options override")
    p.add_argument("--quick", action="store_true", help="the same as --preset quick")
    p.add_argument("--iterations", type=int, default=8, help="loop iterations per strategy")
    p.add_argument("--per-iteration", type=int, default=10, help="label budget per iteration (frames)")
    p.add_argument("--initial", type=int, default=10, help="rattled frames labelled before iteration 0")
    p.add_argument("--epochs", type=int, default=60, help="training epochs per iteration (warm start)")
    p.add_argument("--committee", type=int, default=4, help="committee size (full committees)")
    p.add_argument("--features", type=int, default=32, help="SchNet features and filters")
    p.add_argument("--steps", type=int, default=300, help="MD steps per walker and iteration")
    p.add_argument("--engine", default="batched", choices=("batched", "ase"), help="exploration engine")
    p.add_argument("--lower", type=float, default=0.05, help="committee trust level (eV/Å)")
    p.add_argument("--upper", type=float, default=2.0,
                   help="selection.upper (eV/Å): frames above it are not labelled (committees; random ignores it; "
                        "alflow's default is 0.5)")
    p.add_argument("--diversity", default="fps", choices=("fps", "none"),
                   help="selection.diversity of the committees: fps (farthest-point sampling among the candidates) or "
                        "none (the most uncertain first); random ignores it")
    p.add_argument("--fps-pool", type=float, default=None,
                   help="selection.fps_pool: farthest-point sampling among the ceil(f x per-iteration) most uncertain "
                        "candidates only (committees; random ignores it)")
    p.add_argument("--max-per-walker", type=int, default=None,
                   help="selection.max_per_walker: at most this many labels from one walker per iteration (every "
                        "strategy: random's draws change too)")
    p.add_argument("--adaptive", type=float, default=None,
                   help="selection.adaptive_fraction: top too few candidates up with the most uncertain frames "
                        "(default none; 0.1 measured: more labels to every target, docs/benchmarks.md; random ignores it)")
    p.add_argument("--start-compositions", type=float, nargs="+", default=list(START_COMPOSITIONS),
                   help="cuni: Ni fractions of the start cells, which the initial set and the walkers cycle through "
                        f"(default {' '.join(map(str, START_COMPOSITIONS))}; the test set is at "
                        f"{' '.join(map(str, TEST_COMPOSITIONS))})")
    p.add_argument("--test-md", type=int, default=120, help="held-out EMT MD frames")
    p.add_argument("--test-defects", type=int, default=36, help="held-out strained + vacancy frames")
    p.add_argument("--target", type=float, default=None, help="a target test force RMSE (eV/Å)")
    p.add_argument("--also-targets", type=float, nargs="*", default=None,
                   help="further targets (eV/Å); without --target/--also-targets: TARGETS[system]")
    p.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                   help="run seeds (the test set does not depend on them)")
    p.add_argument("--out", type=Path, default=Path("runs/active_vs_random"), help="run directories")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the per-run result JSONs")
    p.add_argument("--random-from", type=Path, default=None,
                   help="--table-only: take the random runs from this results folder instead")
    p.add_argument("--rerun", action="store_true", help="run and evaluate even where a result JSON exists")
    p.add_argument("--table-only", action="store_true", help="print the table(s) from the result JSONs alone")
    p.add_argument("--plot", type=Path, default=None, help="PNG of force RMSE vs labels ({system} is replaced)")
    p.add_argument("--plot-targets", type=float, nargs="*", default=None, help="horizontal lines (eV/Å)")
    p.add_argument("--pool", default="production", choices=("production", "balanced"),
                   help="explored conditions per iteration (see pool_walkers)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES,
                   help="run only these (e.g. one per process); a finished run is resumed, not recomputed")
    p.add_argument("--evaluate-only", action="store_true",
                   help="evaluate the finished iterations of the runs in --out without running the loop")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    first, _ = p.parse_known_args(argv)
    preset = "quick" if first.quick else first.preset
    if preset is not None:
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    args.preset = preset
    args.systems = [args.system] if args.system else list(SYSTEMS)  # the tables to print
    args.system = args.system or "cu"
    return args


def targets_of(args: argparse.Namespace, system: str) -> list[float]:
    given = [t for t in [args.target, *(args.also_targets or [])] if t is not None]
    return sorted(set(given or TARGETS[system]), reverse=True)


def report(args: argparse.Namespace, systems: list[str]) -> None:
    """The markdown table (and plot) per system from the result JSONs."""
    results = load_results(args.results)
    if args.random_from is not None:  # the random baseline of another set (random never reads the scores)
        for system, runs in load_results(args.random_from).items():
            if "random" in runs:
                results.setdefault(system, {})["random"] = runs["random"]
    for system in systems:
        if system not in results:
            print(f"{system}: no results in {args.results}")
            continue
        print("\n" + table(system, results[system], targets_of(args, system)))
        if args.plot is not None:
            path = args.plot
            if "{system}" in str(path):
                path = Path(str(path).replace("{system}", system))
            elif len(systems) > 1:
                path = path.with_name(f"{path.stem}_{system}{path.suffix}")
            plot(system, results[system], args.plot_targets or targets_of(args, system)[:3], path)
            print(f"plot: {path}")


def run_one(args: argparse.Namespace, strategy: str, seed: int, test: list[Atoms]) -> dict[str, Any]:
    """Run (or resume) one strategy and seed, evaluate every iteration; the result record."""
    from alflow.config import config_from_dict
    from alflow.loop import run_loop

    run_dir = args.out.resolve() / args.system / strategy / f"seed{seed}"
    t1 = time.perf_counter()
    summary: dict[str, Any] = {}
    if not args.evaluate_only:
        config = config_from_dict(copy.deepcopy(base_config(args, args.system, strategy, seed, run_dir)))
        summary = dict(run_loop(config, force=True, say=lambda s: None))
        print(f"{args.system}/{strategy}/seed{seed}: {summary['iterations']} iterations, {summary['labels']} labels, "
              f"stop {summary['status']} ({time.perf_counter() - t1:.0f} s)", flush=True)
    from alflow.loop import read_state

    state = read_state(run_dir)  # the run's compute time over every session: the sum of its stages' seconds
    seconds = sum(float(r.get("seconds", 0.0)) for r in state["stages"].values())
    curve = evaluate_run(run_dir, test, args.device)
    return {"system": args.system, "strategy": strategy, "seed": seed, "status": state.get("status"),
            "seconds": round(seconds, 1), "run_dir": str(run_dir), "curve": curve,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table_only:
        report(args, args.systems)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    todo = [(s, k) for s in args.strategies for k in args.seeds
            if args.rerun or not result_path(args.results, args.system, s, k).exists()]
    skipped = len(args.strategies) * len(args.seeds) - len(todo)
    if skipped:
        print(f"{skipped} run(s) skipped: their results exist in {args.results} (--rerun to redo)")
    if todo:
        test = held_out_set(args.system, args.test_md, args.test_defects, 7919)
        kinds = {k: sum(f.info["test_kind"] == k for f in test) for k in ("md", "strained", "vacancy")}
        print(f"test set ({args.system}): {len(test)} EMT frames {kinds} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    for strategy, seed in todo:
        record = run_one(args, strategy, seed, test)
        for r in record["curve"]:
            print(f"  {r['iteration']:>3} {r['labels']:>5} labels  F RMSE {r['forces_rmse']:.4f} eV/Å  "
                  f"E MAE {r['energy_mae_meV']:.2f} meV/atom")
        if record["status"] in ("converged", "max_iterations", "max_labels"):  # a stopped run, not an interrupted one
            args.results.mkdir(parents=True, exist_ok=True)
            path = result_path(args.results, args.system, strategy, seed)
            path.write_text(json.dumps(record, indent=1) + "\n")
            print(f"result: {path}", flush=True)
    report(args, [args.system])
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
