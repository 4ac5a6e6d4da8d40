"""PaiNN: polarizable atom interaction neural network (rotationally equivariant message passing).

Schütt, Unke, Gastegger, "Equivariant message passing for the prediction of
tensorial properties and molecular spectra", ICML 2021 (arXiv:2102.03150);
layout follows schnetpack (``representation/painn.py``). Scalar features
s (N, F) and vector features v (N, 3, F), v = 0 at the start:

    message   x_ij = φ(s_j) ⊙ W(rbf(d_ij)) f_cut(d_ij)  → (x_s, x_vv, x_vs), each (E, F)
              Δs_i = Σ_j x_s,   Δv_i = Σ_j (v_j ⊙ x_vv + x_vs ⊙ r̂_ij),   r̂_ij = D/|D|, D = r_j - r_i
    update    a = MLP(s, ‖V v‖) → (a_vv, a_sv, a_ss)
              Δv = a_vv ⊙ U v,   Δs = a_ss + a_sv ⊙ <U v, V v>
    readout   E_i = MLP(s_i)                                  F → F/2 → 1

Messages flow from neighbour j to centre i = edge_index[0].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from alflow import keys
from potentials.base import Potential
from potentials.layers import BesselRBF, CosineCutoff, dense, gather, mlp, scatter_sum


class PaiNNMessage(nn.Module):
    """Message block: neighbour scalars and vectors, filtered by the radial basis, summed at the centre."""

    def __init__(self, n_atom_basis: int) -> None:
        super().__init__()
        self.n_atom_basis = n_atom_basis
        self.phi = mlp(n_atom_basis, n_atom_basis, 3 * n_atom_basis, activation=nn.SiLU)

    def forward(
        self,
        s: torch.Tensor,
        v: torch.Tensor,
        filters: torch.Tensor,
        direction: torch.Tensor,
        idx_i: torch.Tensor,
        idx_j: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = gather(self.phi(s), idx_j) * filters
        x_s, x_vv, x_vs = torch.split(x, self.n_atom_basis, dim=-1)
        dv = gather(v, idx_j) * x_vv[:, None, :] + x_vs[:, None, :] * direction[:, :, None]
        n = s.shape[0]
        return s + scatter_sum(x_s, idx_i, n), v + scatter_sum(dv, idx_i, n)


class PaiNNUpdate(nn.Module):
    """Update block: per-atom mixing of scalar and vector channels."""

    def __init__(self, n_atom_basis: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.n_atom_basis = n_atom_basis
        self.eps = eps
        self.uv = dense(n_atom_basis, 2 * n_atom_basis, bias=False)  # U and V stacked
        self.context = mlp(2 * n_atom_basis, n_atom_basis, 3 * n_atom_basis, activation=nn.SiLU)

    def forward(self, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u_v, v_v = torch.split(self.uv(v), self.n_atom_basis, dim=-1)
        # sqrt(Σ x² + ε) keeps the gradient finite where v = 0 (the first layer)
        norm = torch.sqrt(torch.sum(v_v**2, dim=1) + self.eps)
        a = self.context(torch.cat([s, norm], dim=-1))
        a_vv, a_sv, a_ss = torch.split(a, self.n_atom_basis, dim=-1)
        dv = a_vv[:, None, :] * u_v
        ds = a_ss + a_sv * torch.sum(u_v * v_v, dim=1)
        return s + ds, v + dv


class PaiNN(Potential):
    """PaiNN potential (ICML 2021); per-atom outputs are unit-less, scaled in ``node_energies``.

    Hyperparameters: ``n_atom_basis`` feature width F, ``n_interactions`` message +
    update blocks, ``n_rbf`` sin(nπd/r_c)/d radial functions, ``shared_filters``
    one radial filter network for all blocks (else one per block).
    """

    architecture = "painn"
    readout_module = "readout"  # the shallow committee's heads (potentials/shallow.py)

    def __init__(
        self,
        species: Sequence[int | str],
        cutoff: float,
        *,
        n_atom_basis: int = 64,
        n_interactions: int = 3,
        n_rbf: int = 20,
        shared_filters: bool = False,
    ) -> None:
        super().__init__(species, cutoff)
        for name, value in (("n_atom_basis", n_atom_basis), ("n_rbf", n_rbf)):
            if int(value) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if int(n_interactions) < 0:
            raise ValueError(f"n_interactions: expected a non-negative integer, got {n_interactions!r}")
        self.hparams = dict(
            n_atom_basis=n_atom_basis, n_interactions=n_interactions, n_rbf=n_rbf, shared_filters=bool(shared_filters)
        )
        self.n_atom_basis = n_atom_basis
        self.n_interactions = n_interactions
        self.shared_filters = bool(shared_filters)
        self.embedding = nn.Embedding(len(self.species), n_atom_basis)
        self.radial_basis = BesselRBF(n_rbf, self.cutoff)
        self.cutoff_fn = CosineCutoff(self.cutoff)
        n_filter_sets = 1 if self.shared_filters else n_interactions
        self.filter_net = dense(n_rbf, 3 * n_atom_basis * max(n_filter_sets, 1))
        self.messages = nn.ModuleList(PaiNNMessage(n_atom_basis) for _ in range(n_interactions))
        self.updates = nn.ModuleList(PaiNNUpdate(n_atom_basis) for _ in range(n_interactions))
        self.readout = mlp(n_atom_basis, max(n_atom_basis // 2, 1), 1, activation=nn.SiLU)

    def atomic_energies(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        idx_i, idx_j = batch[keys.EDGE_INDEX]
        d = torch.linalg.vector_norm(vectors, dim=-1)
        direction = vectors / d[:, None]  # r̂_ij, pointing from i to j; d > 0 for distinct images
        filters = self.filter_net(self.radial_basis(d)) * self.cutoff_fn(d)[:, None]
        filter_list = torch.split(filters, 3 * self.n_atom_basis, dim=-1)
        s = self.embedding(species)
        v = torch.zeros((s.shape[0], 3, self.n_atom_basis), dtype=vectors.dtype, device=vectors.device)
        for k, (message, update) in enumerate(zip(self.messages, self.updates)):
            w = filter_list[0 if self.shared_filters else k]
            s, v = message(s, v, w, direction, idx_i, idx_j)
            s, v = update(s, v)
        return self.readout(s).squeeze(-1)
