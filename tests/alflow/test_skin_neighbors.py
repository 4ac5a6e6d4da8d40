"""SkinNeighborList: pairs within the cutoff equal a fresh ASE list at every MD-like step, never one missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from alflow.graph import build_batch
from alflow.neighbors import NeighborListError, SkinNeighborList

CUTOFF = 4.0


def structures() -> list[Atoms]:
    """A mixed batch: a cubic fcc cell, a triclinic cell thinner than the cutoff, a slab and a molecule."""
    fcc = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    thin = Atoms("Si2", positions=[[0.0, 0.0, 0.0], [0.7, 0.9, 1.1]], cell=[[2.6, 0, 0], [1.0, 2.4, 0], [0.6, 0.4, 2.2]], pbc=True)
    slab = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    slab.center(vacuum=4.0, axis=2)
    slab.pbc = [True, True, False]
    mol = molecule("CH3CH2OH")
    return [fcc, thin, slab, mol]


def pair_set(i, j, S) -> set[tuple[int, ...]]:
    return set(zip(np.asarray(i).tolist(), np.asarray(j).tolist(), *np.asarray(S, dtype=np.int64).T.tolist()))


def within_cutoff(edge_index, shifts, positions, cells, batch, cutoff) -> set[tuple[int, ...]]:
    i, j = edge_index
    vectors = positions[j] - positions[i] + torch.einsum("ek,ekx->ex", shifts.double(), cells.double()[batch[i]])
    keep = torch.linalg.norm(vectors, dim=1) < cutoff
    return pair_set(i[keep], j[keep], shifts[keep].round().long())


def ase_pairs(frames: list[Atoms], cutoff: float) -> set[tuple[int, ...]]:
    pairs, start = set(), 0
    for atoms in frames:
        i, j, S = ase_neighbor_list("ijS", atoms, cutoff)
        pairs |= pair_set(i + start, j + start, S)
        start += len(atoms)
    return pairs


def as_tensors(frames: list[Atoms], dtype: torch.dtype):
    positions = torch.tensor(np.concatenate([a.positions for a in frames]), dtype=dtype)
    cells = torch.tensor(np.stack([a.cell.array for a in frames]), dtype=dtype)
    pbc = torch.tensor(np.stack([a.pbc for a in frames]))
    batch = torch.repeat_interleave(torch.arange(len(frames)), torch.tensor([len(a) for a in frames]))
    return positions, cells, pbc, batch


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("backend", ["vesin", "torch"])
def test_md_like_trajectory_with_npt_cell_changes_never_misses_a_pair(dtype, backend):
    """Random displacements and small isotropic/anisotropic cell deformations (positions follow the cell).

    At every step the skin list, filtered to the cutoff, equals a fresh ASE list on the same
    (dtype-rounded) structure; the list is reused between rebuilds, so the check is exercised.
    """
    rng = np.random.default_rng(0)
    frames = structures()
    nl = SkinNeighborList(CUTOFF, skin=0.6, backend=backend)
    steps = 40
    for step in range(steps):
        for atoms in frames:
            atoms.positions += rng.normal(0.0, 0.04, atoms.positions.shape)  # not wrapped: like MD
            if atoms.pbc.any() and step % 3 == 0:  # NPT-like: a small strain, atoms carried along
                strain = np.eye(3) + np.diag(rng.normal(0.0, 0.006, 3)) + rng.normal(0.0, 0.002, (3, 3))
                strain[:, ~atoms.pbc] = 0.0
                strain[~atoms.pbc, :] = 0.0
                strain[~atoms.pbc, ~atoms.pbc] = 1.0
                atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        positions, cells, pbc, batch = as_tensors(frames, dtype)
        edge_index, shifts = nl(positions, cells, pbc, batch)
        assert edge_index.dtype == torch.int64 and edge_index.shape[0] == 2 and shifts.dtype == dtype
        # ASE sees exactly the numbers the list saw
        rounded = []
        for b, atoms in enumerate(frames):
            copy = atoms.copy()
            copy.cell = cells[b].double().numpy()
            copy.positions = positions[batch == b].double().numpy()
            rounded.append(copy)
        got = within_cutoff(edge_index, shifts, positions.double(), cells, batch, CUTOFF)
        want = ase_pairs(rounded, CUTOFF)
        assert not want - got, f"step {step}: {len(want - got)} pairs within the cutoff are missing"
        assert got == want
    assert 1 < nl.rebuilds < steps // 2, f"{nl.rebuilds} rebuilds in {steps} steps"


def test_rebuilds_exactly_when_two_atoms_may_have_crossed_in():
    """Two atoms just outside cutoff + skin approach each other: kept while each moved < skin/2, rebuilt after."""
    skin = 0.5
    cell = torch.eye(3, dtype=torch.float64) * 30.0
    d0 = CUTOFF + skin + 0.001
    positions = torch.tensor([[5.0, 5.0, 5.0], [5.0 + d0, 5.0, 5.0]], dtype=torch.float64)
    pbc, batch = torch.tensor([[True, True, True]]), torch.zeros(2, dtype=torch.int64)
    nl = SkinNeighborList(CUTOFF, skin=skin)
    edge_index, _ = nl(positions, cell[None], pbc, batch)
    assert edge_index.shape[1] == 0 and nl.rebuilds == 1
    step = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]], dtype=torch.float64)
    edge_index, _ = nl(positions + 0.24 * step, cell[None], pbc, batch)  # 0.48 skin closer: still > cutoff apart
    assert nl.rebuilds == 1 and edge_index.shape[1] == 0
    edge_index, _ = nl(positions + 0.2501 * step, cell[None], pbc, batch)  # now 4.0008 Å apart: must rebuild
    assert nl.rebuilds == 2
    edge_index, _ = nl(positions + 0.26 * step, cell[None], pbc, batch)  # 3.981 Å: the pair is in the list
    assert edge_index.shape[1] == 2


def test_many_small_compressions_add_up():
    """A cell squeezed by 0.2 % per call, positions carried along (no atom moves in the cell frame):
    compared with the last build, not the last call, so the strain accumulates into a rebuild."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    nl = SkinNeighborList(CUTOFF, skin=0.3)
    positions, cells, pbc, batch = as_tensors([atoms], torch.float64)
    for k in range(40):
        scale = 0.997 ** k
        edge_index, shifts = nl(positions * scale, cells * scale, pbc, batch)
        scaled = atoms.copy()
        scaled.set_cell(atoms.cell.array * scale, scale_atoms=True)
        assert within_cutoff(edge_index, shifts, positions * scale, cells * scale, batch, CUTOFF) == ase_pairs([scaled], CUTOFF)
    assert 2 <= nl.rebuilds < 20


def test_only_the_stale_walker_is_searched_again():
    """One walker's atom moves past skin/2: that structure alone is searched again; the others keep their pairs."""
    frames = [bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1)) for _ in range(3)]
    for k, atoms in enumerate(frames):
        atoms.rattle(0.05, seed=k)
    positions, cells, pbc, batch = as_tensors(frames, torch.float64)
    nl = SkinNeighborList(CUTOFF, skin=0.5)
    before = pair_set(*nl(positions, cells, pbc, batch)[0], nl(positions, cells, pbc, batch)[1].long())
    assert (nl.rebuilds, nl.structure_rebuilds) == (1, 3)
    frames[1].positions[3] += [0.3, 0.0, 0.0]
    moved = torch.tensor(np.concatenate([a.positions for a in frames]))
    edge_index, shifts = nl(moved, cells, pbc, batch)
    assert (nl.rebuilds, nl.structure_rebuilds) == (2, 4)
    after = pair_set(*edge_index, shifts.long())
    owner = batch.numpy()
    untouched = {p for p in before if owner[p[0]] != 1}
    assert untouched == {p for p in after if owner[p[0]] != 1}
    assert within_cutoff(edge_index, shifts, moved, cells, batch, CUTOFF) == ase_pairs(frames, CUTOFF)


def test_a_nan_position_is_not_silently_kept():
    """An exploded walker (NaN coordinate) makes the list stale, and the rebuild names the atom."""
    positions, cells, pbc, batch = as_tensors(structures()[:2], torch.float64)
    nl = SkinNeighborList(CUTOFF, skin=0.5)
    nl(positions, cells, pbc, batch)
    broken = positions.clone()
    broken[5, 1] = float("nan")
    with pytest.raises(NeighborListError, match="atom 5"):
        nl(broken, cells, pbc, batch)


def test_walkers_leaving_and_joining_rebuild_and_reset():
    frames = structures()
    nl = SkinNeighborList(CUTOFF, skin=0.5)
    positions, cells, pbc, batch = as_tensors(frames, torch.float64)
    nl(positions, cells, pbc, batch)
    nl(positions, cells, pbc, batch)
    assert nl.rebuilds == 1
    keep = batch != 1  # walker 1 leaves: renumber the rest
    small = [frames[0], frames[2], frames[3]]
    p2, c2, pbc2, b2 = as_tensors(small, torch.float64)
    assert torch.equal(p2, positions[keep])
    edge_index, shifts = nl(p2, c2, pbc2, b2)
    assert nl.rebuilds == 2
    assert within_cutoff(edge_index, shifts, p2, c2, b2, CUTOFF) == ase_pairs(small, CUTOFF)
    # same N and number of structures but a different assignment of atoms to structures
    b3 = b2.clone()
    n0 = len(frames[0])
    b3[n0 - 1] = 1
    p3 = p2.clone()
    nl(p3, c2, pbc2, b3)
    assert nl.rebuilds == 3
    nl.reset()
    nl(p2, c2, pbc2, b2)
    assert nl.rebuilds == 4


def test_matches_graph_batch_convention():
    """Same edge_index/shifts dtypes and pair set as alflow.graph.build_batch at cutoff + skin."""
    frames = structures()
    positions, cells, pbc, batch = as_tensors(frames, torch.float32)
    nl = SkinNeighborList(3.5, skin=0.5)
    edge_index, shifts = nl(positions, cells, pbc, batch)
    ref = build_batch(positions, np.concatenate([a.numbers for a in frames]), cells, pbc.numpy(), [len(a) for a in frames],
                      4.0, dtype=torch.float32)
    assert edge_index.dtype == ref["edge_index"].dtype and shifts.dtype == ref["shifts"].dtype
    assert pair_set(*edge_index, shifts.long()) == pair_set(*ref["edge_index"], ref["shifts"].long())


def test_errors_name_the_argument():
    with pytest.raises(NeighborListError, match="skin"):
        SkinNeighborList(4.0, skin=-1.0)
    with pytest.raises(NeighborListError, match="cutoff"):
        SkinNeighborList(0.0)
    nl = SkinNeighborList(4.0)
    positions, cells, pbc, batch = as_tensors(structures()[:2], torch.float64)
    with pytest.raises(NeighborListError, match="batch"):
        nl(positions, cells, pbc, batch[:-1])
    with pytest.raises(NeighborListError, match="batch: expected sorted"):
        nl(positions, cells, pbc, batch.flip(0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_cuda_trajectory_matches_ase(dtype):
    """On a GPU the list lives on the device (torch search) and still never misses a pair."""
    rng = np.random.default_rng(1)
    frames = structures()
    nl = SkinNeighborList(CUTOFF, skin=0.6)
    for _ in range(20):
        for atoms in frames:
            atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
        positions, cells, pbc, batch = (x.cuda() for x in as_tensors(frames, dtype))
        edge_index, shifts = nl(positions, cells, pbc, batch)
        assert edge_index.is_cuda and shifts.is_cuda
        rounded = []
        for b, atoms in enumerate(frames):
            copy = atoms.copy()
            copy.cell = cells[b].double().cpu().numpy()
            copy.positions = positions[batch == b].double().cpu().numpy()
            rounded.append(copy)
        got = within_cutoff(edge_index.cpu(), shifts.cpu(), positions.double().cpu(), cells.cpu(), batch.cpu(), CUTOFF)
        assert got == ase_pairs(rounded, CUTOFF)
    assert nl.rebuilds < 20


@pytest.mark.gpu
def test_cuda_check_without_rebuild_syncs_once():
    """A call that keeps the list reads back one boolean: exactly one host sync (torch's sync debug mode)."""
    import warnings

    positions, cells, pbc, batch = (x.cuda() for x in as_tensors(structures(), torch.float32))
    nl = SkinNeighborList(CUTOFF, skin=0.5)
    nl(positions, cells, pbc, batch)
    moved = positions + 0.01
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            nl(moved, cells, pbc, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert nl.rebuilds == 1
    assert len(syncs) == 1, [str(w.message) for w in syncs]
