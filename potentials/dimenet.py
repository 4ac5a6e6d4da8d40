"""DimeNet++: directional message passing on edges, with angles between pairs of edges.

Gasteiger, Giri, Margraf, Günnemann, "Fast and Uncertainty-Aware Directional
Message Passing for Non-Equilibrium Molecules", NeurIPS ML4Molecules workshop 2020
(arXiv:2011.14115), building on DimeNet (Gasteiger, Groß, Günnemann, ICLR 2020,
arXiv:2003.03123). What DimeNet adds to distance-only models: messages m_ji live on
directed edges and are updated from the messages m_kj arriving at j, weighted by a
joint basis of the distance d_kj and the angle α_kji at j:

    e_RBF,n(d)     = u(d/c) sin(n π d/c) / (d/c)                      (trainable frequencies nπ)
    a_SBF,ln(d, α) = u(d/c) / (d/c) · √2 / |j_{l+1}(z_ln)| · j_l(z_ln d/c) · Y_l^0(α)
    u(x)           = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2),  p = envelope_exponent + 1

(z_ln the n-th root of the spherical Bessel function j_l). The "++" version:
the message is down-projected to ``int_emb_size`` before the per-triplet product
with the SBF, both bases pass through ``basis_emb_size`` bottlenecks, and the
output blocks up-project to ``out_emb_channels``.

    embedding    m_ji = σ(W [h_i, h_j, σ(W e_RBF(d_ji))])
    interaction  x_kj = σ(W_down (σ(W_kj m_kj) ⊙ W_rbf e_RBF(d_kj)))
                 m_ji ← m_ji + residual stack(σ(W_ji m_ji) + σ(W_up Σ_k x_kj ⊙ W_sbf a_SBF(d_kj, α_kji)))
    output       E_i += MLP(W_up Σ_j W_rbf e_RBF(d_ji) ⊙ m_ji)          (one output block per stage)

In alflow's edge list, edge (i, j, S) carries D = r_j - r_i + S @ cell and the
message m_ji flowing from neighbour j to centre i. The triplets pair the edge
(i, j, S_ji) with every edge (j, k, S_kj) leaving j except the back-edge to the
same image of i, (k, S_kj) = (i, -S_ji); other images of i count (cells smaller
than the cutoff).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from alflow import keys
from potentials.base import Potential
from potentials.layers import PolynomialCutoff, dense, gather, scatter_sum

# spherical Bessel functions: power series below this argument, upward recurrence above (|error| < 1e-6 in float32)
_SERIES_BELOW = 4.5
_SERIES_TERMS = 16


# ----------------------------------------------------------------------------- triplets


def dimenet_triplets(edge_index: torch.Tensor, shifts: torch.Tensor, n_atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge pairs (idx_kj, idx_ji) for the angles k → j → i, vectorised.

    For every edge ji = (i, j, S_ji) (centre i, neighbour j) and every edge
    kj = (j, k, S_kj) centred at j, except the back-edge (k, S_kj) == (i, -S_ji).
    ``shifts`` (E, 3) are integer cell shifts (any dtype). Returns two (T,) int64 tensors.
    """
    centre, neighbour = edge_index[0], edge_index[1]
    n_edges = centre.shape[0]
    device = centre.device
    order = torch.argsort(centre, stable=True)  # edges grouped by centre atom
    counts = torch.bincount(centre, minlength=n_atoms)
    start = torch.cumsum(counts, 0) - counts  # first position of each atom's edges in ``order``
    per_edge = counts[neighbour]  # edges leaving j, for each edge ji
    idx_ji = torch.repeat_interleave(torch.arange(n_edges, device=device), per_edge)
    first = torch.cumsum(per_edge, 0) - per_edge
    offset = torch.arange(idx_ji.shape[0], device=device) - first[idx_ji]
    idx_kj = order[start[neighbour[idx_ji]] + offset]
    back = (neighbour[idx_kj] == centre[idx_ji]) & (shifts[idx_kj] == -shifts[idx_ji]).all(dim=-1)
    keep = ~back
    return idx_kj[keep], idx_ji[keep]


def triplet_cosines(vectors: torch.Tensor, idx_kj: torch.Tensor, idx_ji: torch.Tensor) -> torch.Tensor:
    """cos α_kji (T,), the angle at j between j → i (= -D_ji) and j → k (= D_kj), from edge vectors D (E, 3).

    Only cos α enters the basis (through P_l), so it is taken straight from the dot
    product: smooth to every order, also for collinear triplets (α = π in every
    perfect crystal), where atan2(|a × b|, a · b) would differentiate |a × b| at 0.
    """
    a, b = vectors[idx_ji], vectors[idx_kj]
    return -(a * b).sum(-1) / (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1))


# ----------------------------------------------------------------------------- special functions


def spherical_bessel(x: torch.Tensor) -> torch.Tensor:
    """j_l(x) for x > 0 of shape (..., L, N), where row l of the second-last axis gets order l.

    Upward recurrence j_{l+1} = (2l+1)/x j_l - j_{l-1} is unstable for x ≲ l, so
    orders l ≥ 1 use their power series there: j_l(x) = x^l/(2l+1)!! Σ_k (-x²/2)^k / (k! Π_{m=1..k}(2l+2m+1)).
    Both branches see clamped arguments, so neither produces non-finite values or gradients.
    """
    n_orders = x.shape[-2]
    order = torch.arange(n_orders, device=x.device, dtype=x.dtype)[:, None]  # (L, 1)
    xs = torch.clamp(x, max=_SERIES_BELOW)
    xr = torch.clamp(x, min=_SERIES_BELOW)
    sin_r, cos_r = torch.sin(xr), torch.cos(xr)
    recurrence = [sin_r / xr, sin_r / xr**2 - cos_r / xr]
    for l in range(1, n_orders - 1):
        recurrence.append((2 * l + 1) / xr * recurrence[l] - recurrence[l - 1])
    upward = torch.stack([recurrence[l][..., l, :] for l in range(n_orders)], dim=-2)
    y = -0.5 * xs * xs
    acc = torch.ones_like(xs)
    for k in range(_SERIES_TERMS, 0, -1):  # Horner, every order at once
        acc = 1.0 + acc * y / (k * (2 * order + 2 * k + 1))
    double_factorial = torch.tensor(
        [float(math.prod(range(1, 2 * l + 2, 2))) for l in range(n_orders)], device=x.device, dtype=x.dtype
    )[:, None]
    series = xs**order * acc / double_factorial
    j0 = torch.sin(x) / x  # exact for every x > 0
    out = torch.where(x < _SERIES_BELOW, series, upward)
    return torch.where(order == 0, j0, out)


def legendre(t: torch.Tensor, l_max: int) -> torch.Tensor:
    """Legendre polynomials P_0(t) … P_l_max(t), shape (*t.shape, l_max + 1) (Bonnet recurrence)."""
    out = [torch.ones_like(t), t]
    for l in range(1, l_max):
        out.append(((2 * l + 1) * t * out[l] - l * out[l - 1]) / (l + 1))
    return torch.stack(out[: l_max + 1], dim=-1)


def spherical_bessel_zeros(n_orders: int, n_roots: int) -> np.ndarray:
    """z_ln, the first ``n_roots`` positive roots of j_l for l < ``n_orders``, shape (n_orders, n_roots) (float64).

    Roots of j_l interlace those of j_{l-1}; found by bracketing with scipy's brentq (once, at init).
    """
    from scipy.optimize import brentq
    from scipy.special import spherical_jn

    roots = np.zeros((n_orders, n_roots + n_orders))
    roots[0] = np.arange(1, n_roots + n_orders + 1) * np.pi  # j_0 = sin(x)/x
    for l in range(1, n_orders):
        brackets = roots[l - 1]
        for n in range(n_roots + n_orders - l):
            roots[l, n] = brentq(lambda z: spherical_jn(l, z), brackets[n], brackets[n + 1], xtol=1e-15)
    return roots[:, :n_roots]


# ----------------------------------------------------------------------------- bases


class BesselBasis(nn.Module):
    """e_RBF,n(d) = u(d/c) sin(f_n d/c) / (d/c), f_n initialised to nπ and trainable (DimeNet eq. 7)."""

    def __init__(self, num_radial: int, cutoff: float, envelope_exponent: int = 5) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.envelope = PolynomialCutoff(cutoff, p=envelope_exponent + 1)
        self.freqs = nn.Parameter(torch.arange(1, num_radial + 1, dtype=torch.get_default_dtype()) * math.pi)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        """(E,) distances in Å → (E, num_radial)."""
        x = (d / self.cutoff)[:, None]
        return (self.envelope(d) / (d / self.cutoff))[:, None] * torch.sin(self.freqs * x)


class SphericalBasis(nn.Module):
    """a_SBF,ln(d_kj, α_kji) for l < num_spherical, n ≤ num_radial, flattened to (T, num_spherical · num_radial)."""

    def __init__(self, num_spherical: int, num_radial: int, cutoff: float, envelope_exponent: int = 5) -> None:
        super().__init__()
        self.num_spherical = num_spherical
        self.num_radial = num_radial
        self.cutoff = float(cutoff)
        self.envelope = PolynomialCutoff(cutoff, p=envelope_exponent + 1)
        zeros = spherical_bessel_zeros(num_spherical, num_radial)
        from scipy.special import spherical_jn

        norm = np.sqrt(2.0) / np.abs(np.stack([spherical_jn(l + 1, zeros[l]) for l in range(num_spherical)]))
        ylm = np.sqrt((2 * np.arange(num_spherical) + 1) / (4 * np.pi))
        # constants of the hyperparameters, kept in float64 (cast to the input's dtype in use) and out of checkpoints
        self.register_buffer("zeros", torch.tensor(zeros, dtype=torch.float64), persistent=False)
        self.register_buffer("norm", torch.tensor(norm, dtype=torch.float64), persistent=False)
        self.register_buffer("ylm_norm", torch.tensor(ylm, dtype=torch.float64), persistent=False)

    def radial(self, d: torch.Tensor) -> torch.Tensor:
        """(E,) distances → (E, L, N): u(x)/x · √2/|j_{l+1}(z_ln)| · j_l(z_ln x), x = d/c."""
        x = d / self.cutoff
        jl = spherical_bessel(self.zeros.to(d.dtype) * x[:, None, None])  # (E, L, N): j_l(z_ln x)
        return (self.envelope(d) / x)[:, None, None] * self.norm.to(d.dtype) * jl

    def angular(self, cos_angle: torch.Tensor) -> torch.Tensor:
        """(T,) cos α → (T, L): Y_l^0(α) = √((2l+1)/4π) P_l(cos α)."""
        return legendre(cos_angle, self.num_spherical - 1) * self.ylm_norm.to(cos_angle.dtype)

    def forward(self, d: torch.Tensor, cos_angle: torch.Tensor, idx_kj: torch.Tensor) -> torch.Tensor:
        """Edge distances d (E,), triplet cosines (T,) and source edges idx_kj (T,) → (T, L·N)."""
        out = self.radial(d)[idx_kj] * self.angular(cos_angle)[:, :, None]
        return out.reshape(out.shape[0], -1)


# ----------------------------------------------------------------------------- blocks


class ResidualLayer(nn.Module):
    """x + σ(W₂ σ(W₁ x + b₁) + b₂)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin1, self.lin2, self.act = dense(width, width), dense(width, width), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.lin2(self.act(self.lin1(x))))


class EmbeddingBlock(nn.Module):
    """Initial messages m_ji = σ(W [h_i, h_j, σ(W e_RBF(d_ji))]) from species embeddings h."""

    def __init__(self, n_species: int, num_radial: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_species, hidden)
        nn.init.uniform_(self.embedding.weight, -math.sqrt(3.0), math.sqrt(3.0))
        self.lin_rbf = dense(num_radial, hidden)
        self.lin = dense(3 * hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, species: torch.Tensor, rbf: torch.Tensor, idx_i: torch.Tensor, idx_j: torch.Tensor) -> torch.Tensor:
        h = self.embedding(species)
        return self.act(self.lin(torch.cat([gather(h, idx_i), gather(h, idx_j), self.act(self.lin_rbf(rbf))], dim=-1)))


class InteractionPPBlock(nn.Module):
    """DimeNet++ interaction: triplet messages in a down-projected space of width ``int_emb_size``."""

    def __init__(
        self, hidden: int, int_emb_size: int, basis_emb_size: int, num_spherical: int, num_radial: int,
        num_before_skip: int, num_after_skip: int,
    ) -> None:
        super().__init__()
        self.lin_rbf1 = dense(num_radial, basis_emb_size, bias=False)
        self.lin_rbf2 = dense(basis_emb_size, hidden, bias=False)
        self.lin_sbf1 = dense(num_spherical * num_radial, basis_emb_size, bias=False)
        self.lin_sbf2 = dense(basis_emb_size, int_emb_size, bias=False)
        self.lin_kj = dense(hidden, hidden)
        self.lin_ji = dense(hidden, hidden)
        self.lin_down = dense(hidden, int_emb_size, bias=False)
        self.lin_up = dense(int_emb_size, hidden, bias=False)
        self.before_skip = nn.Sequential(*(ResidualLayer(hidden) for _ in range(num_before_skip)))
        self.lin = dense(hidden, hidden)
        self.after_skip = nn.Sequential(*(ResidualLayer(hidden) for _ in range(num_after_skip)))
        self.act = nn.SiLU()

    def forward(
        self, m: torch.Tensor, rbf: torch.Tensor, sbf: torch.Tensor, idx_kj: torch.Tensor, idx_ji: torch.Tensor
    ) -> torch.Tensor:
        x_ji = self.act(self.lin_ji(m))
        x_kj = self.act(self.lin_kj(m)) * self.lin_rbf2(self.lin_rbf1(rbf))
        x_kj = self.act(self.lin_down(x_kj))  # (E, int_emb_size)
        triplet = x_kj[idx_kj] * self.lin_sbf2(self.lin_sbf1(sbf))  # (T, int_emb_size)
        x_kj = self.act(self.lin_up(scatter_sum(triplet, idx_ji, m.shape[0])))
        h = self.before_skip(x_ji + x_kj)
        h = self.act(self.lin(h)) + m
        return self.after_skip(h)


class OutputPPBlock(nn.Module):
    """Per-atom output: Σ_j W e_RBF(d_ji) ⊙ m_ji, up-projection, ``num_layers`` σ(W x + b), then one scalar."""

    def __init__(self, num_radial: int, hidden: int, out_emb: int, num_layers: int) -> None:
        super().__init__()
        self.lin_rbf = dense(num_radial, hidden, bias=False)
        self.lin_up = dense(hidden, out_emb)
        self.layers = nn.ModuleList(dense(out_emb, out_emb) for _ in range(num_layers))
        self.lin_out = dense(out_emb, 1, bias=False)
        self.act = nn.SiLU()

    def forward(self, m: torch.Tensor, rbf: torch.Tensor, idx_i: torch.Tensor, n_atoms: int) -> torch.Tensor:
        x = self.lin_up(scatter_sum(self.lin_rbf(rbf) * m, idx_i, n_atoms))
        for layer in self.layers:
            x = self.act(layer(x))
        return self.lin_out(x).squeeze(-1)


# ----------------------------------------------------------------------------- the potential


class DimeNetPP(Potential):
    """DimeNet++ potential (arXiv:2011.14115); per-atom outputs are unit-less, scaled in ``node_energies``.

    Hyperparameters: ``hidden_channels`` message width, ``out_emb_channels`` output-block
    width, ``num_blocks`` interaction blocks, ``int_emb_size`` triplet width,
    ``basis_emb_size`` basis bottleneck, ``num_spherical`` orders l, ``num_radial``
    radial functions, ``envelope_exponent`` (p = exponent + 1), residual layers
    ``num_before_skip`` / ``num_after_skip``, ``num_output_layers`` per output block.
    Defaults are half the paper's widths (128/256, 4 blocks) for ~100-atom cells at 5 Å,
    where an atom has ~40 neighbours and each edge ~40 triplets.
    """

    architecture = "dimenetpp"

    def __init__(
        self,
        species: Sequence[int | str],
        cutoff: float,
        *,
        hidden_channels: int = 64,
        out_emb_channels: int = 128,
        num_blocks: int = 3,
        int_emb_size: int = 64,
        basis_emb_size: int = 8,
        num_spherical: int = 7,
        num_radial: int = 6,
        envelope_exponent: int = 5,
        num_before_skip: int = 1,
        num_after_skip: int = 2,
        num_output_layers: int = 3,
    ) -> None:
        super().__init__(species, cutoff)
        positive = dict(
            hidden_channels=hidden_channels, out_emb_channels=out_emb_channels, int_emb_size=int_emb_size,
            basis_emb_size=basis_emb_size, num_spherical=num_spherical, num_radial=num_radial,
            envelope_exponent=envelope_exponent,
        )
        for name, value in positive.items():
            if int(value) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        counts = dict(
            num_blocks=num_blocks, num_before_skip=num_before_skip, num_after_skip=num_after_skip,
            num_output_layers=num_output_layers,
        )
        for name, value in counts.items():
            if int(value) < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
        self.hparams = {k: int(v) for k, v in {**positive, **counts}.items()}
        self.rbf = BesselBasis(num_radial, self.cutoff, envelope_exponent)
        self.sbf = SphericalBasis(num_spherical, num_radial, self.cutoff, envelope_exponent)
        self.embedding = EmbeddingBlock(len(self.species), num_radial, hidden_channels)
        self.interactions = nn.ModuleList(
            InteractionPPBlock(hidden_channels, int_emb_size, basis_emb_size, num_spherical, num_radial,
                               num_before_skip, num_after_skip)
            for _ in range(num_blocks)
        )
        self.outputs = nn.ModuleList(
            OutputPPBlock(num_radial, hidden_channels, out_emb_channels, num_output_layers)
            for _ in range(num_blocks + 1)
        )

    def atomic_energies(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        edge_index = batch[keys.EDGE_INDEX]
        idx_i, idx_j = edge_index
        n_atoms = species.shape[0]
        idx_kj, idx_ji = dimenet_triplets(edge_index, batch[keys.SHIFTS], n_atoms)
        d = torch.linalg.vector_norm(vectors, dim=-1)
        cos_angle = triplet_cosines(vectors, idx_kj, idx_ji)
        rbf = self.rbf(d)
        sbf = self.sbf(d, cos_angle, idx_kj)
        m = self.embedding(species, rbf, idx_i, idx_j)
        energy = self.outputs[0](m, rbf, idx_i, n_atoms)
        for interaction, output in zip(self.interactions, self.outputs[1:]):
            m = interaction(m, rbf, sbf, idx_kj, idx_ji)
            energy = energy + output(m, rbf, idx_i, n_atoms)
        return energy
