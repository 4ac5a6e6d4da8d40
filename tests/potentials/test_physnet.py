"""PhysNet-specific checks: radial basis, partial charges (total-charge conservation), the shielded Coulomb
term (formula, smoothness at the cutoff, forces and stress by finite differences, supercells), committee-style
vmap and a short training run. The Potential contract (charges=False) is in test_contract.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

import potentials
from alflow import keys
from alflow.graph import atoms_to_batch
from potentials.base import compute_properties
from potentials.committee import Committee
from potentials.physnet import COULOMB_CONSTANT, TOTAL_CHARGE, PhysNet
from conftest import emt_training_batch, force_training_losses

SPECIES = ["Cu", "Ni"]
SMALL = dict(n_atom_basis=8, n_modules=2, n_residual_atomic=1, n_residual_interaction=1, n_residual_output=1, n_rbf=6)
CUTOFF = 4.0


def small_model(charges: bool = True, seed: int = 0, cutoff: float = CUTOFF) -> PhysNet:
    torch.manual_seed(seed)
    model = potentials.build("physnet", SPECIES, cutoff, charges=charges, **SMALL).double().eval()
    with torch.no_grad():  # biases start at zero: perturb everything so that each term matters
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def cu_ni(seed: int = 0) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.numbers[[1, 3]] = 28
    cell = atoms.cell.array.copy()
    cell[0] += 0.2 * cell[1]
    atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(0.08, seed=seed)
    return atoms


def frames() -> list[Atoms]:
    return [cu_ni(1), bulk("Ni", "fcc", a=3.52), cu_ni(2).repeat((1, 1, 2))]


def predict(model: PhysNet, atoms: Atoms | list[Atoms], stress: bool = False) -> dict[str, np.ndarray]:
    out = model(atoms_to_batch(atoms, model.cutoff, dtype=torch.float64), forces=True, stress=stress)
    return {k: v.detach().numpy() for k, v in out.items()}


def energy(model: PhysNet, atoms: Atoms) -> float:
    return float(predict(model, atoms)[keys.ENERGY][0])


def test_radial_basis_is_the_papers():
    """g_k(r) = φ(r) exp(-β (exp(-r) - μ_k)²), φ = 1 - 6x⁵ + 15x⁴ - 10x³,
    μ_k evenly on [exp(-r_c), 1], β = (2 (1 - exp(-r_c)) / K)⁻²."""
    model = potentials.build("physnet", SPECIES, 5.0, n_rbf=16).double()
    r = torch.linspace(0.1, 5.5, 40, dtype=torch.float64)
    got = (model.radial_basis(r) * model.cutoff_fn(r)[:, None]).numpy()
    x = r.numpy() / 5.0
    phi = np.where(x < 1, 1 - 6 * x**5 + 15 * x**4 - 10 * x**3, 0.0)
    mu = np.linspace(np.exp(-5.0), 1.0, 16)
    beta = (2 / 16 * (1 - np.exp(-5.0))) ** -2
    expected = phi[:, None] * np.exp(-beta * (np.exp(-r.numpy())[:, None] - mu) ** 2)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_total_charge_is_conserved():
    model = small_model()
    batch = atoms_to_batch(frames(), CUTOFF, dtype=torch.float64)
    q = model.partial_charges(batch)
    sums = torch.zeros(3, dtype=q.dtype).index_add(0, batch[keys.BATCH], q)
    assert float(q.detach().abs().max()) > 1e-2  # the charges are not trivially zero
    torch.testing.assert_close(sums, torch.zeros(3, dtype=q.dtype), rtol=0, atol=1e-6)
    batch[TOTAL_CHARGE] = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    q = model.partial_charges(batch)
    sums = torch.zeros(3, dtype=q.dtype).index_add(0, batch[keys.BATCH], q)
    torch.testing.assert_close(sums, batch[TOTAL_CHARGE], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="charges=False"):
        small_model(charges=False).partial_charges(batch)


def test_coulomb_pair_formula():
    """A dimer in a 12 Å box: E = k_e q₁ q₂ [χ s(√(r²+1)) + (1-χ) s(r)], s(r) = 1/r + r/r_c² - 2/r_c."""
    model = small_model()
    for r in (1.5, 3.1):  # shielded/bare mix below r_c/2, bare Coulomb above
        atoms = Atoms("CuNi", positions=[[1, 1, 1], [1 + r, 1, 1]], cell=[12, 12, 12], pbc=True)
        batch = atoms_to_batch(atoms, CUTOFF, dtype=torch.float64)
        q = torch.tensor([0.3, -0.3], dtype=torch.float64)
        edge_index = batch[keys.EDGE_INDEX]
        vectors = batch[keys.POSITIONS][edge_index[1]] - batch[keys.POSITIONS][edge_index[0]]
        got = float(model.coulomb_energies(batch, vectors, q).sum())
        x = 2 * r / CUTOFF
        chi = 1 - 6 * x**5 + 15 * x**4 - 10 * x**3 if x < 1 else 0.0

        def s(d):
            return 1 / d + d / CUTOFF**2 - 2 / CUTOFF

        expected = COULOMB_CONSTANT * 0.3 * -0.3 * (chi * s(np.sqrt(r**2 + 1)) + (1 - chi) * s(r))
        assert abs(got - expected) < 1e-12 * abs(expected), (r, got, expected)


def test_coulomb_term_contributes_and_is_smooth_at_the_cutoff():
    model = small_model()
    batch = atoms_to_batch(cu_ni(), CUTOFF, dtype=torch.float64)
    edge_index = batch[keys.EDGE_INDEX]
    vectors = (batch[keys.POSITIONS][edge_index[1]] - batch[keys.POSITIONS][edge_index[0]]
               + batch[keys.SHIFTS] @ batch[keys.CELL][0])
    with torch.no_grad():
        e_coulomb = float(model.coulomb_energies(batch, vectors, model.partial_charges(batch)).sum())
        with_q = float(model(batch, forces=False)[keys.ENERGY][0])
        out, _ = model.atomic_outputs(batch, vectors, model.species_index(batch[keys.NUMBERS]))
    assert abs(e_coulomb) > 1e-3
    assert abs(with_q - (float(out.sum()) + e_coulomb)) < 1e-10

    # the pair term and its slope vanish at r_c: a dimer's energy is continuous when it crosses the cutoff
    def dimer(r: float) -> dict[str, np.ndarray]:
        return predict(model, Atoms("CuNi", positions=[[1, 1, 1], [1 + r, 1, 1]], cell=[12, 12, 12], pbc=True))

    inside, outside = dimer(CUTOFF - 1e-4), dimer(CUTOFF + 1e-4)
    assert abs(dimer(3.0)[keys.ENERGY][0] - outside[keys.ENERGY][0]) > 1e-3
    assert abs(inside[keys.ENERGY][0] - outside[keys.ENERGY][0]) < 1e-6
    assert np.abs(inside[keys.FORCES]).max() < 1e-3


def test_forces_and_stress_with_charges_match_finite_differences():
    model = small_model()
    atoms = cu_ni()
    out = predict(model, atoms, stress=True)
    forces, stress = out[keys.FORCES], out[keys.STRESS][0]
    h = 1e-4
    for atom, axis in [(0, 0), (1, 2), (3, 1)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += h
        minus.positions[atom, axis] -= h
        reference = -(energy(model, plus) - energy(model, minus)) / (2 * h)
        assert abs(forces[atom, axis] - reference) <= 1e-6 * np.abs(forces).max(), (atom, axis)
    volume, cell = atoms.get_volume(), atoms.cell.array
    for i, j in [(0, 0), (1, 2), (0, 1)]:
        values = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * 1e-5
            if i != j:
                strain[j, i] += sign * 1e-5
            strained = atoms.copy()
            strained.set_cell(cell @ strain, scale_atoms=True)
            values.append(energy(model, strained))
        reference = (values[0] - values[1]) / ((2e-5 if i == j else 4e-5) * volume)
        assert abs(stress[i, j] - reference) <= 1e-6 * np.abs(stress).max(), (i, j)


def test_charges_model_is_invariant_under_supercells_and_images():
    model = small_model()
    atoms = cu_ni()
    ref = predict(model, atoms, stress=True)
    big = predict(model, atoms.repeat((2, 1, 2)), stress=True)
    assert abs(big[keys.ENERGY][0] - 4 * ref[keys.ENERGY][0]) < 1e-9 * max(1.0, abs(ref[keys.ENERGY][0]))
    np.testing.assert_allclose(big[keys.FORCES], np.tile(ref[keys.FORCES], (4, 1)), rtol=0, atol=1e-10)
    np.testing.assert_allclose(big[keys.STRESS], ref[keys.STRESS], rtol=0, atol=1e-12)
    moved = atoms.copy()
    moved.positions += np.random.default_rng(0).integers(-2, 3, size=(len(atoms), 3)) @ atoms.cell.array
    got = predict(model, moved, stress=True)
    np.testing.assert_allclose(got[keys.ENERGY], ref[keys.ENERGY], rtol=1e-12)
    np.testing.assert_allclose(got[keys.FORCES], ref[keys.FORCES], rtol=0, atol=1e-10)
    together = predict(model, frames())
    singles = [predict(model, a)[keys.ENERGY][0] for a in frames()]
    np.testing.assert_allclose(together[keys.ENERGY], singles, rtol=1e-12)


def test_committee_is_vectorized_and_exact():
    """A committee of PhysNet members with charges runs in one torch.vmap pass and reproduces each member."""
    members = [small_model(seed=s) for s in range(3)]
    committee = Committee(members, vectorize=True)
    batch = atoms_to_batch(frames(), members[0].cutoff, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sequential fallback would warn
        out = committee(batch, forces=True, stress=True)
    assert committee.vectorized
    for k, member in enumerate(members):
        ref = compute_properties(member, batch, forces=True, stress=True)
        torch.testing.assert_close(out[keys.ENERGIES][k], ref[keys.ENERGY], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out[keys.FORCES_COMM][k], ref[keys.FORCES], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out[keys.STRESS_COMM][k], ref[keys.STRESS], rtol=1e-10, atol=1e-12)
    assert float(out[keys.FORCES_VAR].detach().max()) > 1e-8  # the members differ


def test_defaults_and_hparams():
    model = potentials.build("physnet", SPECIES, 5.0)
    assert model.hparams == dict(n_atom_basis=64, n_modules=3, n_residual_atomic=2, n_residual_interaction=3,
                                 n_residual_output=1, n_rbf=32, charges=False)
    rebuilt = potentials.build("physnet", SPECIES, 5.0, **{**model.hparams, "charges": True})
    assert rebuilt.outputs[0].out.out_features == 2
    with pytest.raises(ValueError, match="charges"):
        potentials.build("physnet", SPECIES, 5.0, charges="yes")


def test_short_training_reduces_force_error():
    batch = emt_training_batch()
    torch.manual_seed(0)
    model = potentials.build("physnet", ["Cu"], 4.0, n_atom_basis=32, n_modules=2, n_residual_atomic=1,
                             n_residual_interaction=1, n_rbf=16, charges=True).double()
    losses, zero_model = force_training_losses(model, batch)  # zero_model: the loss of predicting no force
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 0.2 * zero_model, (zero_model, losses[::8])
