"""A stand-in foundation model (no downloads) and from-foundation vs from-scratch on a new alloy (issue 15).

    python benchmarks/foundation.py standin OUT.pt [--epochs 60] [--seed 0]
    python benchmarks/foundation.py compare --out runs/foundation_bench [--seeds 0 1] [--iterations 3]

``standin``: a small SchNet (alflow checkpoint) trained by the alflow trainer on EMT labels of
diverse structures of Cu, Ag, Au and Ni: fcc bulk at strains of -4 % to +4 %, rattled,
and the binary alloys CuNi and AgAu (random 8-atom decorations). No Cu-Au pair is in its data,
so Cu3Au is a system "it has not seen well". Used by tests/alflow/test_foundation.py (a
session fixture) and examples/foundation/.

``compare``: the alflow loop on Cu3Au (EMT oracle) from the stand-in (``potential.foundation``)
and from scratch (same architecture/hparams, random weights), same budgets, each seed; prints
the labels spent and the force RMSE on a fixed held-out Cu3Au test set after every iteration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ELEMENTS = ("Cu", "Ag", "Au", "Ni")
ALLOYS = (("Cu", "Ni"), ("Ag", "Au"))
HPARAMS = {"n_atom_basis": 16, "n_filters": 16, "n_interactions": 2, "n_rbf": 12}
CUTOFF = 4.5


def _labelled(atoms: Any) -> Any:
    from ase.calculators.emt import EMT

    from alflow.io import labels_from_calc

    atoms.calc = EMT()
    atoms.get_forces()
    atoms.get_stress()
    return labels_from_calc(atoms)


def standin_frames(n_per_system: int = 8, seed: int = 0) -> list:
    """EMT-labelled fcc structures (8 atoms): each element and the alloys of ``ALLOYS``, strained and rattled."""
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    frames = []
    systems = [(e,) for e in ELEMENTS] + list(ALLOYS)
    for system in systems:
        a0 = float(np.mean([bulk(e).cell.cellpar()[0] / np.sqrt(0.5) for e in system]))  # cubic a from fcc prim.
        for k in range(n_per_system):
            atoms = bulk(system[0], "fcc", a=a0, cubic=True).repeat((2, 1, 1))
            if len(system) > 1:
                atoms.symbols[:] = [system[i] for i in rng.integers(0, 2, len(atoms))]
            strain = rng.uniform(-0.04, 0.04)
            atoms.set_cell(atoms.cell * (1 + strain), scale_atoms=True)
            atoms.rattle(stdev=0.03 + 0.07 * k / max(1, n_per_system - 1), seed=int(rng.integers(1 << 30)))
            frames.append(_labelled(atoms))
    return frames


def build_standin(path: str | os.PathLike, *, epochs: int = 60, seed: int = 0, n_per_system: int = 8) -> Path:
    """Train the stand-in (one SchNet, ``HPARAMS``) on ``standin_frames`` and save it (alflow checkpoint)."""
    import torch

    import potentials
    from alflow.config import TrainingConfig
    from alflow.train import train_potential

    frames = standin_frames(n_per_system, seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(frames))
    n_valid = max(2, len(frames) // 8)
    valid = [frames[i] for i in order[:n_valid]]
    train = [frames[i] for i in order[n_valid:]]
    torch.manual_seed(seed)
    model = potentials.build("schnet", [28, 29, 47, 79], CUTOFF, **HPARAMS)
    cfg = TrainingConfig(epochs=epochs, batch_size=4, lr=5e-3, patience=epochs, forces_weight=10.0)
    train_potential(model, train, valid, cfg, device="cpu", seed=seed, progress=False)
    return potentials.save(model, path)


def cu3au_test_set(n: int = 12, seed: int = 123) -> list:
    """Held-out Cu3Au (L1_2, 2x1x1 cubic cells), rattled 0.05-0.15 Å and strained +-3 %, EMT labels."""
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.75, cubic=True)
        atoms.symbols[0] = "Au"
        atoms = atoms.repeat((2, 1, 1))
        atoms.set_cell(atoms.cell * (1 + rng.uniform(-0.03, 0.03)), scale_atoms=True)
        atoms.rattle(stdev=0.05 + 0.1 * k / max(1, n - 1), seed=int(rng.integers(1 << 30)))
        out.append(_labelled(atoms))
    return out


def _config(name: str, run_dir: Path, seed: int, foundation: str | None, iterations: int) -> dict[str, Any]:
    from ase.build import bulk
    from ase.io import write

    structure = run_dir.parent / "cu3au.extxyz"
    if not structure.is_file():
        atoms = bulk("Cu", "fcc", a=3.75, cubic=True)
        atoms.symbols[0] = "Au"
        write(structure, atoms.repeat((2, 1, 1)), format="extxyz")
    pot: dict[str, Any] = {"foundation": foundation} if foundation else {
        "architecture": "schnet", "cutoff": CUTOFF, "hparams": HPARAMS}
    return {"name": name, "run_dir": str(run_dir), "seed": seed,
            "system": {"structures": [str(structure)], "initial_rattle": {"n_frames": 6, "stdev": 0.05}},
            "potential": {**pot, "dtype": "float32"}, "committee": {"size": 3},
            "training": {"epochs": 40, "batch_size": 4, "lr": 3e-3, "patience": 15, "valid_fraction": 0.2,
                         "replay_frames": 6 if foundation else 20},
            "exploration": {"walkers": [{"ensemble": "nvt-langevin", "temperature": 600, "steps": 200,
                                         "stride": 10, "timestep": 2.0}]},
            "selection": {"lower": 0.05, "upper": 2.0, "max_per_iteration": 6},
            "labelling": {"oracle": "emt"}, "loop": {"max_iterations": iterations},
            "execution": {"device": "cpu"}}


def force_rmse(model_path: str, frames: list) -> float:
    """Force RMSE (eV/Å) of the committee mean against the frames' REF_forces."""
    from alflow.calculator import AlflowCalculator
    from alflow.keys import REF_FORCES

    calc = AlflowCalculator(model_path, device="cpu")
    sq, n = 0.0, 0
    for a in frames:
        b = a.copy()
        b.calc = calc
        d = b.get_forces() - a.arrays[REF_FORCES]
        sq, n = sq + float((d**2).sum()), n + d.size
    return float(np.sqrt(sq / n))


def compare(out: Path, seeds: list[int], iterations: int, standin: Path | None) -> list[dict[str, Any]]:
    from alflow.config import config_from_dict
    from alflow.loop import read_state, run_loop, stage_key

    out.mkdir(parents=True, exist_ok=True)
    if standin is None:
        standin = out / "standin.pt"
        if not standin.is_file():
            build_standin(standin)
    standin = standin.resolve()
    test = cu3au_test_set()
    rows = []
    for seed in seeds:
        for mode in ("foundation", "scratch"):
            run_dir = out / f"{mode}_{seed}"
            cfg = config_from_dict(_config(f"{mode}_{seed}", run_dir, seed,
                                           str(standin) if mode == "foundation" else None, iterations), out)
            t0 = time.perf_counter()
            run_loop(cfg, force=True)
            state = read_state(run_dir)
            labels = 6
            for it in state["iterations"]:
                i = it["iteration"]
                model = run_dir / stage_key("train", i) / "committee.pt"
                rows.append({"seed": seed, "mode": mode, "iteration": i, "labels_trained_on": labels,
                             "test_forces_rmse": force_rmse(str(model), test)})
                labels = it["labels_total"]
            rows[-1]["seconds"] = time.perf_counter() - t0
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("standin", help="train and save the stand-in foundation model")
    s.add_argument("out")
    s.add_argument("--epochs", type=int, default=60)
    s.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("compare", help="from the stand-in vs from scratch on Cu3Au")
    c.add_argument("--out", type=Path, default=Path("runs/foundation_bench"))
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    c.add_argument("--iterations", type=int, default=3)
    c.add_argument("--standin", type=Path, default=None)
    args = p.parse_args(argv)
    if args.cmd == "standin":
        t0 = time.perf_counter()
        path = build_standin(args.out, epochs=args.epochs, seed=args.seed)
        print(f"stand-in foundation model: {path} ({time.perf_counter() - t0:.1f} s)")
        return 0
    rows = compare(args.out, args.seeds, args.iterations, args.standin)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
