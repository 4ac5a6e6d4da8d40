"""Every registered architecture trained on the same data with the same epoch budget: one table.

    python benchmarks/architectures.py --epochs 30 --frames 150 [--only schnet painn] [--datasets cu cuni]
    python benchmarks/architectures.py --table            # print the tables from the cache only

Datasets (labels from ASE's EMT, a real calculator): Cu (``alflow.datasets.cu_emt_dataset``:
Langevin MD at 300–1500 K, half the runs strained up to ±3 %, cubic cells of ``--cu-sizes``
atoms) and a random fcc Cu–Ni alloy (32-atom cells, 20–80 % Ni, MD at 300–1200 K, ±2 % volume).
Every architecture gets hyperparameters of similar size (``BENCH_HPARAMS``, ~30–80 k
parameters), the same frames and split (80/10/10), the same optimiser, learning rate, batch
size, loss weights, LR schedule and early stopping (``alflow.train.train_potential``) and the
same number of epochs; ``--seconds`` is only a safety cap. One model each (not a committee).

Columns: parameters, learning rate, test-split energy MAE (meV/atom), force MAE/RMSE (eV/Å),
force RMSE relative to the best in the table, stress RMSE (meV/Å³; not trained on, loss weight
0), inference µs/atom for energy+forces at 108 and 2,048 atoms (float32, one structure,
neighbor list included; measured on the Cu models only), training seconds per epoch
(validation included), epochs run / best epoch.

Resumable: each (dataset, architecture, settings) result goes to ``--out`` (JSON) as soon as
it is done, with the trained model next to it; a rerun with the same settings skips finished
entries (and only measures the missing inference timings), so the run can be split with
``--only``. The tables are printed from the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

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
DEFAULT_OUT = CACHE / "architectures.json"

# similar sizes (~30–80 k parameters at a 4.5 Å cutoff; counts printed in the table).
# ANI has one MLP per element on an AEV whose length grows with the number of species pairs:
# 32 k parameters for Cu, 88 k for Cu–Ni (two 44 k networks; each atom uses one).
BENCH_HPARAMS: dict[str, dict] = {
    "schnet": {"n_atom_basis": 64, "n_filters": 64, "n_interactions": 3, "n_rbf": 20},
    "painn": {"n_atom_basis": 40, "n_interactions": 3, "n_rbf": 20},
    "dtnn": {"n_atom_basis": 64, "n_factors": 64, "n_interactions": 3, "n_rbf": 25},
    "physnet": {"n_atom_basis": 48, "n_modules": 2, "n_rbf": 24},
    "dimenetpp": {"hidden_channels": 32, "out_emb_channels": 64, "num_blocks": 2, "int_emb_size": 32, "basis_emb_size": 8},
    "tensornet": {"hidden_channels": 32, "num_layers": 2, "num_rbf": 24},
    "aimnet2": {"n_features": 16, "n_rbf": 8, "n_vector": 4, "hidden": [64, 48], "aim_size": 48},
    "ani": {"hidden": [144, 112, 80]},
    "sake": {"hidden_features": 24, "n_layers": 3, "n_heads": 4, "n_rbf": 24},
    "mace": {"hidden_irreps": "32x0e + 32x1o", "max_ell": 2, "correlation": 2, "num_interactions": 2,
             "num_radial_basis": 8, "radial_MLP": [32, 32], "MLP_irreps": "16x0e"},
}

DATASETS = {"cu": ("Cu (EMT)", ["Cu"]), "cuni": ("CuNi alloy (EMT)", ["Cu", "Ni"])}


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


def load_dataset(key: str, n_frames: int, cu_sizes: list[int]) -> list[Atoms]:
    if key == "cu":
        tag = "-".join(str(s) for s in cu_sizes)
        return cu_emt_dataset(n_frames=n_frames, sizes=cu_sizes, path=CACHE / f"cu_emt_{n_frames}_{tag}.extxyz")
    return cuni_emt_dataset(n_frames)


def inference_us_per_atom(model: torch.nn.Module, n_cells: int, repeats: int) -> float:
    """Best of ``repeats`` timed energy+forces calls (after one warm-up) on a rattled fcc Cu supercell, µs/atom."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(n_cells)
    atoms.rattle(0.02, seed=0)
    evaluate = ModelEvaluator(model.float(), device="cpu")
    evaluate([atoms], stress=False)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        evaluate([atoms], stress=False)
        times.append(time.perf_counter() - t)
    return min(times) / len(atoms) * 1e6


def settings_of(args: argparse.Namespace, dataset: str, name: str) -> dict[str, Any]:
    """Everything that defines one result (the cache key hashes it)."""
    return {
        "dataset": dataset, "architecture": name, "hparams": BENCH_HPARAMS.get(name, {}), "frames": args.frames,
        "cu_sizes": args.cu_sizes if dataset == "cu" else [32], "epochs": args.epochs, "lr": lr_of(args, name),
        "batch_size": args.batch_size, "patience": args.patience, "seconds_cap": args.seconds,
        "cutoff": args.cutoff, "seed": args.seed, "threads": args.threads,
    }


def key_of(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def lr_of(args: argparse.Namespace, name: str) -> float:
    return float(args.lr_for.get(name, args.lr))


def read_cache(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_cache(path: Path, cache: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(cache, indent=1, default=float))
    os.replace(tmp, path)


def train_one(args: argparse.Namespace, settings: dict[str, Any], frames: list[Atoms], species: list[str],
              checkpoint: Path) -> dict[str, Any]:
    train_idx, valid_idx, test_idx = split(len(frames), (0.8, 0.1, 0.1), seed=args.seed)
    torch.manual_seed(args.seed)
    name = settings["architecture"]
    model = potentials.build(name, species=species, cutoff=args.cutoff, **settings["hparams"])
    config = TrainingConfig(epochs=args.epochs, batch_size=args.batch_size, lr=settings["lr"], patience=args.patience,
                            max_time_s=args.seconds, forces_weight=10.0, energy_weight=1.0, stress_weight=0.0)
    load0 = os.getloadavg()[0]
    result = train_potential(model, [frames[i] for i in train_idx], [frames[i] for i in valid_idx], config,
                             test_frames=[frames[i] for i in test_idx], device="cpu", seed=args.seed, progress=False)
    potentials.save(model, checkpoint)
    history = result.history
    train_seconds = history[-1]["seconds"] - history[0]["seconds"]
    return {
        "settings": settings, "params": sum(p.numel() for p in model.parameters()), "test": result.metrics["test"],
        "valid": result.metrics["valid"], "epochs": result.epochs, "best_epoch": result.best_epoch,
        "stop_reason": result.stop_reason, "seconds": result.seconds, "s_per_epoch": train_seconds / max(result.epochs, 1),
        "valid_forces_rmse": [h["valid_forces_rmse"] for h in history], "lr_final": history[-1]["lr"],
        "checkpoint": checkpoint.name, "load_average": [load0, os.getloadavg()[0]],
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "inference": {},
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{scale * value:.{digits}f}"


def print_tables(args: argparse.Namespace, cache: dict[str, Any], names: list[str]) -> None:
    print(f"# architectures — {args.frames} frames (80/10/10), {args.epochs} epochs, batch {args.batch_size}, "
          f"patience {args.patience}, cutoff {args.cutoff} Å, {args.threads} thread(s)")
    for dataset in args.datasets:
        title, _ = DATASETS[dataset]
        rows = [(n, cache.get(key_of(settings_of(args, dataset, n)))) for n in names]
        done = [r for _, r in rows if r is not None]
        best = min((r["test"]["forces_rmse"] for r in done), default=float("nan"))
        sizes = "/".join(str(s) for s in (args.cu_sizes if dataset == "cu" else [32]))
        print(f"\n### {title}, {sizes}-atom cells\n")
        print("| architecture | params | lr | E MAE (meV/atom) | F MAE (eV/Å) | F RMSE (eV/Å) | F RMSE / best | "
              "σ RMSE (meV/Å³) | µs/atom @108 | µs/atom @2048 | s/epoch | epochs (best) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in rows:
            if r is None:
                print(f"| {name} | not run |||||||||||")
                continue
            t, inf = r["test"], r["inference"]
            print(f"| {name} | {r['params']:,} | {r['settings']['lr']:g} | {fmt(t['energy_mae'], 1e3, 2)} | "
                  f"{fmt(t['forces_mae'], 1, 4)} | {fmt(t['forces_rmse'], 1, 4)} | {t['forces_rmse'] / best:.1f}× | "
                  f"{fmt(t.get('stress_rmse'), 1e3, 2)} | {fmt(inf.get('108'), 1, 0)} | {fmt(inf.get('2048'), 1, 0)} | "
                  f"{r['s_per_epoch']:.1f} | {r['epochs']} ({r['best_epoch']}) |")
        loads = [x for r in done for x in r["load_average"]]
        if loads:
            print(f"\nload average during training: {min(loads):.1f}–{max(loads):.1f}; "
                  f"CPU: {done[0]['cpu']}; total training {sum(r['seconds'] for r in done) / 60:.1f} min")


def parse_lr_for(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--lr-for: expected NAME=LR, got {item!r}")
        out[name] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs per architecture and dataset (the budget)")
    parser.add_argument("--seconds", type=float, default=None, help="optional safety cap on training wall time (s)")
    parser.add_argument("--frames", type=int, default=150, help="frames per dataset, split 80/10/10")
    parser.add_argument("--cu-sizes", type=int, nargs="+", default=[32], help="Cu cell sizes (atoms): 32, 108")
    parser.add_argument("--cutoff", type=float, default=4.5)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lr-for", nargs="*", default=[], metavar="NAME=LR", help="per-architecture learning rate")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--patience", type=int, default=12, help="early stopping; the LR halves after patience//3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="architectures (default: all registered)")
    parser.add_argument("--datasets", nargs="+", default=["cu", "cuni"], choices=sorted(DATASETS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results cache (JSON)")
    parser.add_argument("--no-inference", action="store_true", help="skip the µs/atom timings (fill them in later)")
    parser.add_argument("--repeats", type=int, default=3, help="timed inference calls (best of)")
    parser.add_argument("--table", action="store_true", help="only print the tables from the cache")
    args = parser.parse_args()
    args.lr_for = parse_lr_for(args.lr_for)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*TorchScript type system.*")
    names = args.only or potentials.available()
    unknown = sorted(set(names) - set(potentials.available()))
    if unknown:
        raise SystemExit(f"--only: unknown architecture(s) {unknown}; available: {potentials.available()}")
    cache = read_cache(args.out)
    models_dir = args.out.with_suffix("")
    if not args.table:
        for dataset in args.datasets:
            title, species = DATASETS[dataset]
            frames = None
            for name in names:
                settings = settings_of(args, dataset, name)
                key = key_of(settings)
                if key not in cache:
                    frames = frames or load_dataset(dataset, args.frames, args.cu_sizes)
                    print(f"[{time.strftime('%H:%M:%S')}] {title}: training {name} ...", flush=True)
                    try:
                        cache[key] = train_one(args, settings, frames, species, models_dir / f"{key}.pt")
                    except Exception as exc:  # noqa: BLE001 - report and continue with the next architecture
                        print(f"  {name} failed: {type(exc).__name__}: {exc}", flush=True)
                        continue
                    r = cache[key]
                    print(f"  {r['params']:,} params, {r['epochs']} epochs in {r['seconds']:.0f} s "
                          f"({r['stop_reason']}), test F RMSE {r['test']['forces_rmse']:.4f} eV/Å", flush=True)
                    write_cache(args.out, cache)
                entry = cache[key]
                if dataset == "cu" and not args.no_inference and not {"108", "2048"} <= set(entry["inference"]):
                    model = potentials.load(models_dir / entry["checkpoint"], device="cpu")
                    entry["inference"] = {str(4 * n**3): inference_us_per_atom(model, n, args.repeats) for n in (3, 8)}
                    print(f"  {name} inference µs/atom: {entry['inference']}", flush=True)
                    write_cache(args.out, cache)
    print_tables(args, cache, names)


if __name__ == "__main__":
    main()
