"""SAKE: spatial attention kinetic networks (E(n)-equivariant message passing).

Wang & Chodera, "Spatial Attention Kinetic Networks with E(n)-Equivariance",
ICLR 2023 (arXiv:2301.08893); layer layout follows the authors' reference
implementation (yuanqing-wang/sake, ``DenseSAKELayer``) made sparse over the
periodic neighbour list. What it adds: instead of spherical harmonics, an
attention-weighted, learned linear combination of the edge directions whose
norm is a cheap, universally expressive rotation-invariant feature.

One layer (node features h (N, F), heads H, edges i ← j with D = r_j - r_i + S @ cell):

    edge       e_ij = MLP([h_i, h_j, rbf(d) ⊙ W[h_i, h_j], d])                        (E, F)
    attention  a_ij^h = exp(s_ij^h - γ_h d_ij) f_cut(d_ij) / Σ_k exp(s_ik^h - γ_h d_ik) f_cut(d_ik)
               s = CELU_2(W_s e) semantic logits, γ_h > 0 learned Euclidean decay    (E, H), Σ_j a_ij^h = 1
    messages   m_ij = e_ij ⊗ a_ij f_cut(d_ij)                                         (E, F·H)
    spatial    u_i = Σ_j tanh(W_x m_ij) ⊗ r̂_ij   → |u_i|² → MLP                       (N, F·H, 3) → (N, F)
    node       h_i ← h_i + MLP([h_i, Σ_j m_ij, MLP(|u_i|²)])
    readout    E_i = MLP(h_i)

Deviations from the reference, for a smooth potential with a finite cutoff: the
paper's softmax(softmax(semantic) · softmax(Euclidean)) is replaced by one
softmax of the summed logits (a product of the unnormalised attentions) times
the cutoff, the messages are weighted by the cutoff once more (a centre whose
only neighbour sits at the cutoff has a = 1 there), and the spatial combinations
are summed rather than averaged, so that a neighbour entering or leaving the
cutoff changes nothing discontinuously (energies and forces are continuous).
The coordinate/velocity ("kinetic") updates are left out: an energy model needs
fixed coordinates, and moving x inside the network would invalidate the periodic
neighbour list and the cutoff (modelforge's SAKE does the same). The vector
channel u_i is recomputed in each layer from the fixed edge directions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from alflow import keys
from potentials.base import Potential
from potentials.layers import CosineCutoff, ExponentialRBF, dense, gather, mlp, scatter_sum


def neighbourhood_softmax(logits: torch.Tensor, idx_i: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """Softmax of ``logits`` (E, H) over the edges of each centre idx_i (E,); a centre's weights sum to 1.

    The per-centre maximum (scatter_reduce "amax", detached: the result does not
    depend on it) is subtracted before exp so that no weight overflows.
    """
    index = idx_i[:, None].expand_as(logits)
    empty = torch.zeros((n_nodes, logits.shape[1]), dtype=logits.dtype, device=logits.device)
    peak = empty.scatter_reduce(0, index, logits.detach(), reduce="amax", include_self=False)
    weights = torch.exp(logits - gather(peak, idx_i))
    return weights / gather(scatter_sum(weights, idx_i, n_nodes), idx_i)


class SAKELayer(nn.Module):
    """One SAKE layer over a sparse neighbour list (see the module docstring)."""

    def __init__(self, n_features: int, n_heads: int, n_rbf: int) -> None:
        super().__init__()
        f, c = n_features, n_features * n_heads
        self.n_heads = n_heads
        self.filter_in = dense(2 * f, n_rbf)
        self.edge_mlp = mlp(2 * f + n_rbf + 1, f, f, activation=nn.SiLU)
        self.semantic = nn.Sequential(dense(f, n_heads), nn.CELU(alpha=2.0))
        # Euclidean attention decay rates 1..1/5 per Å (the reference's -log(linspace(1, 5)))
        self.log_gamma = nn.Parameter(-torch.log(torch.linspace(1.0, 5.0, n_heads)))
        self.x_mixing = nn.Sequential(dense(c, c, bias=False), nn.Tanh())
        self.post_norm_mlp = nn.Sequential(mlp(c, f, f, activation=nn.SiLU), nn.SiLU())
        self.node_mlp = nn.Sequential(mlp(f + c + f, f, f, activation=nn.SiLU), nn.SiLU())

    def edges_and_attention(
        self,
        h: torch.Tensor,
        d: torch.Tensor,
        rbf: torch.Tensor,
        cut: torch.Tensor,
        idx_i: torch.Tensor,
        idx_j: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Edge features e_ij (E, F) and attention weights a_ij (E, H), normalised over each centre's neighbours."""
        h_cat = torch.cat([gather(h, idx_i), gather(h, idx_j)], dim=-1)
        e = self.edge_mlp(torch.cat([h_cat, rbf * self.filter_in(h_cat), d[:, None]], dim=-1))
        # log f_cut, finite for pairs at (or numerically past) the cutoff: their weight underflows to 0
        log_cut = torch.log(cut.clamp_min(torch.finfo(cut.dtype).tiny))
        logits = self.semantic(e) - torch.exp(self.log_gamma) * d[:, None] + log_cut[:, None]
        return e, neighbourhood_softmax(logits, idx_i, h.shape[0])

    def forward(
        self,
        h: torch.Tensor,
        d: torch.Tensor,
        direction: torch.Tensor,
        rbf: torch.Tensor,
        cut: torch.Tensor,
        idx_i: torch.Tensor,
        idx_j: torch.Tensor,
    ) -> torch.Tensor:
        n = h.shape[0]
        e, att = self.edges_and_attention(h, d, rbf, cut, idx_i, idx_j)
        # × f_cut once more: a lone neighbour at the cutoff has a = 1 but must fade out
        m = (e[:, :, None] * (att * cut[:, None])[:, None, :]).flatten(1)  # (E, F·H)
        combinations = scatter_sum(self.x_mixing(m)[:, :, None] * direction[:, None, :], idx_i, n)  # (N, F·H, 3)
        spatial = self.post_norm_mlp(combinations.pow(2).sum(-1))
        return h + self.node_mlp(torch.cat([h, scatter_sum(m, idx_i, n), spatial], dim=-1))


class SAKE(Potential):
    """SAKE potential (ICLR 2023); per-atom outputs are unit-less, scaled in ``node_energies``.

    Hyperparameters: ``hidden_features`` node/edge width F, ``n_layers`` SAKE
    layers, ``n_heads`` attention heads H, ``n_rbf`` exponential radial functions
    (PhysNet form, as the reference's ExpNormalSmearing).
    """

    architecture = "sake"
    readout_module = "readout"  # the shallow committee's heads (potentials/shallow.py)

    def __init__(
        self,
        species: Sequence[int | str],
        cutoff: float,
        *,
        hidden_features: int = 64,
        n_layers: int = 3,
        n_heads: int = 4,
        n_rbf: int = 32,
    ) -> None:
        super().__init__(species, cutoff)
        for name, value in (("hidden_features", hidden_features), ("n_heads", n_heads), ("n_rbf", n_rbf)):
            if int(value) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if int(n_layers) < 0:
            raise ValueError(f"n_layers: expected a non-negative integer, got {n_layers!r}")
        self.hparams = dict(
            hidden_features=int(hidden_features), n_layers=int(n_layers), n_heads=int(n_heads), n_rbf=int(n_rbf)
        )
        self.embedding = nn.Embedding(len(self.species), hidden_features)
        self.radial_basis = ExponentialRBF(n_rbf, self.cutoff)
        self.cutoff_fn = CosineCutoff(self.cutoff)
        self.layers = nn.ModuleList(SAKELayer(hidden_features, n_heads, n_rbf) for _ in range(int(n_layers)))
        self.readout = mlp(hidden_features, hidden_features, 1, activation=nn.SiLU)

    def _geometry(self, vectors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d = torch.linalg.vector_norm(vectors, dim=-1)
        direction = vectors / d[:, None]  # r̂_ij = (x_j - x_i + S @ cell) / d; d > 0 for distinct images
        return d, direction, self.radial_basis(d), self.cutoff_fn(d)

    def atomic_energies(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        idx_i, idx_j = batch[keys.EDGE_INDEX]
        d, direction, rbf, cut = self._geometry(vectors)
        h = self.embedding(species).to(vectors.dtype)
        for layer in self.layers:
            h = layer(h, d, direction, rbf, cut, idx_i, idx_j)
        return self.readout(h).squeeze(-1)

    def attention_weights(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor) -> list[torch.Tensor]:
        """Attention weights a_ij (E, H) of every layer, for inspection and tests."""
        idx_i, idx_j = batch[keys.EDGE_INDEX]
        d, direction, rbf, cut = self._geometry(vectors)
        h = self.embedding(self.species_index(batch[keys.NUMBERS])).to(vectors.dtype)
        weights = []
        for layer in self.layers:
            weights.append(layer.edges_and_attention(h, d, rbf, cut, idx_i, idx_j)[1])
            h = layer(h, d, direction, rbf, cut, idx_i, idx_j)
        return weights
