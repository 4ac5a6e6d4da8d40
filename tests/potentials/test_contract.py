"""The Potential contract, checked for every registered architecture (``potentials.available()``).

Each test runs on a small, randomly initialised and perturbed float64 model
(``conftest.SMALL_HPARAMS``) and real periodic Cu–Ni cells smaller than the cutoff;
an architecture whose dependency is missing is skipped with the reason.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from alflow import keys
from alflow.graph import atoms_to_batch
from potentials.base import Potential


def predict(
    model: Potential, frames: Atoms | list[Atoms], stress: bool = True, device: str = "cpu"
) -> dict[str, np.ndarray]:
    """Energy (B,), forces (N, 3) and stress (B, 3, 3) as float64 numpy arrays."""
    batch = atoms_to_batch(frames, model.cutoff, dtype=model.e0.dtype, device=device)
    out = model(batch, forces=True, stress=stress)
    return {k: v.detach().cpu().double().numpy() for k, v in out.items()}


def assert_same(got: np.ndarray, ref: np.ndarray, rel: float = 1e-10) -> None:
    """Equal to ``rel`` times the largest magnitude in ``ref`` (so the test is blind to the model's output scale)."""
    ref = np.asarray(ref, dtype=float)
    np.testing.assert_allclose(got, ref, rtol=0, atol=rel * max(np.abs(ref).max(initial=0.0), 1e-300))


def energy(model: Potential, atoms: Atoms) -> float:
    return float(predict(model, atoms, stress=False)[keys.ENERGY][0])


def numerical_stress(model: Potential, atoms: Atoms, d: float = 1e-5) -> np.ndarray:
    """(1/V) dE/dε by central differences of symmetric strains, as ASE's ``calculate_numerical_stress``."""
    volume = atoms.get_volume()
    cell = atoms.cell.array.copy()
    stress = np.zeros((3, 3))
    for i in range(3):
        for j in range(i, 3):
            values = []
            for sign in (1.0, -1.0):
                strain = np.eye(3)
                strain[i, j] += sign * d
                strain[j, i] += sign * d if i != j else 0.0
                strained = atoms.copy()
                strained.set_cell(cell @ strain, scale_atoms=True)
                values.append(energy(model, strained))
            stress[i, j] = stress[j, i] = (values[0] - values[1]) / ((2 * d if i == j else 4 * d) * volume)
    return stress


def test_model_is_not_trivial(model, cu_ni, cu3ni):
    """Energies depend on geometry and species and forces on a rattled cell are non-zero, far above the float64
    round-off (~1e-12) that the other tests resolve: no test here can pass with a constant model."""
    perfect = cu_ni.copy()
    perfect.set_scaled_positions(bulk("Cu", "fcc", a=3.6, cubic=True).get_scaled_positions())
    e_rattled, e_perfect = energy(model, cu_ni), energy(model, perfect)
    assert abs(e_rattled - e_perfect) > 1e-5, (e_rattled, e_perfect)
    assert np.abs(predict(model, cu_ni)[keys.FORCES]).max() > 1e-4
    swapped = cu3ni.copy()
    swapped.numbers = np.where(cu3ni.numbers == 28, 29, 28)
    assert abs(energy(model, cu3ni) - energy(model, swapped)) > 1e-5


def test_forces_are_minus_energy_gradient(model, cu_ni):
    forces = predict(model, cu_ni, stress=False)[keys.FORCES]
    scale = np.abs(forces).max()
    h = 1e-5  # truncation error ~h², round-off ~1e-16·E/h: both far below the 1e-6 tolerance
    for atom, axis in [(0, 0), (1, 2), (2, 1), (3, 0), (3, 2)]:
        plus, minus = cu_ni.copy(), cu_ni.copy()
        plus.positions[atom, axis] += h
        minus.positions[atom, axis] -= h
        finite_difference = -(energy(model, plus) - energy(model, minus)) / (2 * h)
        error = abs(forces[atom, axis] - finite_difference)
        assert error <= 1e-6 * scale, (atom, axis, forces[atom, axis], finite_difference)


def test_stress_is_strain_derivative(model, cu_ni):
    stress = predict(model, cu_ni)[keys.STRESS][0]
    reference = numerical_stress(model, cu_ni)
    scale = np.abs(reference).max()
    assert scale > 1e-4
    assert_same(stress, reference, rel=1e-6)
    assert_same(stress, stress.T, rel=1e-12)


def test_rotation_invariance(model, cu_ni, rotation):
    ref = predict(model, cu_ni)
    rotated = Atoms(cu_ni.numbers, positions=cu_ni.positions @ rotation.T, cell=cu_ni.cell.array @ rotation.T, pbc=True)
    got = predict(model, rotated)
    assert_same(got[keys.ENERGY], ref[keys.ENERGY])
    assert_same(got[keys.FORCES], ref[keys.FORCES] @ rotation.T)
    assert_same(got[keys.STRESS][0], rotation @ ref[keys.STRESS][0] @ rotation.T)


def test_translation_invariance(model, cu_ni):
    ref = predict(model, cu_ni)
    moved = cu_ni.copy()
    moved.positions += np.array([0.37, -1.21, 2.93])
    got = predict(model, moved)
    for key in (keys.ENERGY, keys.FORCES, keys.STRESS):
        assert_same(got[key], ref[key])


def test_permutation_invariance(model, cu_ni):
    ref = predict(model, cu_ni)
    perm = np.array([2, 0, 3, 1])
    got = predict(model, cu_ni[perm])
    assert_same(got[keys.ENERGY], ref[keys.ENERGY])
    assert_same(got[keys.FORCES], ref[keys.FORCES][perm])
    assert_same(got[keys.STRESS], ref[keys.STRESS])


def test_choice_of_periodic_image(model, cu_ni):
    ref = predict(model, cu_ni)
    unwrapped = cu_ni.copy()
    lattice_shifts = np.random.default_rng(5).integers(-2, 3, size=(len(cu_ni), 3))
    unwrapped.positions += lattice_shifts @ cu_ni.cell.array
    wrapped = unwrapped.copy()
    wrapped.wrap()
    for atoms in (unwrapped, wrapped):
        got = predict(model, atoms)
        for key in (keys.ENERGY, keys.FORCES, keys.STRESS):
            assert_same(got[key], ref[key])


def test_supercell_is_the_same_crystal(model, cu3ni, cu_ni):
    """A 2×2×1 supercell: equal energy per atom (perfect crystal), 4× the energy and repeated forces (rattled)."""
    per_atom = energy(model, cu3ni) / len(cu3ni)
    super_per_atom = energy(model, cu3ni.repeat((2, 2, 1))) / (4 * len(cu3ni))
    assert_same(super_per_atom, per_atom, rel=1e-8)

    ref = predict(model, cu_ni)
    got = predict(model, cu_ni.repeat((2, 2, 1)))
    assert_same(got[keys.ENERGY], 4 * ref[keys.ENERGY], rel=1e-8)
    assert_same(got[keys.FORCES], np.tile(ref[keys.FORCES], (4, 1)), rel=1e-8)
    assert_same(got[keys.STRESS], ref[keys.STRESS], rel=1e-8)


def test_batch_equals_one_by_one(model, three_structures):
    together = predict(model, three_structures)
    singles = [predict(model, atoms) for atoms in three_structures]
    for key in (keys.ENERGY, keys.FORCES, keys.STRESS):
        assert_same(together[key], np.concatenate([s[key] for s in singles]), rel=1e-12)
    assert len({round(float(e), 6) for e in together[keys.ENERGY]}) == 3  # three different structures


def test_float32_matches_float64(model, cu_ni):
    single = copy.deepcopy(model).float()
    assert all(p.dtype == torch.float32 for p in single.parameters())
    ref, got = predict(model, cu_ni), predict(single, cu_ni)
    assert_same(got[keys.ENERGY], ref[keys.ENERGY], rel=1e-5)
    assert_same(got[keys.FORCES], ref[keys.FORCES], rel=1e-4)
    assert_same(got[keys.STRESS], ref[keys.STRESS], rel=1e-4)


def test_one_atom_primitive_cell(make_model):
    """1-atom fcc cell, cutoff 5 Å (dozens of images of one atom): finite energy, zero force, isotropic stress."""
    model = make_model(cutoff=5.0)
    atoms = bulk("Cu", "fcc", a=3.6)
    out = predict(model, atoms)
    assert np.isfinite(out[keys.ENERGY]).all()
    stress = out[keys.STRESS][0]
    assert np.isfinite(stress).all() and abs(stress[0, 0]) > 1e-6
    # "zero" relative to the model's output scale: its energy per Å
    np.testing.assert_allclose(out[keys.FORCES], 0.0, atol=1e-10 * max(1.0, abs(out[keys.ENERGY][0])))
    assert_same(stress, stress[0, 0] * np.eye(3))


def test_e0_scale_shift_buffers(model, cu_ni):
    """E_atom = scale · out + shift + E0[species] (potentials.base): E0 and shift add Σ E0 + N·shift."""
    ref = predict(model, cu_ni)
    e0 = {28: 0.7, 29: -1.3}  # eV per Ni, Cu atom
    with torch.no_grad():
        model.e0.copy_(torch.tensor([e0[z] for z in model.species], dtype=torch.float64))
        model.shift.fill_(0.25)
    got = predict(model, cu_ni)
    offset = sum(e0[int(z)] for z in cu_ni.numbers) + 0.25 * len(cu_ni)
    assert_same(got[keys.ENERGY] - ref[keys.ENERGY], [offset])
    assert_same(got[keys.FORCES], ref[keys.FORCES], rel=1e-12)
    assert_same(got[keys.STRESS], ref[keys.STRESS], rel=1e-12)
    if type(model).node_energies is not Potential.node_energies:
        return  # an adapter with its own per-atom energies in eV (MACE) need not use ``scale``
    with torch.no_grad():
        model.scale.fill_(2.5)
    scaled = predict(model, cu_ni)
    assert_same(scaled[keys.ENERGY], 2.5 * ref[keys.ENERGY] + offset)
    assert_same(scaled[keys.FORCES], 2.5 * ref[keys.FORCES], rel=1e-12)


def test_training_gradients_are_finite(model):
    """A force + stress loss back-propagates to finite parameter gradients, also through an atom with no
    neighbour and a centrosymmetric 1-atom cell (where equivariant vector features are exactly zero)."""
    lonely = Atoms("Cu2Ni", positions=[[0, 0, 0], [2.5, 0, 0], [6, 6, 6]], cell=np.eye(3) * 12.0, pbc=True)
    batch = atoms_to_batch([lonely, bulk("Cu", "fcc", a=3.6)], model.cutoff, dtype=torch.float64)
    model.train()
    out = model(batch, forces=True, stress=True)
    loss = out[keys.ENERGY].pow(2).sum() + out[keys.FORCES].pow(2).sum() + out[keys.STRESS].pow(2).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(model, three_structures):
    ref = predict(model, three_structures)
    got = predict(model.to("cuda"), three_structures, device="cuda")
    for key in (keys.ENERGY, keys.FORCES, keys.STRESS):
        assert_same(got[key], ref[key], rel=1e-10)
