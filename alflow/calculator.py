"""An ASE calculator for alflow potentials and committees.

    from alflow.calculator import AlflowCalculator
    atoms.calc = AlflowCalculator("committee.pt")          # or a Potential / Committee object
    atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    atoms.calc.results["max_force_deviation"]             # committee scores, numpy

Units are ASE's: eV, eV/Å, and stress in eV/Å³ as the Voigt 6-vector (xx, yy, zz,
yz, xz, xy), ASE sign convention. Stress exists only for cells periodic in all three
directions (it is computed along with the forces for such cells, so that a cell
filter's get_forces + get_stress costs one evaluation). The model runs in its own dtype; ``device="auto"`` picks CUDA when
present. The neighbor list is rebuilt at each call (vesin, alflow.neighbors).

For a :class:`potentials.committee.Committee`, ``energy``/``forces``/``stress`` are the
committee means and ``results`` also holds, as numpy arrays for the one structure:
``energies_comm`` (K,) the members' energies, ``forces_comm`` (K, N, 3), ``stress_comm``
(K, 6) when stress was computed, ``energy_var`` (scalar, eV²), ``forces_var`` (N, 3),
``force_deviation`` (N,), ``max_force_deviation`` (eV/Å) and
``energy_deviation_per_atom`` (eV/atom), all calibrated by the committee's α
(definitions: ``alflow.committee``).

``energies`` is ASE's per-atom energy (N,) in eV (``atoms.get_potential_energies()``;
for a committee the members' mean), which sums to ``energy``. The committee's member
energies are therefore ``energies_comm`` here (the torch outputs and the i-PI extras
call them ``energies``/``committee_pot``): ASE's writers treat ``energies`` as a
per-atom array, so ``ase.io.write`` of an Atoms with this calculator attached works.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from alflow import keys
from alflow.devices import resolve_device  # noqa: F401 - the one device resolver (re-exported)
from alflow.graph import atoms_to_batch
from alflow.voigt import to_voigt

ENERGIES_COMM = "energies_comm"  # the committee members' energies (K,), eV

COMMITTEE_RESULTS = (
    ENERGIES_COMM,
    keys.FORCES_COMM,
    keys.STRESS_COMM,
    keys.ENERGY_VAR,
    keys.FORCES_VAR,
    "force_deviation",
    keys.MAX_FORCE_DEVIATION,
    keys.ENERGY_DEVIATION_PER_ATOM,
)


class AlflowCalculator(Calculator):
    """ASE calculator wrapping a Potential or a Committee (an object, or a path for ``potentials.load``)."""

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, model: torch.nn.Module | str | os.PathLike, device: str | torch.device = "auto", **kwargs: Any):
        super().__init__(**kwargs)
        self.device = resolve_device(device)
        if isinstance(model, (str, os.PathLike)):
            from potentials.registry import load

            model = load(model, device=self.device)
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "cutoff"):
            raise TypeError(f"model: expected a Potential, a Committee or a path to one, got {type(model).__name__}")
        self.model = model.to(self.device).eval()
        self.dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.get_default_dtype())
        self.is_committee = hasattr(self.model, "n_members")  # Committee or ShallowCommittee

    def calculate(
        self, atoms: Atoms | None = None, properties: list[str] | None = None, system_changes: list[str] = all_changes
    ) -> None:
        properties = properties or ["energy"]
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        periodic = bool(atoms.pbc.all())
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError(
                f"stress: defined only for cells periodic in all three directions, got pbc={atoms.pbc.tolist()}"
            )
        # stress costs little beside the forces, and a cell filter asks for both: compute it for every 3D cell
        want_stress = periodic
        batch = atoms_to_batch(atoms, self.model.cutoff, dtype=self.dtype, device=self.device)
        out = self.model(batch, forces=True, stress=want_stress)
        out = {k: v.detach().to("cpu", torch.float64).numpy() for k, v in out.items()}
        energy = float(out[keys.ENERGY][0])
        self.results = {"energy": energy, "free_energy": energy, "energies": out[keys.NODE_ENERGY],
                        "forces": out[keys.FORCES]}
        if want_stress:
            self.results["stress"] = to_voigt(out[keys.STRESS][0])
        if self.is_committee:
            self.results.update(self._committee_results(out, want_stress))

    @staticmethod
    def _committee_results(out: dict[str, np.ndarray], stress: bool) -> dict[str, Any]:
        results: dict[str, Any] = {
            ENERGIES_COMM: out[keys.ENERGIES][:, 0],
            keys.FORCES_COMM: out[keys.FORCES_COMM],
            keys.ENERGY_VAR: float(out[keys.ENERGY_VAR][0]),
            keys.FORCES_VAR: out[keys.FORCES_VAR],
            "force_deviation": out["force_deviation"],
            keys.MAX_FORCE_DEVIATION: float(out[keys.MAX_FORCE_DEVIATION][0]),
            keys.ENERGY_DEVIATION_PER_ATOM: float(out[keys.ENERGY_DEVIATION_PER_ATOM][0]),
        }
        if stress:
            results[keys.STRESS_COMM] = to_voigt(out[keys.STRESS_COMM][:, 0])
        return results
