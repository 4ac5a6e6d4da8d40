"""Force providers for the batched engine besides a ``Potential`` or ``Committee``.

A force provider is anything callable as ``provider(batch, forces=True, stress=bool)`` on an
``alflow.graph`` batch that returns ``energy`` (B,) eV, ``forces`` (N, 3) eV/Å and, when asked,
``stress`` (B, 3, 3) eV/Å³ (ASE sign), with a ``cutoff`` attribute (Å) for the neighbor list; a
committee adds ``max_force_deviation`` (B,), ``energy_deviation_per_atom`` (B,) and
``force_deviation`` (N,). :class:`CalculatorProvider` wraps an ASE calculator (EMT, LJ, ...)
so that the batched integrators can be checked against ASE's on the same forces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator

from alflow import keys


class CalculatorProvider:
    """An ASE calculator as a batched force provider (one calculator call per structure, on the host).

    ``factory()`` returns a fresh calculator; one is kept per structure slot. ``cutoff`` (Å) is
    only used by the engine's neighbor list (for ``min_distance``), not by the calculator.
    """

    def __init__(self, factory: Callable[[], Calculator], cutoff: float = 3.0) -> None:
        self.factory = factory
        self.cutoff = float(cutoff)
        self._calcs: list[Calculator] = []
        self.calls = 0

    def __call__(self, batch: dict[str, torch.Tensor], forces: bool = True, stress: bool = False,
                 **_: Any) -> dict[str, torch.Tensor]:
        pos = batch[keys.POSITIONS].detach()
        dtype, device = pos.dtype, pos.device
        positions = pos.cpu().numpy().astype(float)
        numbers = batch[keys.NUMBERS].cpu().numpy()
        cells = batch[keys.CELL].detach().cpu().numpy().astype(float)
        pbc = batch[keys.PBC].cpu().numpy()
        counts = batch[keys.N_ATOMS].cpu().numpy()
        while len(self._calcs) < len(counts):
            self._calcs.append(self.factory())
        energies, all_forces, stresses = [], [], []
        start = 0
        for b, n in enumerate(counts.tolist()):
            atoms = Atoms(numbers=numbers[start:start + n], positions=positions[start:start + n], cell=cells[b], pbc=pbc[b])
            atoms.calc = self._calcs[b]
            energies.append(atoms.get_potential_energy())
            all_forces.append(atoms.get_forces())
            stresses.append(atoms.get_stress(voigt=False) if stress and pbc[b].all() else np.zeros((3, 3)))
            start += n
        self.calls += 1
        out = {
            keys.ENERGY: torch.tensor(energies, dtype=dtype, device=device),
            keys.FORCES: torch.as_tensor(np.concatenate(all_forces), dtype=dtype, device=device),
        }
        if stress:
            out[keys.STRESS] = torch.as_tensor(np.stack(stresses), dtype=dtype, device=device)
        return out
