"""An oracle that runs an external program the way a DFT code runs (used as "launched_oracle:LaunchedHarmonic").

``command`` is the program with its MPI launcher in front (``labelling.mpi_command``: ``srun -n 1 python
launched_code.py``); the program writes ``<job>.<step>.<ntasks>`` into ``marker_dir`` from the Slurm
environment it was started in, so a test can see it ran as a job step. Energy E = k/2 Σ|r_i - r̄|² (eV).
"""

from __future__ import annotations

import shlex
import subprocess

from ase.calculators.calculator import Calculator, all_changes


class LaunchedHarmonic(Calculator):
    implemented_properties = ["energy", "forces"]

    def __init__(self, command: str | list[str], marker_dir: str, k: float = 1.0):
        super().__init__()
        self.argv = list(command) if isinstance(command, (list, tuple)) else shlex.split(command)
        self.marker_dir, self.k = marker_dir, k

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        subprocess.run([*self.argv, self.marker_dir], check=True, timeout=120)
        d = self.atoms.positions - self.atoms.positions.mean(axis=0)
        self.results = {"energy": 0.5 * self.k * float((d**2).sum()), "forces": -self.k * d}
