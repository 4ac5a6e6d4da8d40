"""ANI: Behler–Parrinello atomic neural networks on ANI atomic environment vectors (AEVs).

Behler & Parrinello, Phys. Rev. Lett. 98, 146401 (2007); Behler, J. Chem. Phys.
134, 074106 (2011); the AEV of Smith, Isayev & Roitberg, Chem. Sci. 8, 3192 (2017)
(ANI-1), with the ANI-2x constants (Devereux et al., JCTC 16, 4192 (2020);
torchani ``AEVComputer.like_2x``). No message passing: each atom's energy is a
species-specific MLP of a fixed, hand-designed description of its neighbourhood.

For centre i, neighbour images j (edges of the periodic neighbor list) and
f_c(r; R_c) = ½ (cos(π r / R_c) + 1) for r < R_c:

    radial, per neighbour species Z and shift R_s:
        G^R = ¼ Σ_{j ∈ Z} exp(-η_R (R_ij - R_s)²) f_c(R_ij; R_cr)
    angular, per unordered species pair {Z, Z'} and shifts (R_s, θ_s):
        G^A = 2^{1-ζ} Σ_{{j,k}} (1 + cos(θ_ijk - θ_s))^ζ exp(-η_A ((R_ij + R_ik)/2 - R_s)²)
                                                             · f_c(R_ij; R_ca) f_c(R_ik; R_ca)
    summed over each unordered pair {j, k} of distinct edges once (torchani: 2 ((1 + cos(θ - θ_s)) / 2)^ζ …)

The ¼ and the 0.95 factor on cos θ (θ = arccos(0.95 cos θ_ijk), which keeps the
derivative finite at 0 and π) follow NeuroChem/torchani. Pairs are pairs of
distinct *edges* (periodic images), so cells smaller than the cutoff work; they come from
``potentials.triplets`` (inside a committee's ``torch.vmap`` the angular edge selection is the
union over members, ``union_over_vmap``, so a committee of ANI models runs vectorised).

Cutoffs: the radial cutoff R_cr is the model's ``cutoff`` (ANI-2x: 5.1 Å); the angular
cutoff is R_ca = min(``angular_cutoff``, cutoff) (ANI-2x: 3.5 Å). Shifts cover
[start, cutoff) linearly as in ANI: R_s = start + k (R_c - start) / n, θ_s = (2k + 1) π / (2 n_θ).
Defaults (ANI-2x): η_R = 19.7 Å⁻², 16 radial shifts from 0.8 Å; η_A = 12.5 Å⁻², ζ = 14.1,
8 angular radial shifts from 0.8 Å × 4 angle sections. AEV length:

    n_species · n_radial + n_species (n_species + 1) / 2 · n_angular · n_angle_sections

Atomic networks: one MLP per species, AEV → 160 → 128 → 96 → 1 with CELU(α = 0.1)
(the ANI-2x widths for S, F, Cl). Optional AEV standardisation: the network sees
(AEV - ``aev_mean``) / ``aev_std``, buffers saved with the checkpoint, identity unless
:meth:`ANI.fit_aev_standardization` is called on training data (not needed: on EMT Cu the raw
AEV, whose entries are O(0.01–1), trained faster than the standardised one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from alflow import keys
from alflow.neighbors import edge_vectors
from potentials.base import Potential
from potentials.layers import CosineCutoff, gather, mlp, scatter_sum
from potentials.triplets import triplets, union_over_vmap


class AEV(nn.Module):
    """ANI atomic environment vectors (N, length) from the periodic neighbor list (see the module docstring)."""

    def __init__(
        self,
        n_species: int,
        radial_cutoff: float,
        angular_cutoff: float,
        *,
        n_radial: int,
        n_angular: int,
        n_angle_sections: int,
        radial_eta: float,
        angular_eta: float,
        zeta: float,
        radial_start: float,
        angular_start: float,
    ) -> None:
        super().__init__()
        self.n_species = n_species
        self.radial_cutoff = float(radial_cutoff)
        self.angular_cutoff = float(angular_cutoff)
        self.radial_eta = float(radial_eta)
        self.angular_eta = float(angular_eta)
        self.zeta = float(zeta)
        self.radial_fc = CosineCutoff(self.radial_cutoff)
        self.angular_fc = CosineCutoff(self.angular_cutoff)
        self.register_buffer("radial_shifts", torch.linspace(radial_start, self.radial_cutoff, n_radial + 1)[:-1])
        self.register_buffer("angular_shifts", torch.linspace(angular_start, self.angular_cutoff, n_angular + 1)[:-1])
        theta = (torch.arange(n_angle_sections, dtype=torch.float64) * 2 + 1) * math.pi / (2 * n_angle_sections)
        self.register_buffer("cos_theta_s", torch.cos(theta).float())
        self.register_buffer("sin_theta_s", torch.sin(theta).float())
        # unordered species pair (a, b) -> column block, as torchani's triu_index
        a, b = torch.triu_indices(n_species, n_species)
        pair = torch.zeros(n_species, n_species, dtype=torch.long)
        pair[a, b] = torch.arange(a.shape[0])
        pair[b, a] = torch.arange(a.shape[0])
        self.register_buffer("pair_index", pair, persistent=False)
        self.n_pairs = int(a.shape[0])
        self.radial_length = n_species * n_radial
        self.angular_sublength = n_angular * n_angle_sections
        self.length = self.radial_length + self.n_pairs * self.angular_sublength

    def forward(self, edge_index: torch.Tensor, vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """AEVs (N, length) for pair vectors (E, 3) Å and species indices (N,)."""
        n_atoms = species.shape[0]
        idx_i, idx_j = edge_index
        d = torch.linalg.vector_norm(vectors, dim=-1)
        # radial: (E, n_radial) summed into (N, n_species, n_radial)
        radial = 0.25 * torch.exp(-self.radial_eta * (d[:, None] - self.radial_shifts) ** 2) * self.radial_fc(d)[:, None]
        radial = scatter_sum(radial, idx_i * self.n_species + gather(species, idx_j), n_atoms * self.n_species)
        # angular: unordered pairs of distinct edges around each centre, both within R_ca
        # inside a committee's vmap the selection is the union over members (same geometry); f_c is exact per member
        a, b = triplets(edge_index, n_atoms, union_over_vmap(d < self.angular_cutoff), ordered=False)
        da, db = d[a], d[b]
        cos = 0.95 * (vectors[a] * vectors[b]).sum(-1) / (da * db)
        sin = torch.sqrt(1.0 - cos**2)
        cos_shifted = cos[:, None] * self.cos_theta_s + sin[:, None] * self.sin_theta_s  # cos(θ - θ_s)
        f_angle = (0.5 * (1.0 + cos_shifted)).clamp_min(0.0) ** self.zeta  # (T, n_sections)
        mean_d = 0.5 * (da + db)
        f_dist = torch.exp(-self.angular_eta * (mean_d[:, None] - self.angular_shifts) ** 2)  # (T, n_angular)
        f_cut = self.angular_fc(da) * self.angular_fc(db)
        angular = 2.0 * (f_dist[:, :, None] * f_angle[:, None, :]).flatten(1) * f_cut[:, None]
        column = self.pair_index[species[idx_j[a]], species[idx_j[b]]]
        angular = scatter_sum(angular, idx_i[a] * self.n_pairs + column, n_atoms * self.n_pairs)
        return torch.cat([radial.reshape(n_atoms, -1), angular.reshape(n_atoms, -1)], dim=1)


class ANI(Potential):
    """ANI-style Behler–Parrinello potential with the ANI-2x AEV (see the module docstring).

    Hyperparameters: ``angular_cutoff`` R_ca in Å (used as min(R_ca, cutoff)); ``n_radial``,
    ``n_angular``, ``n_angle_sections`` the numbers of R_s and θ_s shifts; ``radial_eta``,
    ``angular_eta`` (Å⁻²), ``zeta``; ``radial_start``, ``angular_start`` the first shifts (Å);
    ``hidden`` the widths of each species' MLP; ``celu_alpha`` its CELU α.
    """

    architecture = "ani"

    def __init__(
        self,
        species: Sequence[int | str],
        cutoff: float,
        *,
        angular_cutoff: float = 3.5,
        n_radial: int = 16,
        n_angular: int = 8,
        n_angle_sections: int = 4,
        radial_eta: float = 19.7,
        angular_eta: float = 12.5,
        zeta: float = 14.1,
        radial_start: float = 0.8,
        angular_start: float = 0.8,
        hidden: Sequence[int] = (160, 128, 96),
        celu_alpha: float = 0.1,
    ) -> None:
        super().__init__(species, cutoff)
        for name, value in (("n_radial", n_radial), ("n_angular", n_angular), ("n_angle_sections", n_angle_sections)):
            if int(value) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name, value in (("angular_cutoff", angular_cutoff), ("radial_eta", radial_eta),
                            ("angular_eta", angular_eta), ("zeta", zeta), ("celu_alpha", celu_alpha)):
            if not float(value) > 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        r_ca = min(float(angular_cutoff), self.cutoff)
        for name, start, r_c in (("radial_start", radial_start, self.cutoff), ("angular_start", angular_start, r_ca)):
            if not 0 <= float(start) < r_c:
                raise ValueError(f"{name}: expected a value in [0, {r_c}) Å (below its cutoff), got {start!r}")
        hidden = [int(h) for h in hidden]
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden: expected one or more positive layer widths, got {hidden!r}")
        self.hparams = dict(
            angular_cutoff=angular_cutoff, n_radial=n_radial, n_angular=n_angular, n_angle_sections=n_angle_sections,
            radial_eta=radial_eta, angular_eta=angular_eta, zeta=zeta, radial_start=radial_start,
            angular_start=angular_start, hidden=hidden, celu_alpha=celu_alpha,
        )
        self.aev = AEV(
            len(self.species), self.cutoff, r_ca, n_radial=int(n_radial), n_angular=int(n_angular),
            n_angle_sections=int(n_angle_sections), radial_eta=radial_eta, angular_eta=angular_eta, zeta=zeta,
            radial_start=radial_start, angular_start=angular_start,
        )
        self.register_buffer("aev_mean", torch.zeros(self.aev.length))
        self.register_buffer("aev_std", torch.ones(self.aev.length))
        alpha = float(celu_alpha)
        self.networks = nn.ModuleList(
            mlp(self.aev.length, hidden, 1, activation=lambda: nn.CELU(alpha)) for _ in self.species
        )

    def descriptors(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor | None = None) -> torch.Tensor:
        """The raw (unstandardised) AEVs (N, ``self.aev.length``) of a batch."""
        if vectors is None:
            edge_index = batch[keys.EDGE_INDEX]
            vectors = edge_vectors(batch[keys.POSITIONS], batch[keys.CELL], edge_index[0], edge_index[1],
                                   batch[keys.SHIFTS], batch[keys.BATCH])
        return self.aev(batch[keys.EDGE_INDEX], vectors, self.species_index(batch[keys.NUMBERS]))

    @torch.no_grad()
    def fit_aev_standardization(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Set ``aev_mean`` / ``aev_std`` to the per-feature mean and standard deviation over all atoms of ``batches``.

        The std is floored at 1 % of the largest feature std, so that features which barely vary
        (far Gaussian tails, a species pair absent from the data) are centred but not amplified.
        """
        total, total_sq, count = 0.0, 0.0, 0
        for batch in batches:
            x = self.descriptors(batch).to(torch.float64)
            total, total_sq, count = total + x.sum(0), total_sq + (x**2).sum(0), count + x.shape[0]
        if count == 0:
            raise ValueError("batches: expected at least one atom to fit the AEV standardisation")
        mean = total / count
        std = (total_sq / count - mean**2).clamp_min(0.0).sqrt()
        # floor: features that barely vary (Gaussian tails, ~1e-12) must not be blown up into noise
        floor = 0.01 * std.max() if bool(std.max() > 0) else torch.ones_like(std.max())
        std = std.clamp_min(floor)
        self.aev_mean.copy_(mean.to(self.aev_mean))
        self.aev_std.copy_(std.to(self.aev_std))

    def atomic_energies(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        x = (self.aev(batch[keys.EDGE_INDEX], vectors, species) - self.aev_mean) / self.aev_std
        out = torch.zeros(species.shape[0], dtype=x.dtype, device=x.device)
        for s, network in enumerate(self.networks):  # a loop over species, not atoms
            atoms = torch.nonzero(species == s).squeeze(1)
            out = out.index_add(0, atoms, network(x[atoms]).squeeze(-1))
        return out
