"""DimeNet++ specifics: periodic triplets, spherical Bessel functions and the spherical basis, committee use.

The Potential contract (forces, stress, invariances, float32, 1-atom cell) is checked
for every architecture in ``test_contract.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase.build import bulk
from scipy.special import spherical_jn, sph_harm_y

import potentials
from alflow import keys
from alflow.graph import atoms_to_batch
from potentials.dimenet import (
    SphericalBasis,
    dimenet_triplets,
    spherical_bessel,
    spherical_bessel_zeros,
    triplet_cosines,
)
from potentials.triplets import triplets as centre_pairs

SMALL = {"hidden_channels": 16, "out_emb_channels": 16, "num_blocks": 2, "int_emb_size": 8,
         "basis_emb_size": 4, "num_spherical": 3, "num_radial": 4, "num_output_layers": 1}


def sheared_cell():
    """A rattled, sheared 2-atom Cu–Ni cell, much smaller than the 5 Å cutoff."""
    atoms = bulk("CuNi", "rocksalt", a=3.7)
    cell = atoms.cell.array.copy()
    cell[0] += 0.3 * cell[1]
    atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(0.05, seed=1)
    return atoms


def brute_force_triplets(batch: dict[str, torch.Tensor]) -> set[tuple[int, int]]:
    """(kj, ji) pairs by geometry: edge kj leaves the neighbour j of edge ji, and the image k is not the image i."""
    vectors = batch[keys.POSITIONS][batch[keys.EDGE_INDEX][1]] - batch[keys.POSITIONS][batch[keys.EDGE_INDEX][0]]
    vectors = vectors + batch[keys.SHIFTS] @ batch[keys.CELL][0]
    centre, neighbour = batch[keys.EDGE_INDEX].tolist()
    found = set()
    for ji in range(len(centre)):
        for kj in range(len(centre)):
            # position of image k relative to image i is D_ji + D_kj; zero means k is the same image as i
            if centre[kj] == neighbour[ji] and float(torch.linalg.norm(vectors[ji] + vectors[kj])) > 1e-6:
                found.add((kj, ji))
    return found


@pytest.mark.parametrize("atoms", [bulk("Cu", "fcc", a=3.6), sheared_cell()], ids=["fcc-1atom", "sheared-2atom"])
def test_triplets_equal_brute_force_enumeration(atoms):
    batch = atoms_to_batch(atoms, 5.0, dtype=torch.float64)
    idx_kj, idx_ji = dimenet_triplets(batch[keys.EDGE_INDEX], batch[keys.SHIFTS], len(atoms))
    got = list(zip(idx_kj.tolist(), idx_ji.tolist()))
    assert len(got) == len(set(got))  # no duplicates
    assert set(got) == brute_force_triplets(batch)
    # many triplets pair two images of the same atom (the cell is smaller than the cutoff)
    centre, neighbour = batch[keys.EDGE_INDEX]
    assert int((neighbour[idx_kj] == centre[idx_ji]).sum()) > 0


def test_triplets_match_shared_centre_pairs():
    """Same set as potentials.triplets: edge pairs (a, b) at centre j, with ji the reverse edge of a."""
    atoms = sheared_cell()
    batch = atoms_to_batch(atoms, 5.0, dtype=torch.float64)
    edge_index, shifts = batch[keys.EDGE_INDEX], batch[keys.SHIFTS]
    lookup = {(i, j, *s): e for e, (i, j, s) in enumerate(zip(*edge_index.tolist(), shifts.long().tolist()))}
    reverse = [lookup[(j, i, *(-x for x in s))] for i, j, s in zip(*edge_index.tolist(), shifts.long().tolist())]
    a, b = centre_pairs(edge_index, len(atoms))
    expected = {(kj, reverse[ja]) for ja, kj in zip(a.tolist(), b.tolist())}
    idx_kj, idx_ji = dimenet_triplets(edge_index, shifts, len(atoms))
    assert set(zip(idx_kj.tolist(), idx_ji.tolist())) == expected


def test_triplet_count_cu108_at_5A():
    """Cu fcc 3×3×3 cubic (108 atoms), 5 Å: 42 neighbours per atom, T = 108 · 42 · 41."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)
    batch = atoms_to_batch(atoms, 5.0, dtype=torch.float32)
    idx_kj, idx_ji = dimenet_triplets(batch[keys.EDGE_INDEX], batch[keys.SHIFTS], len(atoms))
    assert batch[keys.EDGE_INDEX].shape[1] == 108 * 42
    assert idx_kj.shape[0] == 108 * 42 * 41 == 185_976


def test_triplet_cosines_are_the_angle_at_j():
    r_i, r_j, r_k = torch.tensor([[0.3, -0.2, 0.1], [1.5, 0.4, -0.3], [1.1, 2.0, 0.9]], dtype=torch.float64)
    vectors = torch.stack([r_j - r_i, r_k - r_j])  # edge ji = (i, j), edge kj = (j, k)
    cos = triplet_cosines(vectors, torch.tensor([1]), torch.tensor([0]))
    a, b = r_i - r_j, r_k - r_j
    assert torch.allclose(cos, (a @ b / (a.norm() * b.norm()))[None], rtol=0, atol=1e-14)


def test_spherical_bessel_zeros():
    zeros = spherical_bessel_zeros(7, 6)
    np.testing.assert_allclose(zeros[0], np.arange(1, 7) * np.pi, rtol=1e-14)
    assert abs(zeros[1, 0] - 4.493409457909064) < 1e-12  # first root of j_1 (tan x = x)
    assert np.all(np.diff(zeros, axis=1) > 0) and np.all(zeros[1:, 0] > zeros[:-1, 0])
    for l in range(7):
        np.testing.assert_allclose(spherical_jn(l, zeros[l]), 0.0, atol=1e-13)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_spherical_bessel_values_and_derivatives(dtype, atol):
    x = torch.linspace(0.02, 40.0, 4001, dtype=dtype).requires_grad_(True)
    values = spherical_bessel(x[:, None, None].expand(-1, 7, 2))[:, :, 0]  # row l is order l
    grads = torch.stack([torch.autograd.grad(values[:, l].sum(), x, retain_graph=True)[0] for l in range(7)], -1)
    xs = x.detach().double().numpy()
    for l in range(7):
        np.testing.assert_allclose(values[:, l].detach().double().numpy(), spherical_jn(l, xs), rtol=0, atol=atol)
        np.testing.assert_allclose(grads[:, l].double().numpy(), spherical_jn(l, xs, derivative=True), rtol=0, atol=10 * atol)


def test_spherical_basis_against_scipy():
    """a_SBF,ln(d, α) = u(d/c)/(d/c) · √2/|j_{l+1}(z_ln)| · j_l(z_ln d/c) · Y_l^0(α) at known angles."""
    cutoff, p = 5.0, 6
    basis = SphericalBasis(num_spherical=7, num_radial=6, cutoff=cutoff, envelope_exponent=p - 1).double()
    d = np.array([1.1, 2.55, 3.6, 4.42, 4.95])
    alpha = np.array([0.0, np.pi / 3, np.pi / 2, 2 * np.pi / 3, np.pi, 1.91063])  # incl. the tetrahedral angle
    idx_kj = np.repeat(np.arange(len(d)), len(alpha))
    angles = np.tile(alpha, len(d))
    got = basis(torch.tensor(d), torch.tensor(np.cos(angles)), torch.tensor(idx_kj)).numpy().reshape(-1, 7, 6)
    zeros = spherical_bessel_zeros(7, 6)
    x = d[idx_kj] / cutoff
    envelope = 1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
    for l in range(7):
        y = sph_harm_y(l, 0, angles, 0.0).real
        for n in range(6):
            z = zeros[l, n]
            expected = envelope / x * np.sqrt(2) / abs(spherical_jn(l + 1, z)) * spherical_jn(l, z * x) * y
            np.testing.assert_allclose(got[:, l, n], expected, rtol=1e-10, atol=1e-12)


class AtomicEnergies(torch.nn.Module):
    """``model.atomic_energies`` as a module's forward, for ``torch.func.functional_call``."""

    def __init__(self, model: potentials.Potential) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch, vectors, species):
        return self.model.atomic_energies(batch, vectors, species)


def pair_vectors(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """D = r_j - r_i + S @ cell for a one-structure batch."""
    i, j = batch[keys.EDGE_INDEX]
    return batch[keys.POSITIONS][j] - batch[keys.POSITIONS][i] + batch[keys.SHIFTS] @ batch[keys.CELL][0]


def test_committee_vmap_over_stacked_parameters():
    """torch.func.vmap over two members' stacked parameters equals evaluating them one by one."""
    from torch.func import functional_call, stack_module_state, vmap

    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(AtomicEnergies(potentials.build("dimenetpp", ["Cu", "Ni"], 4.0, **SMALL).double()))
    batch = atoms_to_batch(sheared_cell(), 4.0, dtype=torch.float64)
    vectors = pair_vectors(batch)
    species = members[0].model.species_index(batch[keys.NUMBERS])
    params, buffers = stack_module_state(members)
    stacked = vmap(lambda p, b: functional_call(members[0], (p, b), (batch, vectors, species)))(params, buffers)
    for k, member in enumerate(members):
        torch.testing.assert_close(stacked[k], member(batch, vectors, species), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(stacked[0], stacked[1])


def test_force_loss_gradients_are_finite_with_collinear_triplets():
    """Training differentiates forces once more; the 1-atom fcc cell has α = π triplets (and zero forces)."""
    torch.manual_seed(0)
    model = potentials.build("dimenetpp", ["Cu"], 5.0, **SMALL).double().train()
    batch = atoms_to_batch(bulk("Cu", "fcc", a=3.6), 5.0, dtype=torch.float64)
    idx_kj, idx_ji = dimenet_triplets(batch[keys.EDGE_INDEX], batch[keys.SHIFTS], 1)
    assert bool((triplet_cosines(pair_vectors(batch), idx_kj, idx_ji) < -1 + 1e-12).any())  # collinear triplets
    out = model(batch, forces=True, stress=True)
    loss = (out[keys.FORCES] ** 2).sum() + (out[keys.STRESS] ** 2).sum() + out[keys.ENERGY].sum() ** 2
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 10 and all(bool(torch.isfinite(g).all()) for g in grads)
    assert math.isfinite(float(loss.detach())) and float(out[keys.STRESS].detach().abs().max()) > 0
