"""alflow.neighbors against ASE's neighbor_list on many random periodic cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from alflow.neighbors import NeighborListError, batch_neighbor_list, neighbor_list

BACKENDS = ["vesin", "torch"]


def _sorted_pairs(i, j, S, d, D):
    i, j, S, d, D = (np.asarray(x) for x in (i, j, S, d, D))
    order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))
    return i[order], j[order], S[order], d[order], D[order]


def assert_same_as_ase(atoms: Atoms, cutoff: float, backend: str | None = None, dtype: torch.dtype | None = None,
                       device: str = "cpu") -> int:
    """Same pair set as ASE. With a torch ``dtype`` the inputs are tensors of that dtype (on ``device``)
    and ASE sees the same rounded numbers, so the pair sets must still be identical."""
    atol = 1e-10
    if dtype is None:
        got = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff, backend=backend)
    else:
        pos = torch.tensor(atoms.positions, dtype=dtype, device=device)
        cell = torch.tensor(atoms.cell.array, dtype=dtype, device=device)
        atoms = atoms.copy()
        atoms.cell = cell.double().cpu().numpy()
        atoms.positions = pos.double().cpu().numpy()
        got = neighbor_list(pos, cell, atoms.pbc, cutoff, backend=backend)
        assert got.i.device == pos.device and got.D.dtype == dtype
        got = type(got)(*(x.detach().cpu().numpy() for x in (got.i, got.j, got.S, got.D, got.d)))
        atol = 1e-10 if dtype == torch.float64 else 1e-4
    ref = ase_neighbor_list("ijSdD", atoms, cutoff)
    ri, rj, rS, rd, rD = _sorted_pairs(*ref)
    gi, gj, gS, gd, gD = _sorted_pairs(got.i, got.j, got.S, got.d, got.D)
    assert len(ri) == len(gi), f"pair count {len(gi)} != ASE {len(ri)} for {atoms}"
    np.testing.assert_array_equal(gi, ri)
    np.testing.assert_array_equal(gj, rj)
    np.testing.assert_array_equal(gS, rS)
    np.testing.assert_allclose(gd, rd, rtol=0, atol=atol)
    np.testing.assert_allclose(gD, rD, rtol=0, atol=atol)
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("seed", range(400))
def test_random_cells_match_ase_torch_backend(seed, dtype):
    """The pure-torch search (the CUDA path) gives ASE's exact pair set, in both dtypes."""
    atoms, cutoff = random_structure(np.random.default_rng(seed))
    assert_same_as_ase(atoms, cutoff, backend="torch", dtype=dtype)


def test_vesin_torch_backend_matches_ase():
    """The optional vesin-torch backend (a CUDA candidate) on the random suite and a batch, on the CPU."""
    pytest.importorskip("vesin_torch", reason="vesin-torch not installed (optional extra alflow[gpu])")
    rng = np.random.default_rng(5)
    for _ in range(60):
        atoms, cutoff = random_structure(rng)
        assert_same_as_ase(atoms, cutoff, "vesin-torch", torch.float64)
    frames = [random_structure(rng)[0] for _ in range(6)]
    args = (np.concatenate([a.positions for a in frames]), np.stack([a.cell.array for a in frames]),
            np.stack([a.pbc for a in frames]), [len(a) for a in frames], 3.0)
    got = batch_neighbor_list(torch.tensor(args[0]), torch.tensor(args[1]), *args[2:], backend="vesin-torch")
    ref = batch_neighbor_list(*args)
    assert len(got) == len(ref)
    for g, r in zip(_sorted_pairs(got.i, got.j, got.S, got.d, got.D)[:3], _sorted_pairs(ref.i, ref.j, ref.S, ref.d, ref.D)[:3]):
        np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_atom_fcc_primitive_cell_at_6_angstrom(backend):
    atoms = bulk("Cu", "fcc", a=3.61)
    n_pairs = assert_same_as_ase(atoms, 6.0, backend)
    assert n_pairs > 70  # many images of the single atom


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_and_one_atom(backend):
    assert assert_same_as_ase(Atoms(cell=np.eye(3) * 3, pbc=True), 3.0, backend) == 0
    assert assert_same_as_ase(Atoms("Cu", cell=np.eye(3) * 3, pbc=True), 3.5, backend) == 6
    assert assert_same_as_ase(Atoms("Cu", cell=np.eye(3) * 3, pbc=False), 3.5, backend) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_slab_wire_and_molecule_in_huge_vacuum(backend):
    slab = fcc111("Cu", size=(3, 3, 4), vacuum=20.0)
    slab.pbc = [True, True, False]
    assert_same_as_ase(slab, 5.0, backend)
    wire = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 1, 1))
    wire.cell[1, 1] = wire.cell[2, 2] = 500.0
    wire.pbc = [True, False, False]
    assert_same_as_ase(wire, 5.0, backend)
    mol = molecule("CH3CH2OH")
    mol.cell = np.eye(3) * 10_000.0  # huge box: must not allocate bins for the whole box
    mol.center()
    mol.pbc = False
    assert_same_as_ase(mol, 4.0, backend)
    bare = molecule("H2O")  # no cell at all
    assert_same_as_ase(bare, 3.0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strongly_skewed_small_cell(backend):
    cell = np.array([[2.0, 0.0, 0.0], [1.9, 0.5, 0.0], [1.8, 0.4, 0.6]])
    rng = np.random.default_rng(1)
    atoms = Atoms("Si3", positions=rng.random((3, 3)) @ cell, cell=cell, pbc=True)
    assert_same_as_ase(atoms, 5.0, backend)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_torch_backend_triclinic_and_cells_thinner_than_the_cutoff(dtype):
    """Images several cells away (m > 1 bins per side), skewed cells, far-apart atoms in vacuum."""
    rng = np.random.default_rng(11)
    thin = Atoms("Cu2", positions=[[0.1, 0.2, 0.3], [0.9, 0.4, 0.2]], cell=[[1.1, 0, 0], [0.5, 1.3, 0], [0.3, 0.2, 0.9]], pbc=True)
    assert assert_same_as_ase(thin, 6.5, "torch", dtype) > 1000
    tri = bulk("Si", "diamond", a=5.43).repeat((3, 2, 4))  # primitive fcc vectors: 60 degree angles
    tri.rattle(0.1, seed=2)
    assert_same_as_ase(tri, 5.0, "torch", dtype)
    far = Atoms("H4", positions=rng.uniform(-3e3, 3e3, (4, 3)), pbc=False)  # the grid must not span the gap
    far.positions[1] = far.positions[0] + [0.5, 0.0, 0.0]
    assert assert_same_as_ase(far, 2.0, "torch", dtype) == 2
    layer = Atoms("Cu3", positions=rng.random((3, 3)) * 2, cell=[[2.5, 0, 0], [1.2, 2.1, 0], [0, 0, 0]], pbc=[True, True, False])
    assert_same_as_ase(layer, 4.0, "torch", dtype)


def test_torch_backend_large_cell_is_chunked(monkeypatch):
    """Small candidate chunks give the same pairs: the chunk loop has no off-by-one."""
    import alflow.neighbors as nbmod

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(4)
    atoms.rattle(0.1, seed=5)
    monkeypatch.setattr(nbmod, "_CHUNK", 997)
    assert_same_as_ase(atoms, 4.5, "torch", torch.float64)


def test_auto_backend_keeps_non_cpu_tensors_on_their_device(monkeypatch):
    """Tensors off the CPU take the torch search (no host copy through vesin); CPU input keeps vesin."""
    import alflow.neighbors as nbmod

    assert nbmod._backend(torch.zeros((2, 3), device="meta"), None) == "torch"
    assert nbmod._backend(torch.zeros((2, 3)), None) == "vesin"
    assert nbmod._backend(np.zeros((2, 3)), "auto") == "vesin"
    with pytest.raises(NeighborListError, match="backend"):
        nbmod._backend(np.zeros((2, 3)), "cuda")
    assert nbmod._backend(torch.zeros((2, 3)), "torch") == "torch"
    monkeypatch.setattr(nbmod, "_search", lambda *a: pytest.fail("the torch backend went through vesin"))
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    assert_same_as_ase(atoms, 4.0, "torch", torch.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_cuda_tensors_match_ase_on_the_device(dtype):
    """On a GPU, the default path (no backend given) stays on the device and matches ASE."""
    rng = np.random.default_rng(123)
    for _ in range(100):
        atoms, cutoff = random_structure(rng)
        assert_same_as_ase(atoms, cutoff, None, dtype, device="cuda")
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(6)
    assert_same_as_ase(atoms, 5.0, None, dtype, device="cuda")


@pytest.mark.gpu
def test_cuda_vesin_torch_backend_matches_ase():
    """vesin-torch's CUDA code on the random suite: decides whether it can be the CUDA default."""
    pytest.importorskip("vesin_torch", reason="vesin-torch not installed (optional extra alflow[gpu])")
    rng = np.random.default_rng(321)
    for _ in range(100):
        atoms, cutoff = random_structure(rng)
        assert_same_as_ase(atoms, cutoff, "vesin-torch", torch.float64, device="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_has_no_cross_pairs_and_equals_single_calls(backend):
    rng = np.random.default_rng(7)
    frames = [random_structure(rng)[0] for _ in range(25)]
    cutoff = 3.5
    positions = np.concatenate([a.positions for a in frames])
    cells = np.stack([a.cell.array for a in frames])
    pbcs = np.stack([a.pbc for a in frames])
    counts = np.array([len(a) for a in frames])
    if backend == "torch":  # tensors in, tensors out (the batched engine's call)
        got = batch_neighbor_list(torch.tensor(positions), torch.tensor(cells), torch.tensor(pbcs), torch.tensor(counts),
                                  cutoff, backend=backend)
        got = type(got)(*(x.detach().numpy() for x in (got.i, got.j, got.S, got.D, got.d)))
    else:
        got = batch_neighbor_list(positions, cells, pbcs, counts, cutoff, backend=backend)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_vectors_are_differentiable_for_forces_and_stress(backend):
    """A pair potential built on the list: autograd forces and stress match finite differences."""
    atoms = bulk("Cu", "fcc", a=3.61).repeat((2, 2, 1))
    atoms.rattle(0.1, seed=0)
    cutoff = 5.0

    def energy(pos: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        nl = neighbor_list(pos, cell, True, cutoff, backend=backend)
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
@pytest.mark.parametrize("backend", BACKENDS)
def test_clear_errors(kwargs, message, backend):
    args = dict(positions=np.zeros((2, 3)) + [[0, 0, 0], [1, 1, 1]], cell=np.eye(3) * 4, pbc=True, cutoff=3.0)
    args.update(kwargs)
    if backend == "torch":
        args["positions"] = torch.as_tensor(args["positions"])
    with pytest.raises(NeighborListError, match=message.replace("(", r"\(").replace(")", r"\)")):
        neighbor_list(**args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_cell_allowed_along_non_periodic_direction(backend):
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.0]], cell=[3.0, 3.0, 0.0], pbc=[True, True, False])
    assert_same_as_ase(atoms, 3.5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_errors_name_the_argument(backend):
    with pytest.raises(NeighborListError, match="n_atoms"):
        batch_neighbor_list(np.zeros((3, 3)), np.stack([np.eye(3)] * 2), True, [1, 1], 2.0, backend=backend)
    with pytest.raises(NeighborListError, match=r"cells\[1\]"):
        batch_neighbor_list(np.random.rand(2, 3), np.stack([np.eye(3), np.zeros((3, 3))]), True, [1, 1], 2.0,
                            backend=backend)
