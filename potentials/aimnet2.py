"""AIMNet2: atoms-in-molecules network with iterative charge equilibration.

Anstine, Zubatyuk, Isayev, "AIMNet2: a neural network potential to meet your
neutral, charged, organic, and elemental-organic needs", Chem. Sci. (2025),
preprint ChemRxiv (2024); layout follows isayevlab/aimnetcentral
(``modules/aev.py``, ``models/aimnet2.py``, ``ops.nse``). What it adds over a
SchNet-like model: per-atom partial charges q_i that are passed along with the
atom-in-molecule (AIM) features a_i and kept exactly conserved per structure.

    geometry   g_ij = exp(-(d - μ_k)²/2w²) f_cut(d)  (E, G);   r̂_ij = D/|D|,  D = r_j - r_i + S @ cell
    conv(x)    radial  Σ_j x_j ⊗ g_ij                               (N, C·G)
               vector  u_i = Σ_j x_j ⊗ (Σ_k g_ij,k A_ckh) ⊗ r̂_ij      (N, C, H, 3)
                       → |u_i|² (N, C·H), rotation invariant
    pass 0     [a, conv(a)]                 → MLP → (q, f, Δa)
    pass t     [a, conv(a), q, conv(q)]     → MLP → (Δq, f, Δa);  q += Δq,  a += Δa
    charge     q_i ← q_i - f_i / Σ_s f · (Σ_s q - Q_s)  per structure s,
               f_i = softplus(·) > 0,  Q_s = batch["charge"] or 0
    last pass  [a, conv(a), q, conv(q)]     → MLP → AIM vector → MLP → E_i

Optional Coulomb energy (``coulomb=True``) from the final charges, inside the
neighbour list only: the damped shifted-force (DSF) pair sum of Fennell &
Gezelter, J. Chem. Phys. 124, 234104 (2006), whose energy and force go to zero
at the cutoff (continuous energy and forces), plus its self term. No Ewald sum is
done: for periodic cells it is a real-space, cut-off approximation of the
electrostatics (fine for metals and screened systems; the network learns the rest).

Deviations from the paper, all for periodic materials: one shared cutoff for
radial and vector terms (the neighbour list), f_i = softplus instead of a square
(never zero, so Σq = Q holds exactly without an ε), DSF Coulomb instead of a
free-space 1/r sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from alflow import keys
from alflow.neighbors import edge_vectors
from potentials.base import Potential
from potentials.layers import CosineCutoff, GaussianRBF, gather, mlp, scatter_sum

CHARGE = keys.CHARGE  # batch key: (B,) total charge per structure in e (absent = neutral)
COULOMB_CONSTANT = 14.399645  # e²/(4πε₀) in eV·Å


def distribute_excess_charge(
    q: torch.Tensor, weights: torch.Tensor, total: torch.Tensor, structure: torch.Tensor
) -> torch.Tensor:
    """q_i - w_i / Σ_s w · (Σ_s q - Q_s): per-structure sums equal ``total`` (B,) exactly; weights (N,) > 0."""
    n_structures = total.shape[0]
    excess = scatter_sum(q, structure, n_structures) - total
    weight_sum = scatter_sum(weights, structure, n_structures)
    return q - weights / weight_sum[structure] * excess[structure]


def dsf_coulomb(
    q: torch.Tensor, d: torch.Tensor, idx_i: torch.Tensor, idx_j: torch.Tensor, cutoff: float, alpha: float
) -> torch.Tensor:
    """Per-atom damped-shifted-force Coulomb energies (N,) in eV from charges q (e) and a full neighbour list.

    E = ½ Σ_(i,j) k q_i q_j [erfc(αd)/d - erfc(αr_c)/r_c + (erfc(αr_c)/r_c² + 2α/√π e^(-α²r_c²)/r_c)(d - r_c)]
        - k (erfc(αr_c)/(2r_c) + α/√π) Σ_i q_i²;  the pair term and its derivative vanish at d = r_c.
    """
    rc = float(cutoff)
    erfc_rc = math.erfc(alpha * rc)
    slope = erfc_rc / rc**2 + 2.0 * alpha / math.sqrt(math.pi) * math.exp(-((alpha * rc) ** 2)) / rc
    pair = torch.erfc(alpha * d) / d - erfc_rc / rc + slope * (d - rc)
    e_pair = 0.5 * COULOMB_CONSTANT * gather(q, idx_i) * gather(q, idx_j) * pair
    self_term = COULOMB_CONSTANT * (erfc_rc / (2.0 * rc) + alpha / math.sqrt(math.pi)) * q**2
    return scatter_sum(e_pair, idx_i, q.shape[0]) - self_term


class RadialVectorConv(nn.Module):
    """AIMNet2 convolution of per-atom features x (N, C) with the radial and vector AEV: (N, C·G + C·H)."""

    def __init__(self, n_channels: int, n_rbf: int, n_vector: int) -> None:
        super().__init__()
        self.n_channels = n_channels
        # per channel, H learned combinations of the G radial shells for the vector terms
        self.combination = nn.Parameter(torch.randn(n_channels, n_rbf, n_vector) / math.sqrt(n_rbf))

    @property
    def n_out(self) -> int:
        c, g, h = self.combination.shape
        return c * (g + h)

    def forward(
        self, x: torch.Tensor, g: torch.Tensor, direction: torch.Tensor, idx_i: torch.Tensor, idx_j: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        x_j = gather(x, idx_j)  # (E, C)
        radial = scatter_sum(x_j[:, :, None] * g[:, None, :], idx_i, n)  # (N, C, G)
        coef = torch.einsum("eg,cgh->ech", g, self.combination) * x_j[:, :, None]  # (E, C, H)
        vector = scatter_sum(coef[..., None] * direction[:, None, None, :], idx_i, n)  # (N, C, H, 3)
        return torch.cat([radial.flatten(1), vector.pow(2).sum(-1).flatten(1)], dim=-1)


class AIMNet2(Potential):
    """AIMNet2 potential (Chem. Sci. 2025); per-atom outputs are unit-less, scaled in ``node_energies``.

    Hyperparameters: ``n_features`` AIM feature width F, ``n_rbf`` Gaussian shells G
    (centres from ``rbf_start`` Å to the cutoff), ``n_vector`` vector combinations H
    per feature, ``n_passes`` message passes (the last one gives the AIM vector;
    at least 2 so that charges exist), ``hidden`` widths of each pass MLP,
    ``aim_size`` AIM vector width, ``coulomb`` add the DSF Coulomb energy of the
    charges (eV, not scaled) with damping ``coulomb_alpha`` (1/Å).
    The total charge per structure is read from ``batch["charge"]`` (B,) when present, else 0.
    """

    architecture = "aimnet2"
    readout_module = "readout"  # the shallow committee's heads (potentials/shallow.py)

    def __init__(
        self,
        species: Sequence[int | str],
        cutoff: float,
        *,
        n_features: int = 64,
        n_rbf: int = 16,
        n_vector: int = 8,
        n_passes: int = 3,
        hidden: Sequence[int] = (256, 128),
        aim_size: int = 128,
        rbf_start: float = 0.8,
        coulomb: bool = False,
        coulomb_alpha: float = 0.2,
    ) -> None:
        super().__init__(species, cutoff)
        sizes = (("n_features", n_features), ("n_rbf", n_rbf), ("n_vector", n_vector), ("aim_size", aim_size))
        for name, value in sizes:
            if int(value) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if int(n_passes) < 2:
            raise ValueError(f"n_passes: expected at least 2 (charge passes + the final pass), got {n_passes!r}")
        hidden = [int(h) for h in ([hidden] if isinstance(hidden, int) else hidden)]
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden: expected one or more positive layer widths, got {hidden!r}")
        if not 0.0 <= float(rbf_start) < self.cutoff:
            raise ValueError(f"rbf_start: expected a distance in [0, cutoff) Å, got {rbf_start!r}")
        if float(coulomb_alpha) < 0.0:
            raise ValueError(f"coulomb_alpha: expected a non-negative damping in 1/Å, got {coulomb_alpha!r}")
        self.hparams = dict(
            n_features=int(n_features), n_rbf=int(n_rbf), n_vector=int(n_vector), n_passes=int(n_passes),
            hidden=hidden, aim_size=int(aim_size), rbf_start=float(rbf_start), coulomb=bool(coulomb),
            coulomb_alpha=float(coulomb_alpha),
        )  # fmt: skip
        self.n_features = int(n_features)
        self.coulomb = bool(coulomb)
        self.coulomb_alpha = float(coulomb_alpha)
        self.embedding = nn.Embedding(len(self.species), n_features)
        self.radial_basis = GaussianRBF(n_rbf, self.cutoff, start=float(rbf_start))
        self.cutoff_fn = CosineCutoff(self.cutoff)
        self.conv_a = RadialVectorConv(n_features, n_rbf, n_vector)
        self.conv_q = RadialVectorConv(1, n_rbf, n_vector)
        n_in_first = n_features + self.conv_a.n_out
        n_in = n_in_first + 1 + self.conv_q.n_out
        passes = [mlp(n_in_first, hidden, 2 + n_features, activation=nn.GELU)]
        passes += [mlp(n_in, hidden, 2 + n_features, activation=nn.GELU) for _ in range(int(n_passes) - 2)]
        passes.append(nn.Sequential(mlp(n_in, hidden, aim_size, activation=nn.GELU), nn.GELU()))
        self.passes = nn.ModuleList(passes)
        self.readout = mlp(aim_size, max(aim_size // 2, 1), 1, activation=nn.GELU)

    def _run(
        self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit-less outputs (N,), final charges (N,) in e, distances (E,) in Å."""
        idx_i, idx_j = batch[keys.EDGE_INDEX]
        structure = batch[keys.BATCH]
        n_structures = batch[keys.CELL].shape[0]
        total = batch.get(CHARGE)
        if total is None:
            total = torch.zeros(n_structures, dtype=vectors.dtype, device=vectors.device)
        total = total.to(vectors.dtype)
        d = torch.linalg.vector_norm(vectors, dim=-1)
        direction = vectors / d[:, None]  # d > 0 for distinct images
        g = self.radial_basis(d) * self.cutoff_fn(d)[:, None]
        a = self.embedding(species).to(vectors.dtype)
        q = a.new_zeros(a.shape[0])  # replaced by the charges of pass 0
        for t, block in enumerate(self.passes):
            features = [a, self.conv_a(a, g, direction, idx_i, idx_j)]
            if t > 0:
                features += [q[:, None], self.conv_q(q[:, None], g, direction, idx_i, idx_j)]
            out = block(torch.cat(features, dim=-1))
            if t == len(self.passes) - 1:
                return self.readout(out).squeeze(-1), q, d
            dq, f, da = out[:, 0], out[:, 1], out[:, 2:]
            q = dq if t == 0 else q + dq
            q = distribute_excess_charge(q, nn.functional.softplus(f), total, structure)
            a = a + da
        raise AssertionError("unreachable: n_passes >= 2")

    def atomic_energies(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        return self._run(batch, vectors, species)[0]

    def node_energies(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """scale · out + shift + E0, plus the per-atom DSF Coulomb energy (eV) when ``coulomb``."""
        out, q, d = self._run(batch, vectors, species)
        energy = out * self.scale + self.shift + self.e0[species]
        if self.coulomb:
            idx_i, idx_j = batch[keys.EDGE_INDEX]
            energy = energy + dsf_coulomb(q, d, idx_i, idx_j, self.cutoff, self.coulomb_alpha)
        return energy

    def partial_charges(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final partial charges (N,) in e; they sum to ``batch["charge"]`` (or 0) per structure."""
        idx_i, idx_j = batch[keys.EDGE_INDEX]
        vectors = edge_vectors(batch[keys.POSITIONS], batch[keys.CELL], idx_i, idx_j, batch[keys.SHIFTS], batch[keys.BATCH])
        return self._run(batch, vectors, self.species_index(batch[keys.NUMBERS]))[1]
