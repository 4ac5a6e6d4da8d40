"""PhysNet: message passing with an exponential radial basis, residual blocks and per-module outputs.

Unke & Meuwly, "PhysNet: A Neural Network for Predicting Energies, Forces, Dipole
Moments, and Partial Charges", J. Chem. Theory Comput. 15, 3678 (2019); layout
follows the authors' code (github.com/MMunibas/PhysNet). σ is the shifted softplus.

    g_k(r)     = φ(r) exp(-β (exp(-r) - μ_k)²),  φ(r) = 1 - 6 x⁵ + 15 x⁴ - 10 x³, x = r / r_c
    x_i        = e(Z_i)
    module m:  interaction  x̃_i = σ(W_I σ(x_i) + b_I) + Σ_j (G g_ij) ⊙ σ(W_J σ(x_j) + b_J)
                            x̃ ← residual^{n_residual_interaction}(x̃)
                            x_i ← u ⊙ x_i + W σ(x̃_i) + b
               atomwise     x ← residual^{n_residual_atomic}(x)
               output       y^m_i = W_O σ(residual^{n_residual_output}(x_i))    (E, q) per atom
    E_i = Σ_m y^m_{i,E},  q_i = Σ_m y^m_{i,q}
    residual(x) = x + W₂ σ(W₁ σ(x) + b₁) + b₂

G is the linear "attention mask" on the radial basis. With ``charges=True`` the
partial charges are corrected to the total charge Q of each structure
(``batch["charge"]`` if present, else 0): q_i ← q_i - (Σ_struct q - Q) / N_struct, and

    E_i += ½ k_e Σ_j q_i q_j [χ(r_ij) s(√(r_ij² + 1)) + (1 - χ(r_ij)) s(r_ij)],  s(r) = 1/r + r/r_c² - 2/r_c

summed over the *full* periodic neighbor list within r_c (both (i, j) and (j, i), hence ½),
χ(r) = φ(2r) switching from the shielded to the bare Coulomb law at r_c / 2 (the paper's
switching function). s is the shifted-force form of the authors' code, so energy and forces
go smoothly to zero at r_c. Deviation from the paper: this is a short-range Coulomb term only —
there is no Ewald / long-range summation for periodic cells (the long-range tail beyond r_c is
dropped), and no D3 dispersion. The Coulomb energy is in eV (charges in e) and is added after
``scale``/``shift``/``E0``; the model's per-module energies stay unit-less as in ``Potential``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from alflow import keys
from potentials.base import Potential
from potentials.layers import ExponentialRBF, PolynomialCutoff, dense, gather, scatter_sum, shifted_softplus

COULOMB_CONSTANT = 14.399645  # eV Å / e², 1 / (4 π ε0)
TOTAL_CHARGE = keys.CHARGE  # optional batch key: (B,) total charge of each structure, in e


class Residual(nn.Module):
    """Pre-activation residual layer: x + W₂ σ(W₁ σ(x) + b₁) + b₂."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.dense1 = dense(n, n)
        self.dense2 = dense(n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dense2(shifted_softplus(self.dense1(shifted_softplus(x))))


class PhysNetInteraction(nn.Module):
    """Interaction layer + residual atomic layers (one PhysNet module without its output block)."""

    def __init__(self, n_atom_basis: int, n_rbf: int, n_residual_interaction: int, n_residual_atomic: int) -> None:
        super().__init__()
        self.attention = dense(n_rbf, n_atom_basis, bias=False)  # G
        self.dense_i = dense(n_atom_basis, n_atom_basis)
        self.dense_j = dense(n_atom_basis, n_atom_basis)
        self.residual_interaction = nn.Sequential(*(Residual(n_atom_basis) for _ in range(n_residual_interaction)))
        self.update = dense(n_atom_basis, n_atom_basis)
        self.gate = nn.Parameter(torch.ones(n_atom_basis))  # u
        self.residual_atomic = nn.Sequential(*(Residual(n_atom_basis) for _ in range(n_residual_atomic)))

    def forward(self, x: torch.Tensor, rbf: torch.Tensor, idx_i: torch.Tensor, idx_j: torch.Tensor) -> torch.Tensor:
        a = shifted_softplus(x)
        own = shifted_softplus(self.dense_i(a))
        neighbours = shifted_softplus(self.dense_j(a))
        m = own + scatter_sum(self.attention(rbf) * gather(neighbours, idx_j), idx_i, x.shape[0])
        m = self.residual_interaction(m)
        x = self.gate * x + self.update(shifted_softplus(m))
        return self.residual_atomic(x)


class PhysNetOutput(nn.Module):
    """Output block: residual layers, σ, then a linear map to n_out per-atom outputs."""

    def __init__(self, n_atom_basis: int, n_residual_output: int, n_out: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(*(Residual(n_atom_basis) for _ in range(n_residual_output)))
        self.out = dense(n_atom_basis, n_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(shifted_softplus(self.residual(x)))


class PhysNet(Potential):
    """PhysNet potential (JCTC 15, 3678 (2019)), optionally with partial charges and short-range Coulomb.

    Hyperparameters: ``n_atom_basis`` feature width, ``n_modules`` modules (paper: 5),
    ``n_residual_atomic`` / ``n_residual_interaction`` / ``n_residual_output`` residual layers
    per module, ``n_rbf`` exponential radial basis functions, ``charges`` to predict partial
    charges with a shielded Coulomb term (see the module docstring).
    """

    architecture = "physnet"

    def __init__(
        self,
        species: Sequence[int | str],
        cutoff: float,
        *,
        n_atom_basis: int = 64,
        n_modules: int = 3,
        n_residual_atomic: int = 2,
        n_residual_interaction: int = 3,
        n_residual_output: int = 1,
        n_rbf: int = 32,
        charges: bool = False,
    ) -> None:
        super().__init__(species, cutoff)
        for name, value in (("n_atom_basis", n_atom_basis), ("n_modules", n_modules), ("n_rbf", n_rbf)):
            if int(value) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name, value in (("n_residual_atomic", n_residual_atomic), ("n_residual_interaction", n_residual_interaction),
                            ("n_residual_output", n_residual_output)):
            if int(value) < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
        if not isinstance(charges, bool):
            raise ValueError(f"charges: expected true or false, got {charges!r}")
        self.hparams = dict(
            n_atom_basis=n_atom_basis, n_modules=n_modules, n_residual_atomic=n_residual_atomic,
            n_residual_interaction=n_residual_interaction, n_residual_output=n_residual_output, n_rbf=n_rbf,
            charges=charges,
        )
        self.charges = charges
        self.embedding = nn.Embedding(len(self.species), n_atom_basis)
        self.radial_basis = ExponentialRBF(n_rbf, self.cutoff)
        self.cutoff_fn = PolynomialCutoff(self.cutoff, p=3)  # 1 - 10x³ + 15x⁴ - 6x⁵
        self.switch_fn = PolynomialCutoff(0.5 * self.cutoff, p=3)  # χ(r) = φ(2r)
        self.interactions = nn.ModuleList(
            PhysNetInteraction(n_atom_basis, n_rbf, n_residual_interaction, n_residual_atomic) for _ in range(n_modules)
        )
        n_out = 2 if charges else 1
        self.outputs = nn.ModuleList(PhysNetOutput(n_atom_basis, n_residual_output, n_out) for _ in range(n_modules))

    def atomic_outputs(
        self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unit-less per-atom energies (N,) and, with ``charges``, uncorrected partial charges (N,) in e."""
        idx_i, idx_j = batch[keys.EDGE_INDEX]
        d = torch.linalg.vector_norm(vectors, dim=-1)
        rbf = self.radial_basis(d) * self.cutoff_fn(d)[:, None]
        x = self.embedding(species)
        total = torch.zeros(x.shape[0], self.outputs[0].out.out_features, dtype=x.dtype, device=x.device)
        for interaction, output in zip(self.interactions, self.outputs):
            x = interaction(x, rbf, idx_i, idx_j)
            total = total + output(x)
        return total[:, 0], (total[:, 1] if self.charges else None)

    def atomic_energies(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        return self.atomic_outputs(batch, vectors, species)[0]

    def conserve_charge(self, batch: dict[str, torch.Tensor], q: torch.Tensor) -> torch.Tensor:
        """q_i - (Σ q - Q) / N per structure; Q from ``batch["charge"]`` (B,) or 0."""
        structure = batch[keys.BATCH]
        n_structures = batch[keys.CELL].shape[0]
        excess = scatter_sum(q, structure, n_structures)
        if TOTAL_CHARGE in batch:
            excess = excess - batch[TOTAL_CHARGE].to(q.dtype).reshape(n_structures)
        return q - (excess / batch[keys.N_ATOMS].to(q.dtype))[structure]

    def coulomb_energies(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Per-atom shielded, shifted-force Coulomb energies (N,) in eV for charges q (N,) in e."""
        idx_i, idx_j = batch[keys.EDGE_INDEX]
        d = torch.linalg.vector_norm(vectors, dim=-1)
        rc = self.cutoff

        def shifted(r: torch.Tensor) -> torch.Tensor:  # 1/r with value and slope shifted to 0 at r_c
            return 1.0 / r + r / rc**2 - 2.0 / rc

        chi = self.switch_fn(d)
        pair = chi * shifted(torch.sqrt(d**2 + 1.0)) + (1.0 - chi) * shifted(d)
        pair = pair * (d < rc).to(d.dtype)
        return scatter_sum(0.5 * COULOMB_CONSTANT * gather(q, idx_i) * gather(q, idx_j) * pair, idx_i, q.shape[0])

    def partial_charges(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Charge-conserving partial charges (N,) in e of a batch (needs ``charges=True``)."""
        if not self.charges:
            raise ValueError("partial_charges: this PhysNet was built with charges=False")
        from alflow.neighbors import edge_vectors

        edge_index = batch[keys.EDGE_INDEX]
        vectors = edge_vectors(batch[keys.POSITIONS], batch[keys.CELL], edge_index[0], edge_index[1],
                               batch[keys.SHIFTS], batch[keys.BATCH])
        _, q = self.atomic_outputs(batch, vectors, self.species_index(batch[keys.NUMBERS]))
        return self.conserve_charge(batch, q)

    def node_energies(self, batch: dict[str, torch.Tensor], vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        if not self.charges:
            return super().node_energies(batch, vectors, species)
        out, q = self.atomic_outputs(batch, vectors, species)
        q = self.conserve_charge(batch, q)
        return out * self.scale + self.shift + self.e0[species] + self.coulomb_energies(batch, vectors, q)
