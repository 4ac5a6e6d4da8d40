"""DTNN: deep tensor neural network.

Schütt, Arbabzadah, Chmiela, Müller, Tkatchenko, "Quantum-chemical insights from
deep tensor neural networks", Nat. Commun. 8, 13890 (2017); layout as schnetpack's
``representation/dtnn.py``. The first network to learn atom-wise representations
by pairwise, distance-dependent (factorised tensor) interactions:

    c_i⁰  = embedding(Z_i)                                               (N, F)
    d̂_ij  = exp(-(d_ij - μ_k)² / (2 σ²)),  μ_k evenly spaced on [0, r_c], σ their spacing
    v_ij  = tanh(W^fc ((W^cf c_j + b^f1) ⊙ (W^df d̂_ij + b^f2))) · f_cut(d_ij)
    c_i^{t+1} = c_i^t + Σ_j v_ij                                          n_interactions times
    E_i   = W₂ tanh(W₁ c_i + b₁) + b₂                                       F → F/2 → 1

Deviations from the paper: (1) the interactions are multiplied by the smooth cosine
cutoff f_cut, so that energies and forces are continuous when a neighbour crosses the
cutoff (the paper uses a hard 20 Å distance range on small molecules); (2) the Gaussian
spacing is r_c / (n_rbf - 1) (0.21 Å for the defaults at 5 Å, paper: 0.2 Å on [-1, 20] Å).
Messages flow from neighbour j to centre i = edge_index[0] over all periodic images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from alflow import keys
from potentials.base import Potential
from potentials.layers import CosineCutoff, GaussianRBF, dense, gather, mlp, scatter_sum


class DTNNInteraction(nn.Module):
    """One interaction pass: factorised atom–distance tensor, tanh, cutoff, sum over neighbours."""

    def __init__(self, n_atom_basis: int, n_rbf: int, n_factors: int) -> None:
        super().__init__()
        self.atom_to_factor = dense(n_atom_basis, n_factors)  # W^cf c_j + b^f1
        self.rbf_to_factor = dense(n_rbf, n_factors)  # W^df d̂_ij + b^f2
        self.factor_to_atom = dense(n_factors, n_atom_basis, bias=False)  # W^fc

    def forward(
        self, c: torch.Tensor, rbf: torch.Tensor, fcut: torch.Tensor, idx_i: torch.Tensor, idx_j: torch.Tensor
    ) -> torch.Tensor:
        """The update Σ_j v_ij (N, n_atom_basis) for features c (N, n_atom_basis)."""
        factors = gather(self.atom_to_factor(c), idx_j) * self.rbf_to_factor(rbf)
        v = torch.tanh(self.factor_to_atom(factors)) * fcut[:, None]
        return scatter_sum(v, idx_i, c.shape[0])


class DTNN(Potential):
    """DTNN potential (Nat. Commun. 8, 13890 (2017)); per-atom outputs are unit-less, scaled in ``node_energies``.

    Hyperparameters: ``n_atom_basis`` feature width F, ``n_factors`` width of the factorised
    tensor layer, ``n_interactions`` interaction passes, ``n_rbf`` Gaussians on [0, cutoff].
    """

    architecture = "dtnn"
    readout_module = "readout"  # the shallow committee's heads (potentials/shallow.py)

    def __init__(
        self,
        species: Sequence[int | str],
        cutoff: float,
        *,
        n_atom_basis: int = 64,
        n_factors: int = 64,
        n_interactions: int = 3,
        n_rbf: int = 25,
    ) -> None:
        super().__init__(species, cutoff)
        for name, value in (("n_atom_basis", n_atom_basis), ("n_factors", n_factors), ("n_rbf", n_rbf)):
            if int(value) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if int(n_interactions) < 0:
            raise ValueError(f"n_interactions: expected a non-negative integer, got {n_interactions!r}")
        self.hparams = dict(n_atom_basis=n_atom_basis, n_factors=n_factors, n_interactions=n_interactions, n_rbf=n_rbf)
        self.embedding = nn.Embedding(len(self.species), n_atom_basis)
        self.radial_basis = GaussianRBF(n_rbf, self.cutoff)
        self.cutoff_fn = CosineCutoff(self.cutoff)
        self.interactions = nn.ModuleList(DTNNInteraction(n_atom_basis, n_rbf, n_factors) for _ in range(n_interactions))
        self.readout = mlp(n_atom_basis, max(n_atom_basis // 2, 1), 1, activation=nn.Tanh)

    def atomic_energies(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        idx_i, idx_j = batch[keys.EDGE_INDEX]
        d = torch.linalg.vector_norm(vectors, dim=-1)
        rbf, fcut = self.radial_basis(d), self.cutoff_fn(d)
        c = self.embedding(species)
        for interaction in self.interactions:
            c = c + interaction(c, rbf, fcut, idx_i, idx_j)
        return self.readout(c).squeeze(-1)
