"""Oracle cost and robustness: seconds per label and failure rate on hard frames, for each installed oracle.

    python benchmarks/oracles.py [--oracles emt gpaw espresso cp2k xtb chgnet] [--repeats 2] [--quick]

Every label goes through ``alflow.label.run_calculation`` (isolated subprocess,
1 thread), so "wall" includes the worker start (Python + the code's imports)
and "compute" is the calculation alone as the worker timed it. Cells:
Si 2 atoms (primitive diamond, rattled 0.05 Å), Si 8 atoms (conventional cubic
cell, rattled), Cu 32 atoms (EMT only). Hard frames: two atoms 0.7 Å apart,
+40 % hydrostatic strain, 25 % shear, a 0.5 Å rattle, and an isolated-ish Si
pair in a mostly empty cell. Settings are the benchmark defaults below (small
but converged enough to be meaningful for Si); k-points Γ-centred at 1.9 per Å⁻¹.
Prints a markdown table with the date and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.units import Rydberg

from alflow.label import run_calculation
from alflow.oracles import kpoint_grid

KDENSITY = 1.9  # points per Å⁻¹: Si2 4x4x4, Si8 3x3x3
SETTINGS = {
    "emt": {},
    "gpaw": {"mode": {"name": "pw", "ecut": 350}},
    "espresso": {"ecutwfc": 30},
    "cp2k": {"cutoff": 300 * Rydberg, "rel_cutoff": 50},
    "xtb": {},
    "chgnet": {},
    "sevenn": {},
}
USES_K = ("gpaw", "espresso", "cp2k")


def installed(oracle: str) -> bool:
    from alflow.oracles import missing_requirement  # the oracle table knows each code's module or executable

    return missing_requirement(oracle, SETTINGS.get(oracle, {})) is None


def cells() -> dict[str, Atoms]:
    si2 = bulk("Si", "diamond", a=5.43)
    si2.rattle(0.05, seed=0)
    si8 = bulk("Si", "diamond", a=5.43, cubic=True)
    si8.rattle(0.05, seed=1)
    cu32 = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    cu32.rattle(0.05, seed=2)
    return {"Si2": si2, "Si8": si8, "Cu32": cu32}


def hard_frames() -> dict[str, Atoms]:
    base = bulk("Si", "diamond", a=5.43)
    close = base.copy()
    close.positions[1] = close.positions[0] + [0.7 / np.sqrt(3)] * 3
    stretched = base.copy()
    stretched.set_cell(base.cell * 1.4, scale_atoms=True)
    sheared = base.copy()
    sheared.set_cell(np.asarray(base.cell) @ np.array([[1, 0.25, 0], [0, 1, 0], [0, 0, 1]]), scale_atoms=True)
    hot = base.copy()
    hot.rattle(0.5, seed=3)
    sparse = Atoms("Si2", positions=[[0, 0, 0], [2.3, 0, 0]], cell=[6.0, 6.0, 6.0], pbc=True)
    return {"0.7 Å pair": close, "+40 % strain": stretched, "25 % shear": sheared, "0.5 Å rattle": hot,
            "Si2 in vacuum box": sparse}


def label(oracle: str, atoms: Atoms, workdir: Path, timeout: float) -> tuple[str, float, float]:
    out = run_calculation(atoms, oracle, SETTINGS[oracle], workdir, kpoint_density=KDENSITY if oracle in USES_K else None,
                          timeout_s=timeout, threads=1)
    compute = out.result["elapsed_s"] if out.result else float("nan")
    return out.status, out.elapsed_s, compute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--oracles", nargs="+", default=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0, help="per calculation (s)")
    parser.add_argument("--quick", action="store_true", help="Si2 only, one repeat, no hard frames")
    parser.add_argument("--sevenn-path", default=None, help="pip --target dir holding sevenn (see docs/labelling.md)")
    args = parser.parse_args()
    if args.sevenn_path:
        SETTINGS["sevenn"] = {"worker_pythonpath": args.sevenn_path}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="alflow-bench-oracles-"))
    rows, fail_rows = [], []
    structures = cells()
    for oracle in args.oracles:
        if not installed(oracle):
            rows.append(f"| {oracle} | - | not installed | | | |")
            continue
        for name, atoms in structures.items():
            if (name == "Cu32") != (oracle == "emt") or (args.quick and name != "Si2"):
                continue
            walls, computes, statuses = [], [], []
            for r in range(1 if args.quick else args.repeats):
                status, wall, compute = label(oracle, atoms, work / f"{oracle}-{name}-{r}", args.timeout)
                statuses.append(status)
                walls.append(wall)
                computes.append(compute)
            k = "x".join(map(str, kpoint_grid(atoms.cell, atoms.pbc, KDENSITY))) if oracle in USES_K else "Γ/none"
            ok = all(s == "labelled" for s in statuses)
            rows.append(f"| {oracle} | {name} ({len(atoms)} atoms) | {statistics.median(walls):.2f} | "
                        f"{statistics.median(computes):.2f} | {k} | {'ok' if ok else ', '.join(statuses)} |")
            print(rows[-1], flush=True)
        if args.quick or oracle == "emt":
            continue
        outcomes = {}
        for name, atoms in hard_frames().items():
            t0 = time.perf_counter()
            status, _, _ = label(oracle, atoms, work / f"{oracle}-hard-{name.replace(' ', '_')}", args.timeout)
            outcomes[name] = f"{status} ({time.perf_counter() - t0:.0f} s)"
        n_fail = sum(not v.startswith("labelled") for v in outcomes.values())
        fail_rows.append(f"| {oracle} | {n_fail}/{len(outcomes)} | " + "; ".join(f"{k}: {v}" for k, v in outcomes.items()) + " |")
        print(fail_rows[-1], flush=True)
    from alflow.config import SelectionConfig
    from alflow.select import physical_rejection

    filters = [f"| {name} | {physical_rejection(atoms, SelectionConfig()) or 'passes'} |"
               for name, atoms in hard_frames().items()]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    print(f"\n### Oracle cost ({date}, {machine}, 1 thread per calculation, k-point density {KDENSITY} per Å⁻¹)\n")
    print("| oracle | cell | wall s/label (median) | compute s | k-points | status |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if fail_rows:
        print("\n### Failure rate on hard frames (label status; a 'labelled' hard frame is not necessarily physical)\n")
        print("| oracle | failed | per frame |")
        print("|---|---|---|")
        print("\n".join(fail_rows))
    print("\n### What alflow's physical filters (SelectionConfig defaults) say about the hard frames\n")
    print("| frame | filter |")
    print("|---|---|")
    print("\n".join(filters))


if __name__ == "__main__":
    main()
