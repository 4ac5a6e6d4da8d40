"""Molecular dynamics for the RDF gate: the same seeded Langevin run with the committee and with the oracle.

``sample(atoms, calc, md)`` runs ASE's Langevin thermostat (``ase.md.langevin``) at ``md['temperature']``
K with a ``md['timestep']`` fs step: ``md['equilibration']`` steps, then ``md['steps']`` steps keeping
every ``md['steps'] // md['samples']``-th frame with its energy (eV), forces (eV/Å) and, for 3D-periodic
cells, stress (eV/Å³). Velocities and thermostat noise come from ``md['seed']``, so both runs start alike
(they still decorrelate: only their statistics are compared).

The oracle run is isolated like a label: ``python -P -m alflow.gate_md <task.json>`` builds the oracle
with ``alflow.oracles.build_calculator`` in the task directory and appends each sampled frame to
``frames.extxyz`` as soon as it exists (a killed run keeps its frames); ``run_isolated`` starts it with a
timeout (``alflow.process``: own session, dies with the parent).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units

from alflow.keys import REF_ENERGY, REF_FORCES, REF_STRESS

FRAMES = "frames.extxyz"
TASK = "task.json"
LOG = "worker.log"


def _labelled_copy(atoms: Atoms, stress: bool) -> Atoms:
    out = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell.array, pbc=atoms.pbc)
    out.info[REF_ENERGY] = float(atoms.get_potential_energy())
    out.arrays[REF_FORCES] = np.asarray(atoms.get_forces(), float)
    if stress:
        out.info[REF_STRESS] = np.asarray(atoms.get_stress(voigt=True), float)
    return out


def sample(atoms: Atoms, calc: Any, md: dict[str, Any], sink: Any = None) -> list[Atoms]:
    """Seeded Langevin MD of a copy of ``atoms`` with ``calc``; the sampled frames, labelled (module docstring).

    ``sink(frame)`` (optional) is called with each sampled frame as soon as it exists.
    """
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, thermalize_momenta

    a = atoms.copy()
    a.calc = calc
    rng = np.random.default_rng(int(md.get("seed", 0)))
    temperature = float(md["temperature"])
    thermalize_momenta(a, temperature, rng=rng)
    Stationary(a)
    a.set_constraint(FixCom())
    dyn = Langevin(a, float(md.get("timestep", 2.0)) * units.fs, temperature_K=temperature,
                   friction=float(md.get("friction", 0.01)) / units.fs, fixcm=False, rng=rng)
    if int(md.get("equilibration", 0)):
        dyn.run(int(md["equilibration"]))
    samples = int(md["samples"])
    stride = max(1, int(md["steps"]) // samples)
    stress = bool(md.get("stress", False)) and bool(a.pbc.all())
    out = []
    for _ in range(samples):
        dyn.run(stride)
        frame = _labelled_copy(a, stress)
        if not np.all(np.isfinite(frame.arrays[REF_FORCES])) or np.abs(frame.positions).max() > 1e5:
            raise RuntimeError(f"the MD exploded after {len(out) * stride} sampled steps (non-finite forces "
                               "or atoms far away)")
        out.append(frame)
        if sink is not None:
            sink(frame)
    return out


def average_rdf(frames: list[Atoms], rmax: float, nbins: int) -> tuple[np.ndarray, np.ndarray]:
    """Radial distribution function g(r) averaged over ``frames`` (all pairs, ase.geometry.rdf); (r Å, g)."""
    from ase.geometry.rdf import get_rdf

    gs, r = [], None
    for atoms in frames:
        g, r = get_rdf(atoms, rmax, nbins)
        gs.append(g)
    return np.asarray(r, float), np.mean(gs, axis=0)


# --------------------------------------------------------------------------- the isolated oracle run


def run_isolated(atoms: Atoms, labelling: Any, md: dict[str, Any], taskdir: Path, timeout_s: float) -> list[Atoms]:
    """The oracle's MD (``labelling``: oracle, parameters, k-points, threads) in an isolated worker process.

    Returns the sampled frames; raises RuntimeError with the worker's log tail when it fails or times out
    (frames sampled before that stay in ``taskdir/frames.extxyz``).
    """
    from alflow import process
    from alflow.fileio import atomic_write_text
    from alflow.label import WORKER_PYTHONPATH, _attempt_parameters, _worker_env

    taskdir.mkdir(parents=True, exist_ok=True)
    (taskdir / FRAMES).unlink(missing_ok=True)
    parameters = _attempt_parameters(labelling, 0)  # with labelling.mpi_command's launcher, as a label gets it
    pythonpath = parameters.pop(WORKER_PYTHONPATH, None) or []
    task = {"oracle": labelling.oracle, "parameters": parameters, "kpoint_density": labelling.kpoint_density,
            "md": md, "atoms": {"numbers": atoms.numbers.tolist(), "positions": atoms.positions.tolist(),
                                "cell": atoms.cell.array.tolist(), "pbc": atoms.pbc.tolist()}}
    atomic_write_text(taskdir / TASK, json.dumps(task, default=str), mode=0o600)
    env = _worker_env(int(labelling.threads or 1), [pythonpath] if isinstance(pythonpath, str) else list(pythonpath))
    with open(taskdir / LOG, "w") as log:
        proc = process.start(process.python_module("alflow.gate_md", str(taskdir / TASK)), cwd=taskdir, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill_tree(proc.pid)
            proc.wait()
            code = None
    if code != 0:
        tail = (taskdir / LOG).read_text(errors="replace")[-2000:]
        what = f"timed out after {timeout_s:g} s" if code is None else f"exited with {code}"
        raise RuntimeError(f"the oracle's MD for the rdf gate {what} (log: {taskdir / LOG}):\n{tail}")
    from ase.io import read

    return list(read(taskdir / FRAMES, index=":"))


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: ``python -P -m alflow.gate_md task.json``."""
    from ase.io import write

    from alflow.oracles import build_calculator

    path = Path((argv or sys.argv[1:])[0])
    task = json.loads(path.read_text())
    taskdir = path.parent
    f = task["atoms"]
    atoms = Atoms(numbers=f["numbers"], positions=f["positions"], cell=f["cell"], pbc=f["pbc"])
    calc, stress_ok = build_calculator(task["oracle"], task["parameters"], atoms, task.get("kpoint_density"), taskdir)
    md = dict(task["md"], stress=bool(stress_ok) and bool(task["md"].get("stress", False)))
    t0 = time.perf_counter()

    def sink(frame: Atoms) -> None:
        write(taskdir / FRAMES, frame, format="extxyz", append=True)

    frames = sample(atoms, calc, md, sink)
    print(f"{len(frames)} frames sampled in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
