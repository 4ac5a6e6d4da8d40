"""TensorNet: O(3)-equivariant message passing with Cartesian rank-2 tensor features.

Simeon, De Fabritiis, "TensorNet: Cartesian Tensor Representations for Efficient
Learning of Molecular Potentials", NeurIPS 2023 (arXiv:2306.06482); layout follows
the authors' torchmd-net implementation (``torchmdnet/models/tensornet.py``).
What TensorNet adds: every atom carries F channels of 3×3 matrices
X = I + A + S (scalar·identity, antisymmetric ≅ vector, symmetric traceless), mixed
by matrix products, which are equivariant (X → R X Rᵀ) and cheap — no spherical
harmonics or Clebsch–Gordan products.

    r̂ = D/|D|, D = r_j - r_i; rbf = expnorm(d) (K functions), φ(d) cosine cutoff
    embedding   Z_ij = W [z_i, z_j];  (w_I, w_A, w_S) = W rbf(d_ij) φ(d_ij)
                X_i = Σ_j Z_ij ⊙ (w_I Id + w_A skew(r̂) + w_S (r̂ r̂ᵀ - Id/3))
                X_i ← f_I(n) W_I I_i + f_A(n) W_A A_i + f_S(n) W_S S_i,   n = LayerNorm(‖X_i‖²)
    interaction X ← X / (‖X‖² + 1);  Y = W_I I + W_A A + W_S S (channel mixing)
                M_i = Σ_j f_I(d) I(Y_j) + f_A(d) A(Y_j) + f_S(d) S(Y_j)      (radial MLP f, cutoff φ)
                P = M Y + Y M (O(3)) or 2 Y M (SO(3));  P ← P / (‖P‖² + 1)
                ΔX = W'_I I(P) + W'_A A(P) + W'_S S(P);  X ← X + ΔX + ΔX²
    readout     E_i = MLP(σ(W LayerNorm([‖I_i‖², ‖A_i‖², ‖S_i‖²])))            (3F → F → F/2 → 1)

‖·‖² is the squared Frobenius norm per channel (as in the reference code): a
polynomial, so features and their derivatives stay finite where tensors vanish
(A = S = 0 at every centrosymmetric site of a perfect crystal). Messages flow
from neighbour j to centre i = edge_index[0].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from alflow import keys
from potentials.base import Potential
from potentials.layers import CosineCutoff, ExponentialRBF, dense, gather, mlp, scatter_sum

GROUPS = ("O(3)", "SO(3)")


# ----------------------------------------------------------------------------- tensor algebra (..., 3, 3)


def skew(v: torch.Tensor) -> torch.Tensor:
    """The antisymmetric matrix [v]_× with [v]_× u = v × u, shape (..., 3, 3) from (..., 3)."""
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    rows = (torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1), torch.stack([-y, x, zero], -1))
    return torch.stack(rows, dim=-2)


def decompose(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X = I + A + S: (tr X / 3) Id, (X - Xᵀ)/2, (X + Xᵀ)/2 - (tr X / 3) Id, each of X's shape (..., 3, 3)."""
    eye = torch.eye(3, dtype=X.dtype, device=X.device)
    trace = X.diagonal(dim1=-2, dim2=-1).sum(-1)
    identity = (trace / 3.0)[..., None, None] * eye
    transposed = X.transpose(-2, -1)
    return identity, 0.5 * (X - transposed), 0.5 * (X + transposed) - identity


def norm2(X: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm over the last two axes."""
    return (X * X).sum((-2, -1))


def mix(linear: nn.Linear, X: torch.Tensor) -> torch.Tensor:
    """Channel mixing of (N, F, 3, 3) tensors by a bias-free linear layer (keeps the I/A/S type)."""
    return torch.einsum("nfab,gf->ngab", X, linear.weight)


# ----------------------------------------------------------------------------- blocks


class TensorEmbedding(nn.Module):
    """Initial tensors from neighbour directions, pair-species embeddings and radial weights."""

    def __init__(self, n_species: int, hidden: int, num_rbf: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.embedding = nn.Embedding(n_species, hidden)
        self.pair = dense(2 * hidden, hidden)
        self.radial = dense(num_rbf, 3 * hidden)
        self.norm = nn.LayerNorm(hidden)
        self.scalar = nn.Sequential(dense(hidden, 2 * hidden), nn.SiLU(), dense(2 * hidden, 3 * hidden), nn.SiLU())
        self.lin_i, self.lin_a, self.lin_s = (dense(hidden, hidden, bias=False) for _ in range(3))

    def forward(
        self, species: torch.Tensor, rbf: torch.Tensor, fcut: torch.Tensor, unit: torch.Tensor,
        idx_i: torch.Tensor, idx_j: torch.Tensor,
    ) -> torch.Tensor:
        n, f = species.shape[0], self.hidden
        z = self.embedding(species)
        z_ij = self.pair(torch.cat([gather(z, idx_i), gather(z, idx_j)], dim=-1))  # (E, F)
        w = (self.radial(rbf) * fcut[:, None]).reshape(-1, 3, f) * z_ij[:, None, :]  # (E, 3, F)
        eye = torch.eye(3, dtype=unit.dtype, device=unit.device)
        outer = unit[:, :, None] * unit[:, None, :] - eye / 3.0  # (E, 3, 3) symmetric traceless
        s_i = scatter_sum(w[:, 0], idx_i, n)  # (N, F)
        v_a = scatter_sum(w[:, 1, :, None] * unit[:, None, :], idx_i, n)  # (N, F, 3)
        S = scatter_sum(w[:, 2, :, None, None] * outer[:, None], idx_i, n)  # (N, F, 3, 3)
        I = s_i[..., None, None] * eye
        A = skew(v_a)
        factors = self.scalar(self.norm(norm2(I + A + S))).reshape(n, f, 3)
        I, A, S = mix(self.lin_i, I), mix(self.lin_a, A), mix(self.lin_s, S)
        return factors[..., 0, None, None] * I + factors[..., 1, None, None] * A + factors[..., 2, None, None] * S


class TensorInteraction(nn.Module):
    """One interaction layer: normalise, mix, radial messages, matrix product, residual update."""

    def __init__(self, hidden: int, num_rbf: int, group: str) -> None:
        super().__init__()
        self.hidden = hidden
        self.group = group
        self.radial = nn.Sequential(
            dense(num_rbf, hidden), nn.SiLU(), dense(hidden, 2 * hidden), nn.SiLU(), dense(2 * hidden, 3 * hidden), nn.SiLU()
        )
        self.mixers = nn.ModuleList(dense(hidden, hidden, bias=False) for _ in range(6))

    def forward(
        self, X: torch.Tensor, rbf: torch.Tensor, fcut: torch.Tensor, idx_i: torch.Tensor, idx_j: torch.Tensor
    ) -> torch.Tensor:
        n = X.shape[0]
        f = (self.radial(rbf) * fcut[:, None]).reshape(-1, self.hidden, 3)  # (E, F, 3): f_I, f_A, f_S
        X = X / (norm2(X) + 1.0)[..., None, None]
        I, A, S = decompose(X)
        I, A, S = mix(self.mixers[0], I), mix(self.mixers[1], A), mix(self.mixers[2], S)
        Y = I + A + S
        # messages per component: scalar of I, antisymmetric A, symmetric traceless S of the neighbour
        m_i = scatter_sum(f[..., 0] * I[idx_j, :, 0, 0], idx_i, n)
        m_a = scatter_sum(f[..., 1, None, None] * gather(A, idx_j), idx_i, n)
        m_s = scatter_sum(f[..., 2, None, None] * gather(S, idx_j), idx_i, n)
        eye = torch.eye(3, dtype=X.dtype, device=X.device)
        M = m_i[..., None, None] * eye + m_a + m_s
        P = M @ Y + Y @ M if self.group == "O(3)" else 2.0 * (Y @ M)
        I, A, S = decompose(P)
        scale = (norm2(P) + 1.0)[..., None, None]
        dX = mix(self.mixers[3], I / scale) + mix(self.mixers[4], A / scale) + mix(self.mixers[5], S / scale)
        return X + dX + dX @ dX


# ----------------------------------------------------------------------------- the potential


class TensorNet(Potential):
    """TensorNet potential (NeurIPS 2023); per-atom outputs are unit-less, scaled in ``node_energies``.

    Hyperparameters: ``hidden_channels`` tensor channels F, ``num_layers`` interaction
    layers, ``num_rbf`` expnorm radial functions, ``equivariance_group`` "O(3)"
    (products M Y + Y M, parity-aware) or "SO(3)" (2 Y M).
    """

    architecture = "tensornet"
    readout_module = "readout"  # the shallow committee's heads (potentials/shallow.py)

    def __init__(
        self,
        species: Sequence[int | str],
        cutoff: float,
        *,
        hidden_channels: int = 64,
        num_layers: int = 2,
        num_rbf: int = 32,
        equivariance_group: str = "O(3)",
    ) -> None:
        super().__init__(species, cutoff)
        for name, value in (("hidden_channels", hidden_channels), ("num_rbf", num_rbf)):
            if int(value) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if int(num_layers) < 0:
            raise ValueError(f"num_layers: expected a non-negative integer, got {num_layers!r}")
        if equivariance_group not in GROUPS:
            raise ValueError(f"equivariance_group: expected one of {', '.join(GROUPS)}, got {equivariance_group!r}")
        self.hparams = dict(
            hidden_channels=int(hidden_channels), num_layers=int(num_layers), num_rbf=int(num_rbf),
            equivariance_group=equivariance_group,
        )
        # expnorm: exp(-β (exp(-α d) - μ_k)²), α = 5 / r_c, μ_k on [e^-5, 1] (torchmd-net's ExpNormalSmearing)
        self.radial_basis = ExponentialRBF(num_rbf, 5.0)
        self.cutoff_fn = CosineCutoff(self.cutoff)
        self.embedding = TensorEmbedding(len(self.species), hidden_channels, num_rbf)
        self.layers = nn.ModuleList(
            TensorInteraction(hidden_channels, num_rbf, equivariance_group) for _ in range(num_layers)
        )
        self.out_norm = nn.LayerNorm(3 * hidden_channels)
        self.out_linear = dense(3 * hidden_channels, hidden_channels)
        self.readout = mlp(hidden_channels, max(hidden_channels // 2, 1), 1, activation=nn.SiLU)

    def features(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """Per-atom tensor features X (N, hidden_channels, 3, 3) after the last interaction layer."""
        idx_i, idx_j = batch[keys.EDGE_INDEX]
        d = torch.linalg.vector_norm(vectors, dim=-1)
        unit = vectors / d[:, None]  # d > 0 for distinct images
        rbf = self.radial_basis(d * (5.0 / self.cutoff))
        fcut = self.cutoff_fn(d)
        X = self.embedding(species, rbf, fcut, unit, idx_i, idx_j)
        for layer in self.layers:
            X = layer(X, rbf, fcut, idx_i, idx_j)
        return X

    def atomic_energies(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        I, A, S = decompose(self.features(batch, vectors, species))
        invariants = torch.cat([norm2(I), norm2(A), norm2(S)], dim=-1)  # (N, 3F)
        x = nn.functional.silu(self.out_linear(self.out_norm(invariants)))
        return self.readout(x).squeeze(-1)
