"""SchNet: continuous-filter convolutions on interatomic distances.

Schütt, Sauceda, Kindermans, Tkatchenko, Müller, "SchNet – A deep learning
architecture for molecules and materials", J. Chem. Phys. 148, 241722 (2018);
layout follows schnetpack (``representation/schnet.py``):

    x_i  = embedding(Z_i)                                          (N, F)
    W_ij = Dense(ssp(Dense(rbf(d_ij)))) * f_cut(d_ij)              (E, n_filters)
    v_i  = Dense(ssp(Dense(Σ_j in2f(x)_j ⊙ W_ij)))                 interaction block
    x_i ← x_i + v_i                                                 n_interactions times
    E_i  = Dense(ssp(Dense(x_i)))                                   F → F/2 → 1

Messages flow from neighbour j to centre i = edge_index[0], over the full
periodic neighbor list (every image within the cutoff is its own edge).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from alflow import keys
from potentials.base import Potential
from potentials.layers import CosineCutoff, GaussianRBF, ShiftedSoftplus, dense, gather, mlp, scatter_sum


class SchNetInteraction(nn.Module):
    """One interaction block: in2f → continuous-filter convolution → f2out (Dense, ssp, Dense)."""

    def __init__(self, n_atom_basis: int, n_rbf: int, n_filters: int) -> None:
        super().__init__()
        self.in2f = dense(n_atom_basis, n_filters, bias=False)
        self.filter_network = mlp(n_rbf, n_filters, n_filters)  # Dense(n_rbf→F, ssp) → Dense(F→F)
        self.f2out = mlp(n_filters, n_atom_basis, n_atom_basis)  # Dense(F→A, ssp) → Dense(A→A)

    def forward(
        self, x: torch.Tensor, rbf: torch.Tensor, fcut: torch.Tensor, idx_i: torch.Tensor, idx_j: torch.Tensor
    ) -> torch.Tensor:
        """The update v (N, n_atom_basis) for features x (N, n_atom_basis)."""
        filters = self.filter_network(rbf) * fcut[:, None]
        messages = gather(self.in2f(x), idx_j) * filters
        return self.f2out(scatter_sum(messages, idx_i, x.shape[0]))


class SchNet(Potential):
    """SchNet potential (J. Chem. Phys. 148, 241722 (2018)); unit-less per-atom outputs, scaled in ``node_energies``.

    Hyperparameters: ``n_atom_basis`` feature width F, ``n_filters`` filter width,
    ``n_interactions`` interaction blocks, ``n_rbf`` Gaussians on [0, cutoff].
    """

    architecture = "schnet"
    readout_module = "readout"  # the shallow committee's heads (potentials/shallow.py)

    def __init__(
        self,
        species: Sequence[int | str],
        cutoff: float,
        *,
        n_atom_basis: int = 64,
        n_filters: int = 64,
        n_interactions: int = 3,
        n_rbf: int = 20,
    ) -> None:
        super().__init__(species, cutoff)
        for name, value in (("n_atom_basis", n_atom_basis), ("n_filters", n_filters), ("n_rbf", n_rbf)):
            if int(value) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if int(n_interactions) < 0:
            raise ValueError(f"n_interactions: expected a non-negative integer, got {n_interactions!r}")
        self.hparams = dict(n_atom_basis=n_atom_basis, n_filters=n_filters, n_interactions=n_interactions, n_rbf=n_rbf)
        self.embedding = nn.Embedding(len(self.species), n_atom_basis)
        self.radial_basis = GaussianRBF(n_rbf, self.cutoff)
        self.cutoff_fn = CosineCutoff(self.cutoff)
        self.interactions = nn.ModuleList(
            SchNetInteraction(n_atom_basis, n_rbf, n_filters) for _ in range(n_interactions)
        )
        self.readout = mlp(n_atom_basis, max(n_atom_basis // 2, 1), 1, activation=ShiftedSoftplus)

    def atomic_energies(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        idx_i, idx_j = batch[keys.EDGE_INDEX]
        d = torch.linalg.vector_norm(vectors, dim=-1)
        rbf, fcut = self.radial_basis(d), self.cutoff_fn(d)
        x = self.embedding(species)
        for interaction in self.interactions:
            x = x + interaction(x, rbf, fcut, idx_i, idx_j)
        return self.readout(x).squeeze(-1)
