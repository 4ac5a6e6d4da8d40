"""potentials.triplets against a brute-force loop over each centre's edges, on periodic cells smaller than the cutoff.

Also ``union_over_vmap``, the edge mask a committee's torch.vmap can use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from alflow import keys
from alflow.graph import atoms_to_batch
from potentials.triplets import triplets, union_over_vmap


def brute_force(edge_index: np.ndarray, mask: np.ndarray | None, ordered: bool) -> set[tuple[int, int]]:
    """Every (a, b) with a ≠ b, same centre, both selected; a < b when unordered."""
    n_edges = edge_index.shape[1]
    selected = [e for e in range(n_edges) if mask is None or mask[e]]
    pairs = set()
    for a in selected:
        for b in selected:
            if a != b and edge_index[0, a] == edge_index[0, b] and (ordered or a < b):
                pairs.add((a, b))
    return pairs


def as_pairs(edge_a: torch.Tensor, edge_b: torch.Tensor) -> list[tuple[int, int]]:
    return list(zip(edge_a.tolist(), edge_b.tolist()))


def structures() -> list[tuple[Atoms, float]]:
    rattled = bulk("Cu", "fcc", a=3.6, cubic=True)
    rattled.numbers[1] = 28
    rattled.rattle(0.1, seed=1)
    sheared = bulk("Ni", "hcp", a=2.5, c=4.1)
    sheared.rattle(0.05, seed=2)
    return [(bulk("Cu", "fcc", a=3.6), 4.0), (rattled, 3.0), (rattled, 4.5), (sheared, 3.2)]


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("case", range(4))
def test_triplets_match_brute_force(case: int, ordered: bool):
    atoms, cutoff = structures()[case]
    batch = atoms_to_batch(atoms, cutoff, dtype=torch.float64)
    edge_index = batch[keys.EDGE_INDEX]
    # shuffle the edges: the builder must not rely on the neighbor list's order
    perm = torch.randperm(edge_index.shape[1], generator=torch.Generator().manual_seed(case))
    edge_index = edge_index[:, perm]
    assert edge_index.shape[1] > 3 * len(atoms)  # cells smaller than the cutoff: many images per atom
    positions, shifts = batch[keys.POSITIONS], batch[keys.SHIFTS][perm]
    vectors = positions[edge_index[1]] - positions[edge_index[0]] + shifts @ batch[keys.CELL][0]
    d = vectors.norm(dim=-1)
    for mask in (None, d < 0.8 * cutoff):
        a, b = triplets(edge_index, len(atoms), mask, ordered=ordered)
        got = as_pairs(a, b)
        assert len(got) == len(set(got)), "a triplet appears twice"
        expected = brute_force(edge_index.numpy(), None if mask is None else mask.numpy(), ordered)
        assert set(got) == expected
        # grouped by centre, ascending
        centres = edge_index[0, a]
        assert bool((centres[1:] >= centres[:-1]).all())
    if case == 0:  # 1-atom cell: every edge is an image of the atom itself; all pairs of images are triplets
        n = edge_index.shape[1]
        a, b = triplets(edge_index, 1, ordered=ordered)
        assert a.shape[0] == (n * (n - 1) if ordered else n * (n - 1) // 2)


def test_triplets_across_a_batch_never_mix_structures():
    frames = [atoms for atoms, _ in structures()[1:]]
    batch = atoms_to_batch(frames, 3.2, dtype=torch.float64)
    edge_index = batch[keys.EDGE_INDEX]
    a, b = triplets(edge_index, batch[keys.POSITIONS].shape[0])
    assert set(as_pairs(a, b)) == brute_force(edge_index.numpy(), None, True)
    structure = batch[keys.BATCH][edge_index[0]]
    assert bool((structure[a] == structure[b]).all())


def test_triplets_edge_cases():
    empty = torch.zeros((2, 0), dtype=torch.long)
    a, b = triplets(empty, 3)
    assert a.shape == (0,) and b.shape == (0,)
    # atom 0 has one edge (no triplet), atom 2 has three, atom 1 none
    edge_index = torch.tensor([[2, 0, 2, 2], [0, 1, 1, 0]])
    a, b = triplets(edge_index, 3)
    assert set(as_pairs(a, b)) == {(0, 2), (2, 0), (0, 3), (3, 0), (2, 3), (3, 2)}
    a, b = triplets(edge_index, 3, ordered=False)
    assert set(as_pairs(a, b)) == {(0, 2), (0, 3), (2, 3)}
    with pytest.raises(ValueError, match="mask"):
        triplets(edge_index, 3, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="edge_index"):
        triplets(edge_index[0], 3)


def test_union_over_vmap_gives_a_plain_mask():
    """Outside vmap: unchanged. Inside (nested) vmap: the union over the mapped members, usable for indexing."""
    d = torch.rand(2, 3, 6, generator=torch.Generator().manual_seed(0))
    mask = d[0, 0] < 0.5
    assert union_over_vmap(mask) is mask

    def select(x: torch.Tensor) -> torch.Tensor:
        keep = union_over_vmap(x < 0.5)
        assert keep.shape == (6,) and keep.dtype == torch.bool
        return x[torch.nonzero(keep).squeeze(1)].sum()

    got = torch.vmap(torch.vmap(select))(d)
    union = (d < 0.5).flatten(0, 1).any(0)
    torch.testing.assert_close(got, d[:, :, union].sum(-1))
