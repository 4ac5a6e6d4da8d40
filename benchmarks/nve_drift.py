"""NVE energy drift through both engines, same committee and start (eV/atom/ps).

    python benchmarks/nve_drift.py [--steps 400] [--timestep 1.0]

A committee of 3 small SchNet models (float64, random weights scaled to a bound crystal),
32-atom fcc Cu at 300 K. ASE: VelocityVerlet through alflow's walker; i-PI: nve through
alflow ipi-driver. Drift = slope of a linear fit of the conserved energy vs time, per atom.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import bulk
from ase.io import read

import potentials
from alflow import keys
from alflow.explore.ase_md import WalkerSpec, run_walkers
from alflow.explore.ipi import IPIRunSpec, run_ipi
from potentials.committee import Committee


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--timestep", type=float, default=1.0, help="fs")
    args = parser.parse_args()
    torch.manual_seed(0)
    committee = Committee.build("schnet", 3, species=["Cu"], cutoff=4.0, seed=1, n_atom_basis=16, n_filters=16,
                                n_interactions=2, n_rbf=10).double()
    for m in committee.members:
        m.scale.fill_(0.05)
    tmp = Path(tempfile.mkdtemp(prefix="alflow-nve-"))
    potentials.save(committee, tmp / "committee.pt")
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    n = len(atoms)
    spec = WalkerSpec(atoms=atoms, ensemble="nve", temperature=300.0, timestep=args.timestep, steps=args.steps, stride=10, name="nve")
    [result] = run_walkers([spec], committee, tmp / "ase", upper=1e9, progress=False, device="cpu")
    frames = read(result.trajectory, ":")
    t_ps = np.array([f.info[keys.STEP] for f in frames]) * args.timestep / 1000
    total = np.array([f.info[keys.PRED_ENERGY] + 0.5 * np.sum(f.get_masses()[:, None] * f.get_velocities() ** 2) for f in frames])
    ase_drift = np.polyfit(t_ps, total, 1)[0] / n
    ipi = run_ipi(IPIRunSpec(atoms=atoms, ensemble="nve", temperature=300.0, timestep=args.timestep, steps=args.steps, stride=10,
                             name="nve"), tmp / "committee.pt", tmp / "ipi", wall_seconds=600, device="cpu")
    assert ipi.status == "DONE", ipi.message
    out = np.loadtxt(tmp / "ipi" / "simulation.out")
    ipi_drift = np.polyfit(out[:, 1], out[:, 2], 1)[0] / n
    print(f"# NVE drift, 32-atom Cu, {args.steps} steps of {args.timestep} fs, float64 committee of 3 — {time.strftime('%Y-%m-%d')}")
    print("| engine | drift (eV/atom/ps) | std of the conserved energy (µeV/atom) |")
    print("|---|---:|---:|")
    print(f"| ASE walker (VelocityVerlet) | {ase_drift:+.2e} | {1e6 * total.std() / n:.2f} |")
    print(f"| i-PI (nve, alflow ipi-driver) | {ipi_drift:+.2e} | {1e6 * out[:, 2].std() / n:.2f} |")


if __name__ == "__main__":
    main()
