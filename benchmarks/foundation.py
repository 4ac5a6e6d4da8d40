"""A stand-in foundation model (no downloads) and from-foundation vs from-scratch on a new alloy (issue 15).

    python benchmarks/foundation.py standin OUT.pt [--epochs 60] [--seed 0] [--kind small|proof]
    python benchmarks/foundation.py compare --out runs/foundation_bench [--seeds 0 1] [--iterations 3] [--kind proof]
    python benchmarks/foundation.py probe runs/foundation_bench/scratch_0 --labels 24 [--epochs 40 120 300]

``standin``: a small SchNet (alflow checkpoint) trained by the alflow trainer on EMT labels of
diverse structures of Cu, Ag, Au and Ni: fcc bulk at strains of -4 % to +4 %, rattled,
and the binary alloys CuNi and AgAu (random 8-atom decorations). No Cu-Au pair is in its data,
so Cu3Au is a system "it has not seen well". Used by tests/alflow/test_foundation.py (a
session fixture) and examples/foundation/.

``standin --kind proof``: the stronger stand-in of the issue-15 proof, a small MACE (``PROOF_HPARAMS``:
32 scalar channels, L <= 2 edge harmonics, correlation 2, 2 layers) trained on EMT labels of all seven EMT metals
(Al, Cu, Ag, Au, Ni, Pd, Pt: bulk strained and rattled, vacancies, (111) slabs) and binary alloys, Cu-Au
included but only on the Au-rich side (CuAu L1_0, CuAu3 L1_2, random Cu(1-x)Au(x) with x >= 0.5): a broad
foundation that has seen Cu-Au pairs but not Cu3Au (``proof_frames``).

``compare``: the alflow loop on Cu3Au (EMT oracle) from the stand-in (``potential.foundation``)
and from scratch (same architecture/hparams, random weights), same budgets, each seed; prints
the labels spent and the force RMSE on a fixed held-out Cu3Au test set after every iteration (two test sets:
rattled/strained and thermal MD), then for each target RMSE of ``--targets`` the labels each run needed
to reach it, the mean over seeds and the ratio
scratch/foundation. The foundation's curve starts with its zero-shot error (the aligned foundation, 0 labels
for the forces: the E0 alignment does not change forces).

``probe``: one model trained on the first labels of a compare run for several epoch counts (fresh, or
fine-tuned from ``--init-from``), both test errors: whether the loop's epochs, not its labels, limit a curve.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
PROOF_ELEMENTS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
PROOF_ALLOYS = (("Cu", "Ni"), ("Ag", "Au"), ("Pd", "Pt"), ("Cu", "Pd"), ("Ni", "Pt"), ("Ag", "Pd"), ("Al", "Ni"))
PROOF_HPARAMS = {"hidden_irreps": "32x0e", "max_ell": 2, "correlation": 2, "num_interactions": 2,
                 "num_radial_basis": 6, "radial_MLP": [32, 32], "MLP_irreps": "16x0e"}


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


def _split(frames: list, seed: int, one_in: int) -> tuple[list, list]:
    """Seeded (train, valid) split of ``frames``: every ``one_in``-th frame (at least 2) for validation."""
    order = np.random.default_rng(seed).permutation(len(frames))
    n_valid = max(2, len(frames) // one_in)
    return [frames[i] for i in order[n_valid:]], [frames[i] for i in order[:n_valid]]


def build_standin(path: str | os.PathLike, *, epochs: int = 60, seed: int = 0, n_per_system: int = 8) -> Path:
    """Train the stand-in (one SchNet, ``HPARAMS``) on ``standin_frames`` and save it (alflow checkpoint)."""
    import torch

    import potentials
    from alflow.config import TrainingConfig
    from alflow.train import train_potential

    frames = standin_frames(n_per_system, seed)
    train, valid = _split(frames, seed, 8)
    torch.manual_seed(seed)
    model = potentials.build("schnet", [28, 29, 47, 79], CUTOFF, **HPARAMS)
    cfg = TrainingConfig(epochs=epochs, batch_size=4, lr=5e-3, patience=epochs, forces_weight=10.0)
    train_potential(model, train, valid, cfg, device="cpu", seed=seed, progress=False)
    return potentials.save(model, path)


def _cubic(symbol: str, a: float, reps: tuple[int, int, int] = (2, 1, 1)) -> Any:
    from ase.build import bulk

    return bulk(symbol, "fcc", a=a, cubic=True).repeat(reps)


def _a_fcc(symbols: Any) -> float:
    """Vegard cubic lattice constant (Å) of a list of symbols (ASE reference lattice constants)."""
    from ase.build import bulk

    return float(np.mean([bulk(e).cell.cellpar()[0] / np.sqrt(0.5) for e in symbols]))


def _perturb(atoms: Any, rng: np.random.Generator, stdev: float, strain: float = 0.04) -> Any:
    atoms.set_cell(atoms.cell * (1 + rng.uniform(-strain, strain)), scale_atoms=True)
    atoms.rattle(stdev=stdev, seed=int(rng.integers(1 << 30)))
    return atoms


def proof_frames(seed: int = 0, n_bulk: int = 10, n_alloy: int = 6) -> list:
    """EMT-labelled training set of the proof stand-in (about 200 frames of 7-16 atoms).

    Per element of ``PROOF_ELEMENTS``: ``n_bulk`` fcc cells (8 atoms, strain +-4 %, rattle 0.03-0.15 Å),
    2 vacancy cells (15 atoms) and 2 (111) slabs (3 layers of 2x2, 10 Å vacuum, rattled). Per pair of
    ``PROOF_ALLOYS``: ``n_alloy`` random 8-atom decorations. Cu-Au only Au-rich: CuAu L1_0 and CuAu3 L1_2
    (4 each) and random Cu(1-x)Au(x) with 4 or 5 or 6 Au of 8 (8 frames); never Cu3Au's composition.
    """
    from ase.build import fcc111

    rng = np.random.default_rng(seed)
    frames = []

    def stdev(k: int, n: int) -> float:
        return 0.03 + 0.12 * k / max(1, n - 1)

    for e in PROOF_ELEMENTS:
        a = _a_fcc([e])
        for k in range(n_bulk):
            frames.append(_labelled(_perturb(_cubic(e, a), rng, stdev(k, n_bulk))))
        for k in range(2):
            atoms = _cubic(e, a, (2, 2, 1))
            del atoms[int(rng.integers(len(atoms)))]
            frames.append(_labelled(_perturb(atoms, rng, 0.05 + 0.05 * k, 0.02)))
            slab = fcc111(e, size=(2, 2, 3), a=a, vacuum=5.0, periodic=True)
            slab.rattle(stdev=0.05 + 0.05 * k, seed=int(rng.integers(1 << 30)))
            frames.append(_labelled(slab))
    for pair in PROOF_ALLOYS:
        for k in range(n_alloy):
            symbols = [pair[i] for i in rng.integers(0, 2, 8)]
            atoms = _cubic(pair[0], _a_fcc(symbols))
            atoms.symbols[:] = symbols
            frames.append(_labelled(_perturb(atoms, rng, stdev(k, n_alloy))))
    for k in range(4):  # CuAu L1_0 (Au on z = 0 planes) and CuAu3 L1_2 (Cu on the corner site)
        for n_au in (4, 6):
            atoms = _cubic("Au", 1.0)
            if n_au == 4:
                atoms.symbols[:] = ["Au" if abs(p[2]) < 1e-6 else "Cu" for p in atoms.get_scaled_positions()]
            else:
                atoms.symbols[[0, 4]] = "Cu"
            atoms.set_cell(atoms.cell * _a_fcc(atoms.get_chemical_symbols()), scale_atoms=True)
            frames.append(_labelled(_perturb(atoms, rng, stdev(k, 4), 0.03)))
    for k in range(8):
        n_au = int(rng.integers(4, 7))
        symbols = np.array(["Cu"] * 8)
        symbols[rng.permutation(8)[:n_au]] = "Au"
        atoms = _cubic("Cu", _a_fcc(symbols))
        atoms.symbols[:] = list(symbols)
        frames.append(_labelled(_perturb(atoms, rng, stdev(k, 8))))
    return frames


def build_proof_standin(path: str | os.PathLike, *, epochs: int = 150, seed: int = 0,
                        lr: float = 5e-3) -> Path:
    """Train the proof stand-in (one MACE, ``PROOF_HPARAMS``) on ``proof_frames`` and save it (alflow checkpoint)."""
    import torch

    import potentials
    from alflow.config import TrainingConfig
    from alflow.train import train_potential

    frames = proof_frames(seed)
    train, valid = _split(frames, seed, 10)
    torch.manual_seed(seed)
    species = sorted({int(z) for a in frames for z in a.numbers})
    model = potentials.build("mace", species, CUTOFF, **PROOF_HPARAMS)
    cfg = TrainingConfig(epochs=epochs, batch_size=4, lr=lr, patience=epochs, forces_weight=10.0,
                         schedule="cosine")
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


class Budget:
    """What both runs of a seed share (labels, iterations, epochs) and the fine-tuning knobs of the foundation run.

    ``lr_foundation``, ``freeze``, ``reinit_readout``, ``replay_frames`` and ``replay_weight`` apply to the
    foundation run only (a fine-tuning choice); ``lr`` to both unless ``lr_foundation`` is set. A plain class:
    this file is also loaded by ``importlib`` without a ``sys.modules`` entry (tests), which dataclasses need.
    """

    def __init__(self, kind: str = "small", iterations: int = 3, initial: int = 6, per_iteration: int = 6,
                 epochs: int = 40, committee: int = 3, lr: float = 3e-3, lr_foundation: float | None = None,
                 freeze: list[str] | None = None, reinit_readout: bool = False, replay_frames: int = 6,
                 replay_weight: float = 0.5, md_steps: int = 200) -> None:
        self.kind, self.iterations, self.initial, self.per_iteration = kind, iterations, initial, per_iteration
        self.epochs, self.committee, self.lr, self.lr_foundation = epochs, committee, lr, lr_foundation
        self.freeze, self.reinit_readout = list(freeze or []), reinit_readout
        self.replay_frames, self.replay_weight, self.md_steps = replay_frames, replay_weight, md_steps


def cu3au_md_test_set(n_per_temperature: int = 4, temperatures: tuple[float, ...] = (300.0, 600.0, 900.0),
                      seed: int = 321) -> list:
    """Held-out thermal Cu3Au: EMT Langevin MD (2 fs, friction 0.01/fs) of the L1_2 2x1x1 cell at each temperature (K),
    200 steps of equilibration, then a frame every 50 steps; EMT labels. The states the loop's walker visits."""
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    out = []
    for k, temperature in enumerate(temperatures):
        atoms = bulk("Cu", "fcc", a=3.75, cubic=True)
        atoms.symbols[0] = "Au"
        atoms = atoms.repeat((2, 1, 1))
        atoms.calc = EMT()
        rng = np.random.default_rng(seed + k)
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
        dyn = Langevin(atoms, 2.0 * units.fs, temperature_K=temperature, friction=0.01 / units.fs, rng=rng)
        dyn.run(200)
        for _ in range(n_per_temperature):
            dyn.run(50)
            frame = atoms.copy()
            out.append(_labelled(frame))
    return out


def _config(name: str, run_dir: Path, seed: int, foundation: str | None, iterations: int,
            budget: Budget | None = None) -> dict[str, Any]:
    from ase.build import bulk
    from ase.io import write

    b = budget or Budget(iterations=iterations)
    structure = run_dir.parent / "cu3au.extxyz"
    if not structure.is_file():
        atoms = bulk("Cu", "fcc", a=3.75, cubic=True)
        atoms.symbols[0] = "Au"
        write(structure, atoms.repeat((2, 1, 1)), format="extxyz")
    arch, hparams = ("mace", PROOF_HPARAMS) if b.kind == "proof" else ("schnet", HPARAMS)
    pot: dict[str, Any] = ({"foundation": foundation, "freeze": list(b.freeze), "reinit_readout": b.reinit_readout}
                           if foundation else {"architecture": arch, "cutoff": CUTOFF, "hparams": hparams})
    lr = (b.lr_foundation or b.lr) if foundation else b.lr
    return {"name": name, "run_dir": str(run_dir), "seed": seed,
            "system": {"structures": [str(structure)], "initial_rattle": {"n_frames": b.initial, "stdev": 0.05}},
            "potential": {**pot, "dtype": "float32"}, "committee": {"size": b.committee},
            "training": {"epochs": b.epochs, "batch_size": 4, "lr": lr, "patience": 15, "valid_fraction": 0.2,
                         "replay_frames": b.replay_frames if foundation else 20, "replay_weight": b.replay_weight},
            "exploration": {"walkers": [{"ensemble": "nvt-langevin", "temperature": 600, "steps": b.md_steps,
                                         "stride": 10, "timestep": 2.0}]},
            "selection": {"lower": 0.05, "upper": 2.0, "max_per_iteration": b.per_iteration},
            "labelling": {"oracle": "emt"}, "loop": {"max_iterations": b.iterations},
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


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """Fewest labels of ``curve`` ((labels, force RMSE eV/Å) pairs) at or below ``target``; None: never."""
    hits = [n for n, rmse in curve if rmse <= target]
    return min(hits) if hits else None


def summarise(rows: list[dict[str, Any]], targets: list[float], key: str = "test_forces_rmse") -> str:
    """Markdown: labels to reach each target RMSE (``key`` of the rows) per seed and mode, the mean over seeds,
    scratch/foundation (—: not reached within the budget)."""
    seeds = sorted({r["seed"] for r in rows})
    curves = {(r["seed"], r["mode"]): [] for r in rows}
    for r in rows:
        curves[(r["seed"], r["mode"])].append((r["labels_trained_on"], r[key]))
    lines = ["| target RMSE (eV/Å) | " + " | ".join(f"fnd s{s} | scr s{s}" for s in seeds)
             + " | mean fnd | mean scr | scr/fnd |",
             "|---:|" + "---:|---:|" * len(seeds) + "---:|---:|---:|"]
    for t in targets:
        cells, fnd, scr = [], [], []
        for s in seeds:
            f = labels_to_reach(curves.get((s, "foundation"), []), t)
            c = labels_to_reach(curves.get((s, "scratch"), []), t)
            cells += ["—" if f is None else str(f), "—" if c is None else str(c)]
            fnd.append(f)
            scr.append(c)
        mf = None if None in fnd else float(np.mean(fnd))
        ms = None if None in scr else float(np.mean(scr))
        n_max = max((n for (_, m), c in curves.items() if m == "scratch" for n, _ in c), default=0)
        if mf is None:
            ratio = "—"
        elif ms is None:
            ratio = f"> {n_max}/{mf:g}"  # scratch did not reach it within the budget
        else:
            ratio = "∞ (zero-shot)" if mf == 0 else f"{ms / mf:.1f}"
        lines.append(f"| {t:g} | " + " | ".join(cells) + f" | {'—' if mf is None else f'{mf:g}'} | "
                     f"{'—' if ms is None else f'{ms:g}'} | {ratio} |")
    return "\n".join(lines)


def curves_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: every row (seed, mode, labels trained on, both test force RMSEs)."""
    lines = ["| seed | mode | labels trained on | rattled test RMSE | MD test RMSE |", "|---:|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["seed"], r["mode"], r["iteration"])):
        lines.append(f"| {r['seed']} | {r['mode']} | {r['labels_trained_on']} | {r['test_forces_rmse']:.3f} | "
                     f"{r['md_forces_rmse']:.3f} |")
    return "\n".join(lines)


def compare(out: Path, seeds: list[int], iterations: int, standin: Path | None,
            budget: Budget | None = None, modes: tuple[str, ...] = ("foundation", "scratch"),
            reuse: bool = False) -> list[dict[str, Any]]:
    """Both runs per seed; rows of (seed, mode, iteration, labels_trained_on, test_forces_rmse); see module doc.

    The foundation run's first row (iteration -1, 0 labels) is the aligned foundation's zero-shot error.
    Two held-out Cu3Au test sets: ``test_forces_rmse`` on ``cu3au_test_set`` (rattled 0.05-0.15 Å, strained) and
    ``md_forces_rmse`` on ``cu3au_md_test_set`` (EMT MD at 300/600/900 K). Each run starts afresh (its
    directory removed) unless ``reuse``: then a finished run is only evaluated, and one that would go on under
    this budget (more iterations) is resumed.
    """
    from alflow.config import config_from_dict
    from alflow.foundation import ALIGNED_MODEL, foundation_dir
    from alflow.loop import read_state, run_is_complete, run_loop, stage_key

    b = budget or Budget(iterations=iterations)
    out.mkdir(parents=True, exist_ok=True)
    if standin is None:
        standin = out / ("standin_mace.pt" if b.kind == "proof" else "standin.pt")
        if not standin.is_file():
            (build_proof_standin if b.kind == "proof" else build_standin)(standin)
    standin = standin.resolve()
    tests = {"test_forces_rmse": cu3au_test_set(), "md_forces_rmse": cu3au_md_test_set()}
    rows = []
    for seed in seeds:
        for mode in modes:
            run_dir = out / f"{mode}_{seed}"
            cfg = config_from_dict(_config(f"{mode}_{seed}", run_dir, seed,
                                           str(standin) if mode == "foundation" else None, b.iterations, b), out)
            t0 = time.perf_counter()
            if not reuse:
                shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run (run_loop would resume an old one)
            if not run_is_complete(cfg):
                run_loop(cfg, force=True)  # with reuse: resumes, e.g. to more iterations
            state = read_state(run_dir)
            if mode == "foundation":
                aligned = foundation_dir(run_dir) / ALIGNED_MODEL
                rows.append({"seed": seed, "mode": mode, "iteration": -1, "labels_trained_on": 0,
                             **{k: force_rmse(str(aligned), t) for k, t in tests.items()}})
                print(json.dumps(rows[-1]), flush=True)
            labels = b.initial
            for it in state["iterations"]:
                i = it["iteration"]
                model = run_dir / stage_key("train", i) / "committee.pt"
                rows.append({"seed": seed, "mode": mode, "iteration": i, "labels_trained_on": labels,
                             **{k: force_rmse(str(model), t) for k, t in tests.items()}})
                labels = it["labels_total"]
                print(json.dumps(rows[-1]), flush=True)
            rows[-1]["seconds"] = time.perf_counter() - t0
            print(json.dumps({"seed": seed, "mode": mode, "status": state.get("status"),
                              "seconds": rows[-1]["seconds"]}), flush=True)
    return rows


def probe_epochs(run_dir: Path, n_labels: int, epochs: list[int], init_from: Path | None = None,
                 seed: int = 0) -> list[dict[str, Any]]:
    """One model on the first ``n_labels`` labels of a compare run (dataset shards in label order, 80/20 split,
    lr 3e-3), for each of ``epochs``: fresh ``PROOF_HPARAMS`` MACE, or fine-tuned from ``init_from`` (e.g. the run's
    ``foundation/aligned.pt``; no replay). Returns both test force RMSEs (eV/Å): is a run starved of epochs?"""
    import torch
    from ase.io import read

    import potentials
    from alflow.config import TrainingConfig
    from alflow.train import train_potential

    frames = [read(f) for f in sorted((run_dir / "dataset" / "shards").glob("*.extxyz"))][:n_labels]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(frames))
    n_valid = max(1, int(0.2 * len(frames)))
    valid, train = [frames[i] for i in order[:n_valid]], [frames[i] for i in order[n_valid:]]
    tests = {"test_forces_rmse": cu3au_test_set(), "md_forces_rmse": cu3au_md_test_set()}
    rows = []
    for n_epochs in epochs:
        torch.manual_seed(seed)
        model = (potentials.load(init_from) if init_from else
                 potentials.build("mace", sorted({int(z) for a in frames for z in a.numbers}), CUTOFF, **PROOF_HPARAMS))
        cfg = TrainingConfig(epochs=n_epochs, batch_size=4, lr=3e-3, patience=n_epochs, forces_weight=10.0)
        t0 = time.perf_counter()
        train_potential(model, train, valid, cfg, device="cpu", seed=seed, progress=False,
                        init_from=str(init_from) if init_from else None)
        path = run_dir / f"probe_{n_labels}_{n_epochs}.pt"
        potentials.save(model, path)
        rows.append({"labels": len(frames), "epochs": n_epochs, "init_from": str(init_from) if init_from else None,
                     **{k: force_rmse(str(path), t) for k, t in tests.items()}, "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("standin", help="train and save the stand-in foundation model")
    s.add_argument("out")
    s.add_argument("--epochs", type=int, default=None, help="default: 60 (small), 150 (proof)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--kind", choices=("small", "proof"), default="small",
                   help="small: the tests' SchNet (seconds); proof: the MACE of the issue-15 proof (minutes)")
    c = sub.add_parser("compare", help="from the stand-in vs from scratch on Cu3Au")
    c.add_argument("--out", type=Path, default=Path("runs/foundation_bench"))
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    c.add_argument("--iterations", type=int, default=3)
    c.add_argument("--standin", type=Path, default=None)
    c.add_argument("--kind", choices=("small", "proof"), default="small",
                   help="architecture of the scratch run and of a stand-in built here (proof: MACE)")
    c.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.2, 0.15, 0.1, 0.07, 0.05],
                   help="test force RMSEs (eV/Å) to report labels-to-reach for")
    c.add_argument("--initial", type=int, default=6, help="rattled initial labels")
    c.add_argument("--per-iteration", type=int, default=6, help="labels per iteration (at most)")
    c.add_argument("--epochs", type=int, default=40)
    c.add_argument("--committee", type=int, default=3)
    c.add_argument("--md-steps", type=int, default=200)
    c.add_argument("--lr", type=float, default=3e-3, help="learning rate (scratch; foundation unless --lr-foundation)")
    c.add_argument("--lr-foundation", type=float, default=None, help="learning rate of the foundation run")
    c.add_argument("--freeze", nargs="*", default=[], help="potential.freeze of the foundation run")
    c.add_argument("--reinit-readout", action="store_true", help="potential.reinit_readout of the foundation run")
    c.add_argument("--replay-frames", type=int, default=6, help="training.replay_frames of the foundation run")
    c.add_argument("--replay-weight", type=float, default=0.5)
    c.add_argument("--reuse", action="store_true",
                   help="keep run directories: evaluate finished runs, resume ones that would go on (more iterations)")
    c.add_argument("--modes", nargs="+", choices=("foundation", "scratch"), default=["foundation", "scratch"])
    q = sub.add_parser("probe", help="one model on a compare run's first labels, at several epoch counts")
    q.add_argument("run_dir", type=Path, help="a run directory of compare (e.g. runs/foundation_bench/scratch_0)")
    q.add_argument("--labels", type=int, required=True)
    q.add_argument("--epochs", type=int, nargs="+", default=[40, 120, 300])
    q.add_argument("--init-from", type=Path, default=None,
                   help="fine-tune this checkpoint (e.g. foundation/aligned.pt)")
    args = p.parse_args(argv)
    if args.cmd == "probe":
        probe_epochs(args.run_dir, args.labels, args.epochs, args.init_from)
        return 0
    if args.cmd == "standin":
        t0 = time.perf_counter()
        if args.kind == "proof":
            path = build_proof_standin(args.out, epochs=args.epochs or 150, seed=args.seed)
        else:
            path = build_standin(args.out, epochs=args.epochs or 60, seed=args.seed)
        print(f"stand-in foundation model: {path} ({time.perf_counter() - t0:.1f} s)")
        return 0
    budget = Budget(kind=args.kind, iterations=args.iterations, initial=args.initial,
                    per_iteration=args.per_iteration, epochs=args.epochs, committee=args.committee, lr=args.lr,
                    lr_foundation=args.lr_foundation, freeze=list(args.freeze), reinit_readout=args.reinit_readout,
                    replay_frames=args.replay_frames, replay_weight=args.replay_weight, md_steps=args.md_steps)
    print(json.dumps({"budget": budget.__dict__, "seeds": args.seeds}), flush=True)
    rows = compare(args.out, args.seeds, args.iterations, args.standin, budget, tuple(args.modes), args.reuse)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    print(curves_table(rows))
    for key in ("test_forces_rmse", "md_forces_rmse"):
        print(f"\nlabels to reach the target {key} (eV/Å)\n" + summarise(rows, args.targets, key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
