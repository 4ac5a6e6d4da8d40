"""i-PI engine: N walkers concurrently with one driver vs the same walkers one after another.

    python benchmarks/ipi_walkers.py [--walkers 4] [--atoms 32] [--steps 100]

A SchNet committee of 3 (16 features, 2 interactions, cutoff 4 Å, float64), fcc Cu cells,
nvt-svr at 300 K, 1 fs. "sequential" runs each walker through ``run_ipi`` (its own i-PI
server and driver, as the i-PI engine did before), "concurrent" all of them through
``run_ipi_walkers`` (every server at once, one driver, gathered committee calls). Wall
time includes starting i-PI and the driver (a few seconds of imports each).
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from ase.build import bulk

import potentials
from alflow.explore.ipi import IPIRunSpec, run_ipi, run_ipi_walkers
from potentials.committee import Committee


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--walkers", type=int, default=4)
    parser.add_argument("--atoms", type=int, default=32, help="4 n^3 (32, 108, 256)")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Committee.build("schnet", 3, species=["Cu"], cutoff=4.0, seed=1, n_atom_basis=16, n_filters=16,
                            n_interactions=2, n_rbf=10).double()
    reps = round((args.atoms / 4) ** (1 / 3))
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(reps)
    with tempfile.TemporaryDirectory() as tmp:
        path = potentials.save(model, Path(tmp) / "committee.pt")
        specs = [IPIRunSpec(atoms=atoms, ensemble="nvt-svr", steps=args.steps, stride=args.steps, seed=i, name=f"w{i}")
                 for i in range(args.walkers)]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        sequential = [run_ipi(s, path, Path(tmp) / "seq" / s.name, device="cpu") for s in specs]
        t_seq = time.perf_counter() - start
        start = time.perf_counter()
        concurrent = run_ipi_walkers(specs, path, Path(tmp) / "con", device="cpu")
        t_con = time.perf_counter() - start
        assert all(r.status == "DONE" for r in sequential + concurrent), [r.message for r in sequential + concurrent]
        served = re.search(r"(\d+) evaluations in (\d+) committee calls", (Path(tmp) / "con" / "driver.log").read_text())
    print(f"# {args.walkers} walkers x {len(atoms)} atoms x {args.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
    print("| walkers | atoms | steps | one after another (s) | concurrent, one driver (s) | speed-up | evaluations / committee calls |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.walkers} | {len(atoms)} | {args.steps} | {t_seq:.1f} | {t_con:.1f} | {t_seq / t_con:.2f}× "
          f"| {served[1]} / {served[2]} |")


if __name__ == "__main__":
    main()
