"""alflow.neighbors against ASE's neighbor_list on many random periodic cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from alflow.neighbors import NeighborListError, batch_neighbor_list, neighbor_list


def _sorted_pairs(i, j, S, d, D):
    i, j, S, d, D = (np.asarray(x) for x in (i, j, S, d, D))
    order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))
    return i[order], j[order], S[order], d[order], D[order]


def assert_same_as_ase(atoms: Atoms, cutoff: float) -> int:
    ref = ase_neighbor_list("ijSdD", atoms, cutoff)
    got = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    ri, rj, rS, rd, rD = _sorted_pairs(*ref)
    gi, gj, gS, gd, gD = _sorted_pairs(got.i, got.j, got.S, got.d, got.D)
    assert len(ri) == len(gi), f"pair count {len(gi)} != ASE {len(ri)} for {atoms}"
    np.testing.assert_array_equal(gi, ri)
    np.testing.assert_array_equal(gj, rj)
    np.testing.assert_array_equal(gS, rS)
    np.testing.assert_allclose(gd, rd, rtol=0, atol=1e-10)
    np.testing.assert_allclose(gD, rD, rtol=0, atol=1e-10)
    return len(ri)


def random_cell(rng: np.random.Generator) -> np.ndarray:
    """A random triclinic cell, often strongly skewed, sometimes much smaller than the cutoff."""
    lengths = rng.uniform(1.0, 9.0, 3)
    cell = np.diag(lengths)
    skew = rng.uniform(-1.5, 1.5, (3, 3)) * rng.choice([0.0, 0.3, 1.0], p=[0.2, 0.4, 0.4])
    cell = cell + np.triu(skew, 1) * lengths[:, None]
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return cell @ rotation


def random_structure(rng: np.random.Generator) -> tuple[Atoms, float]:
    cell = random_cell(rng)
    pbc = rng.random(3) < 0.75
    n = int(rng.integers(0, 30))
    frac = rng.uniform(-0.6, 1.6, (n, 3))  # unwrapped: many atoms outside the cell
    numbers = rng.integers(1, 95, n)  # many species
    atoms = Atoms(numbers=numbers, scaled_positions=np.clip(frac, -5, 5), cell=cell, pbc=pbc)
    atoms.positions = frac @ cell
    cutoff = float(rng.uniform(0.5, 7.0))
    return atoms, cutoff


@pytest.mark.parametrize("seed", range(400))
def test_random_cells_match_ase(seed):
    atoms, cutoff = random_structure(np.random.default_rng(seed))
    assert_same_as_ase(atoms, cutoff)


def test_one_atom_fcc_primitive_cell_at_6_angstrom():
    atoms = bulk("Cu", "fcc", a=3.61)
    n_pairs = assert_same_as_ase(atoms, 6.0)
    assert n_pairs > 70  # many images of the single atom


def test_zero_and_one_atom():
    assert assert_same_as_ase(Atoms(cell=np.eye(3) * 3, pbc=True), 3.0) == 0
    assert assert_same_as_ase(Atoms("Cu", cell=np.eye(3) * 3, pbc=True), 3.5) == 6
    assert assert_same_as_ase(Atoms("Cu", cell=np.eye(3) * 3, pbc=False), 3.5) == 0


def test_slab_wire_and_molecule_in_huge_vacuum():
    slab = fcc111("Cu", size=(3, 3, 4), vacuum=20.0)
    slab.pbc = [True, True, False]
    assert_same_as_ase(slab, 5.0)
    wire = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 1, 1))
    wire.cell[1, 1] = wire.cell[2, 2] = 500.0
    wire.pbc = [True, False, False]
    assert_same_as_ase(wire, 5.0)
    mol = molecule("CH3CH2OH")
    mol.cell = np.eye(3) * 10_000.0  # huge box: must not allocate bins for the whole box
    mol.center()
    mol.pbc = False
    assert_same_as_ase(mol, 4.0)
    bare = molecule("H2O")  # no cell at all
    assert_same_as_ase(bare, 3.0)


def test_strongly_skewed_small_cell():
    cell = np.array([[2.0, 0.0, 0.0], [1.9, 0.5, 0.0], [1.8, 0.4, 0.6]])
    rng = np.random.default_rng(1)
    atoms = Atoms("Si3", positions=rng.random((3, 3)) @ cell, cell=cell, pbc=True)
    assert_same_as_ase(atoms, 5.0)


def test_batch_has_no_cross_pairs_and_equals_single_calls():
    rng = np.random.default_rng(7)
    frames = [random_structure(rng)[0] for _ in range(25)]
    cutoff = 3.5
    positions = np.concatenate([a.positions for a in frames])
    cells = np.stack([a.cell.array for a in frames])
    pbcs = np.stack([a.pbc for a in frames])
    counts = np.array([len(a) for a in frames])
    got = batch_neighbor_list(positions, cells, pbcs, counts, cutoff)
    owner = np.repeat(np.arange(len(frames)), counts)
    assert (owner[got.i] == owner[got.j]).all()
    start = 0
    for b, atoms in enumerate(frames):
        mask = owner[got.i] == b
        ref = ase_neighbor_list("ijSdD", atoms, cutoff)
        gi, gj, gS, gd, _ = _sorted_pairs(got.i[mask] - start, got.j[mask] - start, got.S[mask], got.d[mask], got.D[mask])
        ri, rj, rS, rd, _ = _sorted_pairs(*ref)
        np.testing.assert_array_equal(gi, ri)
        np.testing.assert_array_equal(gj, rj)
        np.testing.assert_array_equal(gS, rS)
        np.testing.assert_allclose(gd, rd, atol=1e-10, rtol=0)
        start += len(atoms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_input_matches_numpy_and_keeps_dtype(dtype):
    atoms = bulk("Si", "diamond", a=5.43).repeat(2)
    atoms.rattle(0.05, seed=3)
    ref = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 4.0)
    pos = torch.tensor(atoms.positions, dtype=dtype)
    got = neighbor_list(pos, torch.tensor(atoms.cell.array, dtype=dtype), atoms.pbc, 4.0)
    assert got.D.dtype == dtype and got.d.dtype == dtype and got.i.dtype == torch.int64
    np.testing.assert_array_equal(got.i.numpy(), ref.i)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(got.d.numpy(), ref.d, atol=tol)
    got32 = neighbor_list(atoms.positions.astype(np.float32), atoms.cell.array, True, 4.0)
    assert got32.D.dtype == np.float32


def test_torch_vectors_are_differentiable_for_forces_and_stress():
    """A pair potential built on the list: autograd forces and stress match finite differences."""
    atoms = bulk("Cu", "fcc", a=3.61).repeat((2, 2, 1))
    atoms.rattle(0.1, seed=0)
    cutoff = 5.0

    def energy(pos: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        nl = neighbor_list(pos, cell, True, cutoff)
        return 0.5 * torch.sum(torch.exp(-nl.d) * (1 - nl.d / cutoff) ** 2)

    pos = torch.tensor(atoms.positions, requires_grad=True)
    cell = torch.tensor(atoms.cell.array)
    strain = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    deform = torch.eye(3, dtype=torch.float64) + 0.5 * (strain + strain.T)
    e = energy(pos @ deform, cell @ deform)
    forces, dedeps = torch.autograd.grad(e, (pos, strain))
    forces = -forces
    h = 1e-5
    p = atoms.positions.copy()
    p[3, 1] += h
    ep = energy(torch.tensor(p), cell).item()
    p[3, 1] -= 2 * h
    em = energy(torch.tensor(p), cell).item()
    assert abs(-(ep - em) / (2 * h) - forces[3, 1].item()) < 1e-7
    # d E / d eps_xy by finite strain
    eps = np.zeros((3, 3))
    eps[0, 1] = eps[1, 0] = h / 2
    deform_p = torch.tensor(np.eye(3) + eps)
    deform_m = torch.tensor(np.eye(3) - eps)
    e_p = energy(torch.tensor(atoms.positions) @ deform_p, cell @ deform_p).item()
    e_m = energy(torch.tensor(atoms.positions) @ deform_m, cell @ deform_m).item()
    assert abs((e_p - e_m) / (2 * h) - dedeps[0, 1].item()) < 1e-7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cutoff=0.0), "cutoff"),
        (dict(cutoff=-1.0), "cutoff"),
        (dict(cutoff=float("nan")), "cutoff"),
        (dict(cell=np.zeros((3, 3))), "degenerate"),
        (dict(cell=[[1, 0, 0], [2, 0, 0], [0, 0, 1]]), "degenerate"),
        (dict(positions=np.array([[0, 0, np.nan], [1, 1, 1]])), "atom 0"),
        (dict(positions=np.array([[0, 0, 0], [1, 1, np.inf]])), "atom 1"),
        (dict(positions=np.zeros((3, 2))), "positions: expected shape (N, 3)"),
        (dict(cell=np.eye(2)), "cell: expected shape (3, 3)"),
        (dict(pbc=[True, False]), "pbc"),
    ],
)
def test_clear_errors(kwargs, message):
    args = dict(positions=np.zeros((2, 3)) + [[0, 0, 0], [1, 1, 1]], cell=np.eye(3) * 4, pbc=True, cutoff=3.0)
    args.update(kwargs)
    with pytest.raises(NeighborListError, match=message.replace("(", r"\(").replace(")", r"\)")):
        neighbor_list(**args)


def test_degenerate_cell_allowed_along_non_periodic_direction():
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.0]], cell=[3.0, 3.0, 0.0], pbc=[True, True, False])
    assert_same_as_ase(atoms, 3.5)


def test_batch_errors_name_the_argument():
    with pytest.raises(NeighborListError, match="n_atoms"):
        batch_neighbor_list(np.zeros((3, 3)), np.stack([np.eye(3)] * 2), True, [1, 1], 2.0)
    with pytest.raises(NeighborListError, match=r"cells\[1\]"):
        batch_neighbor_list(np.random.rand(2, 3), np.stack([np.eye(3), np.zeros((3, 3))]), True, [1, 1], 2.0)
