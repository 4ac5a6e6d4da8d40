"""Every registered architecture trained on the same data with the same budget: one table.

    python benchmarks/architectures.py [--seconds 60] [--frames 400] [--only schnet painn]

Datasets (labels from ASE's EMT, a real calculator): Cu (alflow.datasets.cu_emt_dataset: 32/108-atom
cells, MD at 300–1500 K, some strained) and a random fcc Cu–Ni alloy (32-atom cells, MD at
300–1200 K). Each architecture gets hyperparameters of similar size (~30–80 k parameters),
the same frames and split, and the same wall-time budget per dataset; one model each (not a
committee). Columns: parameters, energy MAE (meV/atom), force MAE/RMSE (eV/Å), stress RMSE
(meV/Å³) on the held-out test split, inference µs/atom for energy+forces at 108 and 2,048
atoms (float32, neighbor list included), training seconds per epoch.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta

import potentials
from alflow.config import TrainingConfig
from alflow.data import split
from alflow.datasets import cu_emt_dataset
from alflow.explore.evaluator import ModelEvaluator
from alflow.keys import REF_ENERGY, REF_FORCES, REF_STRESS
from alflow.train import train_potential

CACHE = Path(__file__).parent / ".cache"

# similar sizes (tens of thousands of parameters), chosen for a 4.5 Å cutoff on CPU
BENCH_HPARAMS: dict[str, dict] = {
    "schnet": {"n_atom_basis": 64, "n_filters": 64, "n_interactions": 3, "n_rbf": 20},
    "painn": {"n_atom_basis": 48, "n_interactions": 3, "n_rbf": 20},
    "dtnn": {"n_atom_basis": 64, "n_factors": 64, "n_interactions": 3, "n_rbf": 25},
    "physnet": {"n_atom_basis": 48, "n_modules": 2, "n_rbf": 24},
    "dimenetpp": {"hidden_channels": 32, "out_emb_channels": 64, "num_blocks": 2, "int_emb_size": 32, "basis_emb_size": 8},
    "tensornet": {"hidden_channels": 32, "num_layers": 2, "num_rbf": 24},
    "aimnet2": {"n_features": 32, "n_rbf": 12, "n_vector": 6, "hidden": [96, 64], "aim_size": 64},
    "ani": {},
    "sake": {"hidden_features": 48, "n_layers": 3, "n_heads": 4, "n_rbf": 24},
    "mace": {"hidden_irreps": "32x0e + 32x1o", "max_ell": 2, "correlation": 2, "num_interactions": 2,
             "num_radial_basis": 8, "radial_MLP": [32, 32], "MLP_irreps": "16x0e"},
}


def cuni_emt_dataset(n_frames: int, seed: int = 0) -> list[Atoms]:
    """Random fcc Cu–Ni alloys (32 atoms, 20–80 % Ni), Langevin MD with EMT at 300–1200 K."""
    rng = np.random.default_rng(seed)
    frames: list[Atoms] = []
    while len(frames) < n_frames:
        atoms = bulk("Cu", "fcc", a=3.58, cubic=True).repeat(2)
        ni = rng.random(len(atoms)) < rng.uniform(0.2, 0.8)
        atoms.numbers[ni] = 28
        atoms.set_cell(atoms.cell.array * (1 + rng.uniform(-0.02, 0.02)), scale_atoms=True)
        atoms.calc = EMT()
        temperature = float(rng.uniform(300, 1200))
        thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
        dyn = Langevin(atoms, 2 * units.fs, temperature_K=temperature, friction=0.02, rng=rng, fixcm=False)
        dyn.run(100)
        for _ in range(10):
            dyn.run(20)
            frame = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)
            frame.info[REF_ENERGY] = atoms.get_potential_energy()
            frame.arrays[REF_FORCES] = atoms.get_forces()
            frame.info[REF_STRESS] = atoms.get_stress()
            frames.append(frame)
    return frames[:n_frames]


def inference_us_per_atom(model: torch.nn.Module, n_cells: int) -> float:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(n_cells)
    atoms.rattle(0.02, seed=0)
    evaluate = ModelEvaluator(model.float(), device="cpu")
    evaluate([atoms], stress=False)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        evaluate([atoms], stress=False)
        times.append(time.perf_counter() - t)
    return min(times) / len(atoms) * 1e6


def run(name: str, frames: list[Atoms], species: list[str], seconds: float, cutoff: float, seed: int) -> dict:
    train_idx, valid_idx, test_idx = split(len(frames), (0.8, 0.1, 0.1), seed=seed)
    torch.manual_seed(seed)
    model = potentials.build(name, species=species, cutoff=cutoff, **BENCH_HPARAMS.get(name, {}))
    n_params = sum(p.numel() for p in model.parameters())
    config = TrainingConfig(epochs=10_000, batch_size=8, lr=2e-3, patience=10_000, max_time_s=seconds,
                            forces_weight=10.0, energy_weight=1.0, stress_weight=0.0)
    result = train_potential(model, [frames[i] for i in train_idx], [frames[i] for i in valid_idx], config,
                             test_frames=[frames[i] for i in test_idx], device="cpu", seed=seed, progress=False)
    test = result.metrics["test"]
    return {"params": n_params, "test": test, "s_per_epoch": result.seconds / max(result.epochs, 1),
            "epochs": result.epochs, "model": model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training wall time per architecture and dataset")
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--cutoff", type=float, default=4.5)
    parser.add_argument("--only", nargs="*", help="architectures (default: all registered)")
    parser.add_argument("--no-alloy", action="store_true")
    args = parser.parse_args()
    CACHE.mkdir(exist_ok=True)
    datasets = {"Cu (EMT)": (cu_emt_dataset(n_frames=max(args.frames, 500), path=CACHE / "cu_emt_500.extxyz")[: args.frames], ["Cu"])}
    if not args.no_alloy:
        datasets["CuNi alloy (EMT)"] = (cuni_emt_dataset(args.frames), ["Cu", "Ni"])
    names = args.only or potentials.available()
    print(f"# architectures — {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"{args.frames} frames (80/10/10), {args.seconds:.0f} s training each, cutoff {args.cutoff} Å, {time.strftime('%Y-%m-%d')}")
    for title, (frames, species) in datasets.items():
        print(f"\n## {title}\n")
        print("| architecture | params | E MAE (meV/atom) | F MAE (eV/Å) | F RMSE (eV/Å) | σ RMSE (meV/Å³) | µs/atom @108 | µs/atom @2048 | s/epoch | epochs |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in names:
            try:
                r = run(name, frames, species, args.seconds, args.cutoff, seed=0)
            except Exception as exc:  # noqa: BLE001 - report and continue with the next architecture
                print(f"| {name} | failed: {type(exc).__name__}: {exc} |||||||||")
                continue
            t = r["test"]
            small = inference_us_per_atom(r["model"], 3) if title.startswith("Cu ") else float("nan")
            large = inference_us_per_atom(r["model"], 8) if title.startswith("Cu ") else float("nan")
            stress = t.get("stress_rmse")
            print(f"| {name} | {r['params']:,} | {1e3 * t['energy_mae']:.2f} | {t['forces_mae']:.3f} | "
                  f"{t['forces_rmse']:.3f} | {'—' if stress is None else f'{1e3 * stress:.2f}'} | {small:.0f} | {large:.0f} | "
                  f"{r['s_per_epoch']:.2f} | {r['epochs']} |", flush=True)


if __name__ == "__main__":
    main()
