"""The ``Potential`` contract shared by every architecture.

An architecture subclasses :class:`Potential` and implements one method,
``atomic_energies(batch, vectors, species) -> (N,)``: unit-less per-atom outputs
from the batch (``alflow.graph``), the differentiable pair vectors
D = r_j - r_i + S @ cell (E, 3) in Å, and each atom's species index (N,)
(position in ``self.species``). The shared code here turns them into

    E_atom = scale * atomic_energies + shift + E0[species]         (eV)
    E      = sum of E_atom per structure                           (eV)
    F      = -dE/dr                                                (eV/Å)
    sigma  = (1/V) dE/d(eps),  eps a symmetric strain of cell and positions  (eV/Å³, ASE sign)

so every architecture gets forces and stress by autograd, in one backward pass.
An architecture that adds terms outside the scale/shift (PhysNet's and AIMNet2's
Coulomb energy) overrides :meth:`Potential.node_energies`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from ase.data import atomic_numbers, chemical_symbols
from torch import nn

from alflow import keys
from alflow.neighbors import edge_vectors
from alflow.errors import InputError


class UnknownElementError(InputError):
    """A structure holds an element the model was not trained for."""


def normalize_species(species: Sequence[int | str]) -> list[int]:
    """Atomic numbers, sorted and unique, from numbers or chemical symbols."""
    numbers = []
    for s in species:
        if isinstance(s, str):
            if s not in atomic_numbers:
                raise ValueError(f"species: unknown chemical symbol {s!r}")
            numbers.append(atomic_numbers[s])
        else:
            z = int(s)
            if not 1 <= z <= 118:
                raise ValueError(f"species: atomic number {z} is outside 1..118")
            numbers.append(z)
    if not numbers:
        raise ValueError("species: expected at least one element")
    return sorted(set(numbers))


class Potential(nn.Module):
    """A neural network potential: per-atom energies → energy, forces, stress.

    Subclasses set ``architecture`` (their registry name), call
    ``super().__init__(species, cutoff)`` and implement :meth:`atomic_energies`.
    Their ``__init__`` keyword arguments are the hyperparameters, recorded in
    ``self.hparams`` for checkpoints.
    """

    architecture: ClassVar[str] = "base"
    implemented_properties: ClassVar[tuple[str, ...]] = ("energy", "free_energy", "forces", "stress")
    # the submodule (dotted name) mapping per-atom features (N, F) to the unit-less per-atom output (N, 1), added
    # into atomic_energies once per call; None: no single readout (no shallow committee, potentials/shallow.py)
    readout_module: ClassVar[str | None] = None

    def __init__(self, species: Sequence[int | str], cutoff: float) -> None:
        super().__init__()
        if not float(cutoff) > 0:
            raise ValueError(f"cutoff: expected a positive number in Å, got {cutoff!r}")
        self.species: list[int] = normalize_species(species)
        self.cutoff = float(cutoff)
        lookup = torch.full((119,), -1, dtype=torch.long)
        lookup[torch.tensor(self.species)] = torch.arange(len(self.species))
        self.register_buffer("species_lookup", lookup, persistent=False)
        self.register_buffer("e0", torch.zeros(len(self.species)))  # eV per atom of each species
        self.register_buffer("scale", torch.tensor(1.0))  # eV
        self.register_buffer("shift", torch.tensor(0.0))  # eV per atom
        self.hparams: dict[str, Any] = {}

    # ------------------------------------------------------------------ contract

    def atomic_energies(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """Unit-less per-atom outputs (N,); scaled, shifted and offset by E0 in :meth:`node_energies`."""
        raise NotImplementedError

    def node_energies(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """Per-atom energies in eV (N,)."""
        out = self.atomic_energies(batch, vectors, species)
        return out * self.scale + self.shift + self.e0[species]

    # ------------------------------------------------------------------ shared machinery

    def species_index(self, numbers: torch.Tensor) -> torch.Tensor:
        """Position of each atomic number in ``self.species``; an unknown element is an error naming it."""
        index = self.species_lookup[numbers]
        if bool((index < 0).any()):
            unknown = sorted({int(z) for z in numbers[index < 0].tolist()})
            names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in unknown)
            known = ", ".join(chemical_symbols[z] for z in self.species)
            raise UnknownElementError(f"element {names} is not among the model's species [{known}]")
        return index

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        forces: bool = True,
        stress: bool = False,
        create_graph: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Energy (B,) eV, and forces (N, 3) eV/Å and stress (B, 3, 3) eV/Å³ when asked.

        ``create_graph`` (default: ``self.training``) keeps the graph of the
        derivatives so that a loss on forces can be back-propagated.
        """
        return compute_properties(self, batch, forces=forces, stress=stress, create_graph=create_graph)

    def extra_repr(self) -> str:
        symbols = ",".join(chemical_symbols[z] for z in self.species)
        return f"species=[{symbols}], cutoff={self.cutoff}"

    @classmethod
    def hparam_names(cls) -> list[str]:
        """The keyword hyperparameters ``__init__`` accepts (besides species and cutoff)."""
        params = inspect.signature(cls.__init__).parameters
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return [n for n, p in params.items() if n not in ("self", "species", "cutoff") and p.kind in kinds]


def strained_geometry(
    batch: dict[str, torch.Tensor], forces: bool, stress: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Positions and cells as functions of leaf tensors autograd can differentiate.

    Returns (leaf positions, cell, displacement, positions used by the model): with ``stress`` a zero (B, 3, 3)
    displacement ε is applied as r' = r (1 + sym ε), cell' = cell (1 + sym ε).
    """
    positions = batch[keys.POSITIONS]
    cell = batch[keys.CELL]
    if forces or stress:
        positions = positions.detach().requires_grad_(True)
    displacement = None
    if stress:
        displacement = torch.zeros_like(cell, requires_grad=True)
        symmetric = 0.5 * (displacement + displacement.transpose(1, 2))
        positions_strained = positions + torch.einsum("ni,nij->nj", positions, symmetric[batch[keys.BATCH]])
        cell = cell + torch.bmm(cell, symmetric)
        return positions, cell, displacement, positions_strained
    return positions, cell, displacement, positions


def compute_properties(
    model: Potential,
    batch: dict[str, torch.Tensor],
    forces: bool = True,
    stress: bool = False,
    create_graph: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Energy, forces and stress of ``model`` on ``batch`` (see the module docstring)."""
    create_graph = model.training if create_graph is None else create_graph
    with torch.enable_grad():  # forces and stress need autograd even under torch.no_grad()
        return _compute_properties(model, batch, forces, stress, create_graph)


def _compute_properties(
    model: Potential, batch: dict[str, torch.Tensor], forces: bool, stress: bool, create_graph: bool
) -> dict[str, torch.Tensor]:
    leaf_positions, cell, displacement, positions = strained_geometry(batch, forces, stress)
    edge_index = batch[keys.EDGE_INDEX]
    vectors = edge_vectors(positions, cell, edge_index[0], edge_index[1], batch[keys.SHIFTS], batch[keys.BATCH])
    species = model.species_index(batch[keys.NUMBERS])
    inner = dict(batch)
    inner[keys.POSITIONS] = positions
    inner[keys.CELL] = cell
    node_energy = model.node_energies(inner, vectors, species)
    n_structures = batch[keys.CELL].shape[0]
    energy = torch.zeros(n_structures, dtype=node_energy.dtype, device=node_energy.device)
    energy = energy.index_add(0, batch[keys.BATCH], node_energy)
    out = {keys.ENERGY: energy, keys.NODE_ENERGY: node_energy}
    if forces or stress:
        inputs = [leaf_positions] + ([displacement] if stress else [])
        grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph, allow_unused=True)
        if forces:
            g = grads[0] if grads[0] is not None else torch.zeros_like(leaf_positions)
            out[keys.FORCES] = -g
        if stress:
            g = grads[-1] if grads[-1] is not None else torch.zeros_like(displacement)
            volume = torch.linalg.det(batch[keys.CELL]).abs().clamp_min(1e-12)
            out[keys.STRESS] = g / volume[:, None, None]
    return out
