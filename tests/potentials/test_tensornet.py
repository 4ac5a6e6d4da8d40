"""TensorNet specifics: the I + A + S decomposition, equivariance of the tensor features, parity, committee use.

The Potential contract (forces, stress, invariances, float32, 1-atom cell) is checked
for every architecture in ``test_contract.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

import potentials
from alflow import keys
from alflow.graph import atoms_to_batch
from potentials.base import compute_properties
from potentials.tensornet import decompose, norm2, skew

SMALL = {"hidden_channels": 8, "num_layers": 2, "num_rbf": 8}


def rattled_cell() -> Atoms:
    """A sheared, rattled 4-atom Cu2Ni2 cell (no symmetry, chiral), smaller than the cutoff."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.numbers[[1, 3]] = 28
    cell = atoms.cell.array.copy()
    cell[0] += 0.25 * cell[1] - 0.1 * cell[2]
    atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(stdev=0.1, seed=3)
    return atoms


def transformed(atoms: Atoms, R: np.ndarray) -> Atoms:
    return Atoms(atoms.numbers, positions=atoms.positions @ R.T, cell=atoms.cell.array @ R.T, pbc=True)


def small_model(seed: int = 0, **overrides) -> potentials.Potential:
    torch.manual_seed(seed)
    model = potentials.build("tensornet", ["Cu", "Ni"], 4.5, **{**SMALL, **overrides}).double().eval()
    with torch.no_grad():  # break the zero biases and symmetric initialisation so every path matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def features(model, atoms: Atoms) -> torch.Tensor:
    batch = atoms_to_batch(atoms, model.cutoff, dtype=torch.float64)
    i, j = batch[keys.EDGE_INDEX]
    vectors = batch[keys.POSITIONS][j] - batch[keys.POSITIONS][i] + batch[keys.SHIFTS] @ batch[keys.CELL][0]
    return model.features(batch, vectors, model.species_index(batch[keys.NUMBERS])).detach()


def energy(model, atoms: Atoms) -> float:
    return float(model(atoms_to_batch(atoms, model.cutoff, dtype=torch.float64), forces=False)[keys.ENERGY].detach()[0])


def random_rotation(seed: int, proper: bool = True) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    q = q if np.linalg.det(q) > 0 else -q
    return q if proper else -q  # -q: a rotation times the inversion


def test_decomposition_reconstructs_and_has_the_right_symmetries():
    X = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    I, A, S = decompose(X)
    torch.testing.assert_close(I + A + S, X, rtol=0, atol=1e-14)
    eye = torch.eye(3, dtype=X.dtype)
    torch.testing.assert_close(I, I[..., :1, :1] * eye, rtol=0, atol=1e-15)  # multiple of the identity
    torch.testing.assert_close(A, -A.transpose(-2, -1), rtol=0, atol=0)
    torch.testing.assert_close(S, S.transpose(-2, -1), rtol=0, atol=0)
    torch.testing.assert_close(S.diagonal(dim1=-2, dim2=-1).sum(-1), torch.zeros(5, 4, dtype=X.dtype), rtol=0, atol=1e-14)
    # orthogonal components: squared norms add up
    torch.testing.assert_close(norm2(I) + norm2(A) + norm2(S), norm2(X), rtol=1e-13, atol=0)


def test_skew_is_the_cross_product_matrix():
    v, u = torch.randn(2, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close((skew(v) @ u[..., None])[..., 0], torch.linalg.cross(v, u), rtol=0, atol=1e-14)


def test_features_rotate_as_R_X_Rt():
    model = small_model()
    atoms = rattled_cell()
    R = random_rotation(42)
    X, X_rot = features(model, atoms), features(model, transformed(atoms, R))
    Rt = torch.tensor(R)
    assert float(X.abs().max()) > 1e-2
    torch.testing.assert_close(X_rot, Rt @ X @ Rt.T, rtol=0, atol=1e-10 * float(X.abs().max()))


def test_o3_parity_a_is_a_pseudotensor_and_energy_is_reflection_invariant():
    """Under an improper rotation R, I and S go to R · Rᵀ and A to det(R) R A Rᵀ; the O(3) energy is unchanged."""
    model = small_model()
    atoms = rattled_cell()
    R = random_rotation(7, proper=False)
    Rt = torch.tensor(R)
    I, A, S = decompose(features(model, atoms))
    I2, A2, S2 = decompose(features(model, transformed(atoms, R)))
    tol = 1e-10 * float(A.abs().max())
    assert float(A.abs().max()) > 1e-3
    torch.testing.assert_close(I2, Rt @ I @ Rt.T, rtol=0, atol=tol)
    torch.testing.assert_close(S2, Rt @ S @ Rt.T, rtol=0, atol=tol)
    torch.testing.assert_close(A2, -(Rt @ A @ Rt.T), rtol=0, atol=tol)
    e = [energy(model, a) for a in (atoms, transformed(atoms, R))]
    assert abs(e[0] - e[1]) <= 1e-10 * max(1.0, abs(e[0]))


def test_so3_model_tells_mirror_images_apart():
    """With the 2 Y M product the antisymmetric part mixes parities: a chiral cell and its mirror image differ."""
    model = small_model(equivariance_group="SO(3)")
    atoms = rattled_cell()
    mirror = transformed(atoms, np.diag([-1.0, 1.0, 1.0]))
    e = [energy(model, a) for a in (atoms, mirror)]
    assert abs(e[0] - e[1]) > 1e-6 * max(1.0, abs(e[0]))
    R = random_rotation(3)
    e_rot = energy(model, transformed(atoms, R))
    assert abs(e_rot - e[0]) <= 1e-10 * max(1.0, abs(e[0]))  # still rotation invariant


def test_perfect_crystal_has_zero_vector_and_tensor_parts_and_finite_training_gradients():
    """fcc sites are centrosymmetric and cubic: A = S = 0 exactly; double backward through the norms stays finite."""
    model = small_model()
    model.train()
    atoms = bulk("Cu", "fcc", a=3.6)
    I, A, S = decompose(features(model, atoms))
    assert float(I.abs().max()) > 1e-3
    assert float(A.abs().max()) < 1e-12 and float(S.abs().max()) < 1e-12
    out = compute_properties(model, atoms_to_batch(atoms, 4.5, dtype=torch.float64), forces=True, stress=True)
    loss = (out[keys.FORCES] ** 2).sum() + (out[keys.STRESS] ** 2).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 10 and all(bool(torch.isfinite(g).all()) for g in grads)


def test_bad_group_is_an_error_naming_the_argument():
    with pytest.raises(ValueError, match="equivariance_group"):
        potentials.build("tensornet", ["Cu"], 5.0, equivariance_group="E(3)")


class AtomicEnergies(torch.nn.Module):
    """``model.atomic_energies`` as a module's forward, for ``torch.func.functional_call``."""

    def __init__(self, model: potentials.Potential) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch, vectors, species):
        return self.model.atomic_energies(batch, vectors, species)


def test_committee_vmap_over_stacked_parameters():
    from torch.func import functional_call, stack_module_state, vmap

    members = [AtomicEnergies(small_model(seed)) for seed in (0, 1)]
    batch = atoms_to_batch(rattled_cell(), 4.5, dtype=torch.float64)
    i, j = batch[keys.EDGE_INDEX]
    vectors = batch[keys.POSITIONS][j] - batch[keys.POSITIONS][i] + batch[keys.SHIFTS] @ batch[keys.CELL][0]
    species = members[0].model.species_index(batch[keys.NUMBERS])
    params, buffers = stack_module_state(members)
    stacked = vmap(lambda p, b: functional_call(members[0], (p, b), (batch, vectors, species)))(params, buffers)
    for k, member in enumerate(members):
        torch.testing.assert_close(stacked[k], member(batch, vectors, species), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(stacked[0], stacked[1])
