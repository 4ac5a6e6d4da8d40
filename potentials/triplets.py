"""Triplets (angles) from a periodic neighbor list: pairs of distinct edges that share their centre atom.

An edge e = (i, j, S) of ``edge_index`` (row 0 = centre i, row 1 = neighbour j,
``alflow.neighbors``) is one *image* of j. A triplet is two distinct edges
(e_a, e_b) with the same centre i: the angle j–i–k between D_a and D_b. Since
edges are images, j and k may be the same atom seen through two different cell
shifts — in cells smaller than the cutoff that is most triplets — and j may even
be i itself (S ≠ 0); only e_a = e_b is excluded.

Built without a Python loop over atoms or edges: sort the (selected) edges by
centre, count the edges of each centre, and enumerate each centre's block of
pairs with ``repeat_interleave`` + ``arange`` arithmetic. Used by ANI's angular
symmetry functions (``potentials.ani``) and meant for DimeNet++.
"""

from __future__ import annotations

import torch

__all__ = ["triplets", "union_over_vmap"]


def union_over_vmap(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask made plain (unbatched) inside ``torch.vmap``: the union over the mapped members.

    Selecting edges with a mask computed from batched distances is a dynamic shape, which
    ``torch.vmap`` refuses (a committee maps one potential over stacked member parameters,
    ``potentials.committee``). Members share the geometry, so the union is every member's own
    mask; the caller keeps an exact per-member cutoff factor (zero outside). Outside vmap this
    returns ``mask`` unchanged. Uses torch's functorch internals; without them the mask is returned
    as is (and vmap then falls back to sequential members).
    """
    try:
        from torch._C import _functorch
    except ImportError:  # pragma: no cover
        return mask
    while _functorch.is_batchedtensor(mask):
        unwrapped, bdim = _functorch._unwrap_batched(mask, _functorch.maybe_get_level(mask))
        mask = unwrapped.any(dim=bdim) if bdim is not None else unwrapped
    return mask


def triplets(
    edge_index: torch.Tensor,
    n_atoms: int,
    mask: torch.Tensor | None = None,
    *,
    ordered: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (edge_a, edge_b), each (T,), of distinct edges with the same centre atom.

    edge_index: (2, E) int64, row 0 the centre atom i.
    n_atoms: number of atoms N (centres are in 0..N-1).
    mask: optional (E,) bool; only edges where it is True take part (e.g. d < an angular cutoff).
    ordered: True (default) gives every ordered pair, both (a, b) and (b, a) — what
        DimeNet's directional messages need; False gives each unordered pair once, with
        edge_a preceding edge_b in centre-sorted order (ANI's sum over pairs j < k).

    Both outputs index into the E edges of ``edge_index``; triplets come grouped by centre
    (ascending), T = Σ_i n_i (n_i - 1) (ordered) or Σ_i n_i (n_i - 1) / 2 for n_i selected
    edges around atom i.
    """
    if edge_index.ndim != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index: expected shape (2, E), got {tuple(edge_index.shape)}")
    centre = edge_index[0]
    device = centre.device
    edges = torch.arange(centre.shape[0], device=device)
    if mask is not None:
        if mask.shape != centre.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"mask: expected a bool tensor of shape ({centre.shape[0]},), got {mask.dtype} {tuple(mask.shape)}"
            )
        edges = edges[mask]
    centre_sorted, order = torch.sort(centre[edges], stable=True)
    edges = edges[order]
    counts = torch.bincount(centre_sorted, minlength=int(n_atoms))  # edges per centre atom
    block_start = (torch.cumsum(counts, 0) - counts)[centre_sorted]  # first sorted position of each edge's block
    degree = counts[centre_sorted]
    position = torch.arange(edges.shape[0], device=device)
    if ordered:
        n_partners = degree - 1  # every other edge of the block
    else:
        n_partners = block_start + degree - position - 1  # the edges after it in the block
    first = torch.cumsum(n_partners, 0) - n_partners  # first triplet of each edge
    a_pos = torch.repeat_interleave(position, n_partners)
    t = torch.arange(a_pos.shape[0], device=device) - first[a_pos]  # 0 .. n_partners - 1 within each edge
    if ordered:
        local_a = a_pos - block_start[a_pos]
        b_pos = block_start[a_pos] + t + (t >= local_a).long()  # skip the edge itself
    else:
        b_pos = a_pos + 1 + t
    return edges[a_pos], edges[b_pos]
