"""Periodic neighbor lists for one structure or a batch of structures.

A pair (i, j, S) means atom j, seen through the periodic image shifted by the
integer cell vector S, lies within ``cutoff`` of atom i:

    D = r_j - r_i + S @ cell        (Å, cell vectors as rows, as in ASE)
    d = |D|

The pair set is exactly ASE's ``neighbor_list("ijSdD", atoms, cutoff)`` (a full
list: both (i, j, S) and (j, i, -S); no self pair with S = 0), including cells
smaller than the cutoff, mixed periodicity and unwrapped positions.

The search itself runs in vesin's C++ cell list (https://github.com/Luthaf/vesin),
which is faster than any pure-Python implementation; alflow adds validation with
clear errors, numpy *and* torch inputs, batches, and differentiable vectors:
with torch inputs D and d are rebuilt in torch from ``positions`` and ``cell``,
so autograd gives forces (dE/dr) and, through a strained cell, stress.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import vesin
from alflow.errors import InputError

try:  # torch is a hard dependency of alflow, but keep this module importable without it
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]

Array = TypeVar("Array")

__all__ = [
    "Neighbors",
    "NeighborListError",
    "neighbor_list",
    "batch_neighbor_list",
    "edge_vectors",
    "SkinNeighborList",
]


class NeighborListError(InputError):
    """Raised for invalid neighbor-list input; the message names the argument."""


@dataclass(frozen=True)
class Neighbors(Generic[Array]):
    """Pairs within the cutoff. Arrays are numpy or torch, matching the input.

    i, j: (E,) int64 atom indices (global indices for a batch).
    S: (E, 3) integer cell shifts (int32 from numpy input, int64 from torch input).
    D: (E, 3) pair vectors r_j - r_i + S @ cell, Å, dtype of the positions.
    d: (E,) distances, Å.
    """

    i: Array
    j: Array
    S: Array
    D: Array
    d: Array

    def __len__(self) -> int:
        return int(self.i.shape[0])


# ----------------------------------------------------------------------------- validation


MAX_CUTOFF = 100.0  # Å


def _check_cutoff(cutoff: float) -> float:
    try:
        value = float(cutoff)
    except (TypeError, ValueError):
        raise NeighborListError(f"cutoff: expected a positive number in Å, got {cutoff!r}") from None
    if not np.isfinite(value) or value <= 0.0:
        raise NeighborListError(f"cutoff: expected a positive finite number in Å, got {cutoff!r}")
    if value > MAX_CUTOFF:  # the cell-list search grows as cutoff³ even for a few atoms: 10⁴ Å takes minutes
        raise NeighborListError(f"cutoff: expected at most {MAX_CUTOFF:g} Å (interatomic cutoffs are a few Å), "
                                f"got {cutoff!r}")
    return value


MAX_PAIRS = 100_000_000  # ~6 GB of pair arrays (i, j, S, D, d), more while they are built: a mistake


def _check_pair_count(cutoff: float, cells: np.ndarray, pbc: np.ndarray, counts: Any,
                      positions: np.ndarray | None = None, name: str = "cell") -> None:
    """Refuse a cutoff/cell combination whose pair list would be astronomically large (``MAX_PAIRS``).

    Expected pairs of a structure of N atoms: N² × (4π/3) rc³ / V when fully
    periodic (uniform density); otherwise N² × Π 2 rc / h_k over periodic
    directions (h_k: cell height) × Π min(1, 2 rc / L_k) over non-periodic ones
    (L_k: extent of the positions along axis k, when given). A few µs.
    """
    if cells.shape[0] == 1 and pbc[0].all():  # common case, pure Python
        (ax, ay, az), (bx, by, bz), (cx, cy, cz) = cells[0].tolist()
        volume = abs(ax * (by * cz - bz * cy) - ay * (bx * cz - bz * cx) + az * (bx * cy - by * cx))
        n = float(counts[0])
        if n * n * 4.18879 * cutoff**3 <= MAX_PAIRS * volume:
            return
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    starts = np.concatenate([[0.0], np.cumsum(counts)[:-1]]).astype(np.int64)
    estimates = np.zeros(cells.shape[0])
    for b in range(cells.shape[0]):
        n = counts[b]
        if pbc[b].all():
            estimates[b] = n * n * 4.18879 * cutoff**3 / abs(float(np.linalg.det(cells[b])))
            continue
        estimate = n * n
        if pbc[b].any():  # heights of the periodic lattice: h_k = 1 / sqrt((G^-1)_kk), G = P P^T
            periodic = cells[b][pbc[b]]
            inverse_gram = np.linalg.inv(periodic @ periodic.T)
            estimate *= float(np.prod(2.0 * cutoff * np.sqrt(np.diag(inverse_gram))))
        if estimate > MAX_PAIRS and positions is not None and n > 1:  # refine: the atoms' extent
            extent = np.ptp(positions[starts[b] : starts[b] + int(n)], axis=0)
            for k in np.flatnonzero(~pbc[b]):
                estimate *= min(1.0, 2.0 * cutoff / max(float(extent[k]), 1e-300))
        estimates[b] = estimate
    total = float(estimates.sum())
    if total > MAX_PAIRS:
        where = int(np.argmax(estimates))
        label = f"{name}[{where}]" if cells.shape[0] > 1 else name
        raise NeighborListError(
            f"cutoff: {cutoff:g} Å with {label} {np.round(cells[where], 4).tolist()} (pbc={pbc[where].tolist()}, "
            f"{int(counts[where])} atoms) would give about {total:.2g} pairs (more than {MAX_PAIRS:.0e}, "
            "several GB); expected a cutoff of a few Å"
        )


def _as_pbc(pbc: Any, n_structures: int | None = None) -> np.ndarray:
    arr = np.asarray(pbc.detach().cpu() if _is_torch(pbc) else pbc)
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise NeighborListError(f"pbc: expected booleans, got {arr!r}")
        arr = arr.astype(bool)
    if n_structures is None:
        if arr.shape == ():
            arr = np.repeat(arr, 3)
        if arr.shape != (3,):
            raise NeighborListError(f"pbc: expected a bool or 3 bools, got shape {arr.shape}")
        return arr
    if arr.shape == ():
        arr = np.full((n_structures, 3), bool(arr))
    elif arr.shape == (3,):
        arr = np.broadcast_to(arr, (n_structures, 3))
    if arr.shape != (n_structures, 3):
        raise NeighborListError(f"pbc: expected shape ({n_structures}, 3) for {n_structures} structures, got {arr.shape}")
    return arr


def _check_cells(cells: np.ndarray, pbc: np.ndarray, name: str = "cell") -> None:
    """Periodic directions need non-degenerate lattice vectors (cells (B, 3, 3), pbc (B, 3)).

    The periodic vectors must have non-zero length and span a non-zero volume
    (area, for two): sin of the angles between them above 1e-6.
    """
    if not np.isfinite(cells).all():
        raise NeighborListError(f"{name}: contains NaN or inf")
    if cells.shape[0] == 1 and pbc[0].all():  # common case, pure Python: a few µs
        (ax, ay, az), (bx, by, bz), (cx, cy, cz) = cells[0].tolist()
        volume = abs(ax * (by * cz - bz * cy) - ay * (bx * cz - bz * cx) + az * (bx * cy - by * cx))
        lengths = ((ax * ax + ay * ay + az * az) * (bx * bx + by * by + bz * bz) * (cx * cx + cy * cy + cz * cz)) ** 0.5
        if volume > 1e-6 * lengths and lengths > 0.0:
            return
    # Gram matrix of the periodic vectors, padded with identity along non-periodic directions
    gram = cells @ cells.transpose(0, 2, 1)
    mask = pbc[:, :, None] & pbc[:, None, :]
    gram = np.where(mask, gram, np.eye(3)[None])
    sq_norms = np.einsum("bii->bi", gram)
    scale = np.prod(sq_norms, axis=1)
    bad = (np.where(pbc, sq_norms, 1.0) <= 1e-16).any(axis=1) | (np.linalg.det(gram) <= 1e-12 * scale)
    bad &= pbc.any(axis=1)
    if bad.any():
        b = int(np.flatnonzero(bad)[0])
        where = f"{name}[{b}]" if cells.shape[0] > 1 else name
        raise NeighborListError(
            f"{where}: the periodic lattice vectors {cells[b][pbc[b]].tolist()} are degenerate "
            f"(zero length or zero volume); expected linearly independent vectors for "
            f"every periodic direction (pbc={pbc[b].tolist()})"
        )


def _check_positions(positions: np.ndarray, name: str = "positions") -> None:
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise NeighborListError(f"{name}: expected shape (N, 3), got {positions.shape}")
    if np.isfinite(positions.sum()):  # one pass; NaN and inf propagate through the sum
        return
    finite = np.isfinite(positions).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise NeighborListError(f"{name}: atom {bad} has a NaN or inf coordinate {positions[bad].tolist()}")


def _is_torch(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def _to_numpy64(x: Any, name: str) -> np.ndarray:
    if type(x) is np.ndarray and x.dtype == np.float64 and x.flags.c_contiguous:
        return x  # fast path: nothing to convert
    arr = x.detach().cpu().numpy() if _is_torch(x) else np.asarray(x)
    if not np.issubdtype(arr.dtype, np.number):
        raise NeighborListError(f"{name}: expected numbers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float64)


def _float_dtype(x: Any) -> Any:
    """The floating dtype results should have for numpy input ``x`` (float64 for integers)."""
    dtype = getattr(x, "dtype", None)
    return dtype if dtype is not None and np.issubdtype(dtype, np.floating) else np.float64


# ----------------------------------------------------------------------------- search


_CALCULATORS: dict[float, vesin.NeighborList] = {}


def _vesin(cutoff: float) -> vesin.NeighborList:
    calc = _CALCULATORS.get(cutoff)
    if calc is None:
        if len(_CALCULATORS) > 16:
            _CALCULATORS.clear()
        calc = _CALCULATORS[cutoff] = vesin.NeighborList(cutoff=cutoff, full_list=True)
    return calc


def _search(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> tuple[np.ndarray, ...]:
    """(i, j, S, D, d) as float64/int64 numpy arrays, validated input assumed."""
    n = positions.shape[0]
    if n == 0:
        return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int32),
                np.zeros((0, 3)), np.zeros(0))
    i, j, S, D, d = _vesin(cutoff).compute(positions, cell, pbc, quantities="ijSDd", copy=True)
    # vesin hands out uint64 indices (always < 2**63) and int32 shifts: reinterpret, never copy
    return i.view(np.int64), j.view(np.int64), S, D, d


# ----------------------------------------------------------------------------- search on the device (pure torch)
#
# A batched cell list in plain torch ops, run on the tensors' own device (no host copy of
# positions; a few scalar syncs for output sizes). Per structure: non-periodic lattice vectors
# are replaced by an orthonormal completion, atoms are wrapped into the cell along periodic
# directions (integer wrap k, remembered for the shifts), binned into a grid of bins at least
# ``cutoff`` high, and each atom is compared with the atoms of the (2m+1)^3 neighbouring bins,
# where m = ceil(cutoff / bin height): m > 1 only for cells thinner than the cutoff, whose
# periodic images then come from bins visited through several cell shifts. Distances are
# compared in float64 so the pair set is the float64 one (ASE's) whatever the input dtype.

_BACKENDS = ("auto", "vesin", "torch", "vesin-torch")
_CHUNK = 1 << 21  # candidate pairs per chunk: bounds the working memory to ~100-200 MB
_MARGIN = 1.0 + 1e-6  # bins a hair larger than the cutoff: rounding in the binning can never lose a pair


def _backend(positions: Any, backend: str | None) -> str:
    """'vesin', 'torch' or 'vesin-torch': the explicit choice, or auto (torch for tensors off the CPU)."""
    name = "auto" if backend is None else backend
    if name not in _BACKENDS:
        raise NeighborListError(f"backend: expected one of {list(_BACKENDS)}, got {backend!r}")
    if name == "auto":
        return "torch" if _is_torch(positions) and positions.device.type != "cpu" else "vesin"
    if name == "torch" and torch is None:  # pragma: no cover
        raise NeighborListError("backend: 'torch' needs torch installed")
    if name == "vesin-torch":
        try:
            import vesin_torch  # noqa: F401
        except ImportError:
            raise NeighborListError(
                "backend: 'vesin-torch' needs the vesin-torch package (pip install 'alflow[gpu]' or vesin-torch)"
            ) from None
    return name


def _unit(v: Any) -> Any:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp(min=1e-300)


def _complete_cells(cells: Any, pbc: Any) -> Any:
    """(B, 3, 3) cells with every non-periodic vector replaced by a unit vector orthogonal to the
    periodic ones and to each other (an orthonormal basis of their complement), so the cell is
    invertible and fractional coordinates along periodic directions are well defined.

    Cross products only (no eigensolver): no host sync on CUDA, so the skin check stays sync-free.
    """
    n_periodic = pbc.sum(dim=1)
    # two periodic vectors: the non-periodic row k gets the unit normal of the other two rows
    normals = torch.stack([_unit(torch.linalg.cross(cells[:, (k + 1) % 3], cells[:, (k + 2) % 3])) for k in range(3)], dim=1)
    # one periodic vector a: u = a x (the axis least aligned with a), v = a x u, to the non-periodic rows in order
    a = (cells * pbc[:, :, None]).sum(dim=1)
    axis = (torch.arange(3, device=cells.device) == a.abs().argmin(dim=1, keepdim=True)).to(cells.dtype)
    u = _unit(torch.linalg.cross(a, axis))
    v = _unit(torch.linalg.cross(a, u))
    rank = torch.cumsum((~pbc).long(), dim=1) - 1  # 0 for the first non-periodic row, 1 for the second
    line = torch.where((rank == 0)[:, :, None], u[:, None, :], v[:, None, :])
    eye = torch.eye(3, dtype=cells.dtype, device=cells.device).expand_as(cells)
    fill = torch.where((n_periodic == 2)[:, None, None], normals, torch.where((n_periodic == 1)[:, None, None], line, eye))
    return torch.where(pbc[:, :, None], cells, fill)


def _check_torch_inputs(positions: Any, cells: Any, pbc: Any, name: str) -> None:
    """Finite positions and non-degenerate periodic cells, checked on the device (one boolean sync each)."""
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise NeighborListError(f"positions: expected shape (N, 3), got {tuple(positions.shape)}")
    if not positions.dtype.is_floating_point and positions.dtype not in (torch.int32, torch.int64):
        raise NeighborListError(f"positions: expected numbers, got dtype {positions.dtype}")
    if positions.shape[0] and not bool(torch.isfinite(positions).all()):
        _check_positions(positions.detach().cpu().double().numpy())  # names the atom
    if not bool(torch.isfinite(cells).all()):
        raise NeighborListError(f"{name}: contains NaN or inf")
    gram = cells @ cells.transpose(1, 2)
    mask = pbc[:, :, None] & pbc[:, None, :]
    eye = torch.eye(3, dtype=cells.dtype, device=cells.device)
    gram = torch.where(mask, gram, eye)
    sq_norms = torch.diagonal(gram, dim1=1, dim2=2)
    scale = torch.prod(sq_norms, dim=1)
    bad = (torch.where(pbc, sq_norms, torch.ones_like(sq_norms)) <= 1e-16).any(dim=1)
    bad |= torch.linalg.det(gram) <= 1e-12 * scale
    if bool((bad & pbc.any(dim=1)).any()):
        _check_cells(cells.detach().cpu().numpy(), pbc.cpu().numpy(), name=name)  # raises with the message


def _search_torch(positions: Any, cells: Any, pbc: Any, batch: Any, cutoff: float) -> tuple[Any, Any, Any]:
    """(i, j, S) int64 on the device for all pairs with |r_j - r_i + S @ cell| < cutoff.

    positions (N, 3) and cells (B, 3, 3) float64, pbc (B, 3) bool, batch (N,) int64
    (any order), all on one device; inputs assumed valid. A full list without self pairs.
    """
    device = positions.device
    n_atoms, n_structures = positions.shape[0], cells.shape[0]
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    if n_atoms == 0:
        return empty, empty, torch.zeros((0, 3), dtype=torch.int64, device=device)
    reach = cutoff * _MARGIN
    full = _complete_cells(cells, pbc)
    inverse = torch.linalg.inv_ex(full).inverse
    heights = 1.0 / torch.linalg.norm(inverse, dim=1)  # (B, 3): distance between lattice planes, Å
    atom_pbc = pbc[batch]
    frac = torch.einsum("nx,nxa->na", positions, inverse[batch])
    wrap = torch.where(atom_pbc, torch.floor(frac), torch.zeros_like(frac))
    frac = frac - wrap
    wrapped = positions - torch.einsum("na,nax->nx", wrap, cells[batch])
    wrap = wrap.long()

    # grid: periodic directions split the cell into bins >= reach high; non-periodic ones the atoms' extent
    big = torch.full((n_structures, 3), float("inf"), dtype=frac.dtype, device=device)
    low = big.scatter_reduce(0, batch[:, None].expand(-1, 3), frac, "amin")
    high = (-big).scatter_reduce(0, batch[:, None].expand(-1, 3), frac, "amax")
    occupied = torch.isfinite(low)
    low = torch.where(occupied, low, torch.zeros_like(low))
    span = torch.where(occupied, high - low, torch.zeros_like(low))
    length = torch.where(pbc, heights, span * heights)
    n_bins = torch.clamp(torch.floor(length / reach), min=1.0)
    counts = torch.bincount(batch, minlength=n_structures).to(frac.dtype)
    excess = torch.prod(n_bins, dim=1) / (4.0 * counts + 8.0)  # cap: a few bins per atom (huge vacuum, far atoms)
    n_bins = torch.where((excess > 1)[:, None], torch.clamp(torch.floor(n_bins / excess[:, None] ** (1 / 3)), min=1.0), n_bins)
    reach_bins = torch.where(pbc, torch.ceil(reach * n_bins / heights), (n_bins > 1).to(frac.dtype)).long()
    n_bins = n_bins.long()
    scaled = torch.where(atom_pbc, frac, (frac - low[batch]) / torch.where(span > 0, span, torch.ones_like(span))[batch])
    atom_bin = torch.minimum(torch.clamp(torch.floor(scaled * n_bins[batch]), min=0).long(), n_bins[batch] - 1)
    bins_per_structure = torch.prod(n_bins, dim=1)
    bin_start = torch.cumsum(bins_per_structure, 0) - bins_per_structure
    strides = torch.stack([n_bins[:, 1] * n_bins[:, 2], n_bins[:, 2], torch.ones_like(n_bins[:, 2])], dim=1)
    atom_key = bin_start[batch] + (atom_bin * strides[batch]).sum(dim=1)
    total_bins = int(bins_per_structure.sum())
    order = torch.argsort(atom_key)
    bin_count = torch.bincount(atom_key, minlength=total_bins)
    bin_first = torch.cumsum(bin_count, 0) - bin_count

    # Half shell: bin offsets o are enumerated in lexicographic order, and a pair (i, j, S) seen from i
    # through offset o is (j, i, -S) seen from j through -o. Visit only o > 0 (the upper half of the
    # enumeration) and o = 0 with j > i, then add the mirrored pairs: half the candidates, same full list.
    columns = wrapped.t().contiguous()  # (3, N)
    widths = 2 * reach_bins + 1  # (B, 3) bin offsets per direction
    n_offsets = torch.prod(widths, dim=1)
    centre = (n_offsets - 1) // 2  # index of o = (0, 0, 0)
    half = n_offsets - centre
    block = max(1, _CHUNK // max(1, int(half.max())))
    parts_i, parts_j, parts_S = [], [], []
    for start in range(0, n_atoms, block):
        atoms = torch.arange(start, min(start + block, n_atoms), device=device)
        per_atom = half[batch[atoms]]
        ends = torch.cumsum(per_atom, 0)
        n_pairs = int(ends[-1])
        owner = torch.repeat_interleave(atoms, per_atom, output_size=n_pairs)  # (atom, bin offset) pairs
        s_of = batch[owner]
        local = torch.arange(n_pairs, device=device) + (centre[batch[atoms]] - ends + per_atom).repeat_interleave(
            per_atom, output_size=n_pairs
        )
        w = widths[s_of]
        offset = torch.stack([local // (w[:, 1] * w[:, 2]), (local // w[:, 2]) % w[:, 1], local % w[:, 2]], dim=1)
        target = atom_bin[owner] + offset - reach_bins[s_of]
        nb = n_bins[s_of]
        inside = atom_pbc[owner] | ((target >= 0) & (target < nb))
        keep = inside.all(dim=1)
        own_bin = local == centre[s_of]
        owner, target, nb, s_of, own_bin = owner[keep], target[keep], nb[keep], s_of[keep], own_bin[keep]
        shift = torch.div(target, nb, rounding_mode="floor")  # cell shift of the visited bin (0 when non-periodic)
        key = bin_start[s_of] + ((target - shift * nb) * strides[s_of]).sum(dim=1)
        size, first = bin_count.index_select(0, key), bin_first.index_select(0, key)
        # r_j - base is the pair vector of every atom j of the visited bin (base = r_i - shift @ cell)
        base = wrapped.index_select(0, owner) - torch.bmm(shift.to(wrapped.dtype)[:, None, :], cells.index_select(0, s_of))[:, 0]
        base = base.t().contiguous()  # (3, pairs): per-coordinate gathers and sums are several times faster than (n, 3) ones
        ends = torch.cumsum(size, 0)
        total = int(ends[-1]) if len(ends) else 0
        # split the candidates (atom i x atoms of one visited bin) into chunks of ~_CHUNK
        cuts = [0]
        if total > _CHUNK:
            cuts += torch.searchsorted(ends, torch.arange(_CHUNK, total, _CHUNK, device=device), right=True).tolist()
        cuts.append(len(ends))
        for a, b in zip(cuts[:-1], cuts[1:]):
            if b <= a:
                continue
            sz = size[a:b]
            n_cand = int(ends[b - 1] - (ends[a - 1] if a else 0))
            if n_cand == 0:
                continue
            pair = torch.repeat_interleave(torch.arange(b - a, device=device), sz, output_size=n_cand)  # within the chunk
            # index into ``order`` of candidate c: first[pair] + (c - start of pair's run) = c + jump[pair]
            jump = first[a:b] - (torch.cumsum(sz, 0) - sz)
            j = order.index_select(0, torch.arange(n_cand, device=device) + jump.index_select(0, pair))
            pair += a
            dist2 = torch.zeros(n_cand, dtype=columns.dtype, device=device)
            for axis in range(3):
                delta = columns[axis].index_select(0, j) - base[axis].index_select(0, pair)
                dist2.addcmul_(delta, delta)
            hit = torch.nonzero(dist2 < cutoff * cutoff).squeeze(1)
            pair, j = pair.index_select(0, hit), j.index_select(0, hit)
            i, sh = owner.index_select(0, pair), shift.index_select(0, pair)
            real = torch.nonzero((j > i) | ~own_bin.index_select(0, pair)).squeeze(1)  # o = 0: each pair once, no self pair
            i, j, sh = i.index_select(0, real), j.index_select(0, real), sh.index_select(0, real)
            parts_i.append(i)
            parts_j.append(j)
            parts_S.append(sh - wrap.index_select(0, j) + wrap.index_select(0, i))
    if not parts_i:
        return empty, empty, torch.zeros((0, 3), dtype=torch.int64, device=device)
    i, j, S = torch.cat(parts_i), torch.cat(parts_j), torch.cat(parts_S)
    return torch.cat([i, j]), torch.cat([j, i]), torch.cat([S, -S])


def _check_torch_pair_count(positions: Any, cells: Any, pbc: Any, batch: Any, cutoff: float, name: str) -> None:
    """``_check_pair_count`` from the (B, 3, 3) cells and counts; positions come to the host only in the rare
    case the estimate needs the atoms' extent (non-periodic directions and a huge estimate)."""
    cells_np, pbc_np = cells.cpu().numpy(), pbc.cpu().numpy()
    counts = torch.bincount(batch, minlength=cells.shape[0]).cpu().numpy()
    try:
        _check_pair_count(cutoff, cells_np, pbc_np, counts, None, name=name)
    except NeighborListError:
        if pbc_np.all():
            raise
        _check_pair_count(cutoff, cells_np, pbc_np, counts, positions.cpu().numpy(), name=name)


_VESIN_TORCH: dict[float, Any] = {}


def _search_vesin_torch(positions: Any, cells: Any, pbc: Any, batch: Any, cutoff: float) -> tuple[Any, Any, Any]:
    """(i, j, S) like ``_search_torch`` from vesin-torch (C++/CUDA, on the tensors' device), one call per
    structure; ``batch`` sorted. The structure sizes come to the host (B integers)."""
    from vesin_torch import NeighborList

    calc = _VESIN_TORCH.get(cutoff)
    if calc is None:
        if len(_VESIN_TORCH) > 16:
            _VESIN_TORCH.clear()
        calc = _VESIN_TORCH[cutoff] = NeighborList(cutoff=cutoff, full_list=True)
    counts = torch.bincount(batch, minlength=cells.shape[0]).tolist()
    parts_i, parts_j, parts_S, start = [], [], [], 0
    for b, n in enumerate(counts):
        if n:
            i, j, S = calc.compute(positions[start : start + n], cells[b], pbc[b], quantities="ijS", copy=True)
            parts_i.append(i.to(torch.int64) + start)
            parts_j.append(j.to(torch.int64) + start)
            parts_S.append(S.to(torch.int64))
        start += n
    if not parts_i:
        empty = torch.zeros(0, dtype=torch.int64, device=positions.device)
        return empty, empty, torch.zeros((0, 3), dtype=torch.int64, device=positions.device)
    return torch.cat(parts_i), torch.cat(parts_j), torch.cat(parts_S)


def _torch_neighbors(
    positions: Any, cells: Any, pbc: Any, batch: Any | None, cutoff: float, name: str, numpy_out: bool,
    backend: str = "torch",
) -> Neighbors:
    """The torch-backend result for validated shapes: search in float64 on the device, then D and d in the input dtype."""
    pos = positions if _is_torch(positions) else torch.as_tensor(np.asarray(positions))
    device = pos.device
    cells_t = (cells if _is_torch(cells) else torch.as_tensor(np.asarray(cells, dtype=np.float64))).to(device)
    pbc_t = pbc.to(device) if _is_torch(pbc) else torch.as_tensor(np.ascontiguousarray(pbc, dtype=bool), device=device)
    _check_torch_inputs(pos, cells_t, pbc_t, name)
    pos64 = pos.detach().to(torch.float64)
    cells64 = cells_t.detach().to(torch.float64)
    if batch is None:
        batch = torch.zeros(pos.shape[0], dtype=torch.int64, device=device)
    _check_torch_pair_count(pos64, cells64, pbc_t, batch, cutoff, name)
    search = _search_vesin_torch if backend == "vesin-torch" else _search_torch
    i, j, S = search(pos64, cells64, pbc_t, batch, cutoff)
    dtype = pos.dtype if pos.dtype.is_floating_point else torch.float64
    one = cells_t.shape[0] == 1
    vectors = edge_vectors(pos.to(dtype), (cells_t[0] if one else cells_t).to(dtype), i, j, S, None if one else batch)
    distances = torch.linalg.norm(vectors, dim=-1)
    if numpy_out:
        return Neighbors(i.numpy(), j.numpy(), S.numpy().astype(np.int32), vectors.numpy(), distances.numpy())
    return Neighbors(i, j, S, vectors, distances)


# ----------------------------------------------------------------------------- public API


def edge_vectors(positions: Any, cell: Any, i: Any, j: Any, S: Any, batch: Any | None = None) -> Any:
    """D = r_j - r_i + S @ cell for each pair (Å), differentiable in torch.

    ``cell`` is (3, 3) for one structure or (B, 3, 3) with ``batch`` (N,) giving
    each atom's structure. Works on numpy arrays and torch tensors.
    """
    if _is_torch(positions):
        shifts = S.to(positions.dtype)
        if cell.ndim == 3:
            cell_per_edge = cell[batch[i]] if batch is not None else cell.expand(len(i), 3, 3)
            offset = torch.einsum("ek,ekx->ex", shifts, cell_per_edge)
        else:
            offset = shifts @ cell
        # index_select, not positions[j]: its backward (index_add) is 1.06-2x faster on the CPU (gather + backward alone)
        return positions.index_select(0, j) - positions.index_select(0, i) + offset
    shifts = np.asarray(S, dtype=positions.dtype)
    if np.ndim(cell) == 3:
        offset = np.einsum("ek,ekx->ex", shifts, np.asarray(cell)[np.asarray(batch)[i]])
    else:
        offset = shifts @ cell
    return positions[j] - positions[i] + offset


def neighbor_list(positions: Any, cell: Any, pbc: Any, cutoff: float, *, backend: str | None = None) -> Neighbors:
    """All pairs within ``cutoff`` (Å) of one structure.

    positions: (N, 3) Å, numpy or torch (any float dtype, CPU or CUDA).
    cell: (3, 3) Å, lattice vectors as rows; may be zero along non-periodic directions.
    pbc: bool or (3,) bools.
    backend: None/"auto" (torch on the tensors' device for non-CPU tensors, else vesin),
    "vesin" (C++ cell list on the host), "torch" (pure torch, on the input's device) or
    "vesin-torch" (vesin's torch extension on the input's device, one call per structure; optional).
    Returns numpy arrays for numpy input and torch tensors (on the input's device,
    D and d differentiable w.r.t. positions and cell) for torch input.
    """
    cutoff = _check_cutoff(cutoff)
    chosen = _backend(positions, backend)
    if chosen != "vesin":
        shape = tuple(cell.shape) if _is_torch(cell) else np.shape(cell)
        if shape != (3, 3):
            raise NeighborListError(f"cell: expected shape (3, 3), got {shape}")
        cells = cell[None] if _is_torch(cell) else np.asarray(cell, dtype=np.float64)[None]
        return _torch_neighbors(positions, cells, _as_pbc(pbc)[None], None, cutoff, "cell", not _is_torch(positions), chosen)
    pos64 = _to_numpy64(positions, "positions")
    _check_positions(pos64)
    cell64 = _to_numpy64(cell, "cell")
    if cell64.shape != (3, 3):
        raise NeighborListError(f"cell: expected shape (3, 3), got {cell64.shape}")
    pbc_arr = _as_pbc(pbc)
    _check_cells(cell64[None], pbc_arr[None])
    _check_pair_count(cutoff, cell64[None], pbc_arr[None], (pos64.shape[0],), pos64)
    i, j, S, D, d = _search(pos64, cell64, pbc_arr, cutoff)
    if not _is_torch(positions):
        dtype = _float_dtype(positions)
        return Neighbors(i, j, S, D.astype(dtype, copy=False), d.astype(dtype, copy=False))
    device = positions.device
    ti, tj, tS = (torch.from_numpy(a).to(device=device, dtype=torch.int64) for a in (i, j, S))
    cell_t = cell if _is_torch(cell) else torch.as_tensor(cell64, device=device)
    vectors = edge_vectors(positions, cell_t.to(positions.dtype), ti, tj, tS)
    return Neighbors(ti, tj, tS, vectors, torch.linalg.norm(vectors, dim=-1))


def batch_neighbor_list(
    positions: Any, cells: Any, pbc: Any, n_atoms: Any, cutoff: float, *, backend: str | None = None
) -> Neighbors:
    """Pairs within ``cutoff`` for many structures in one call; no pairs across structures.

    positions: (N_total, 3) Å, structures concatenated in order.
    cells: (B, 3, 3) Å. pbc: (B, 3), (3,) or a bool. n_atoms: (B,) atoms per structure.
    backend: as for ``neighbor_list`` (CUDA tensors stay on the device: one batched search).
    Returns global atom indices (offset by the structure's first atom). With torch
    input, D and d are rebuilt in torch and are differentiable.
    """
    cutoff = _check_cutoff(cutoff)
    chosen = _backend(positions, backend)
    if chosen != "vesin":
        return _batch_torch(positions, cells, pbc, n_atoms, cutoff, chosen)
    pos64 = _to_numpy64(positions, "positions")
    _check_positions(pos64)
    cells64 = _to_numpy64(cells, "cells")
    if cells64.ndim != 3 or cells64.shape[1:] != (3, 3):
        raise NeighborListError(f"cells: expected shape (B, 3, 3), got {cells64.shape}")
    counts = np.asarray(n_atoms.detach().cpu() if _is_torch(n_atoms) else n_atoms, dtype=np.int64).reshape(-1)
    n_structures = cells64.shape[0]
    if counts.shape[0] != n_structures:
        raise NeighborListError(f"n_atoms: expected {n_structures} entries (one per cell), got {counts.shape[0]}")
    if (counts < 0).any() or counts.sum() != pos64.shape[0]:
        raise NeighborListError(
            f"n_atoms: expected non-negative counts summing to the {pos64.shape[0]} positions, got sum {counts.sum()}"
        )
    pbc_arr = _as_pbc(pbc, n_structures)
    _check_cells(cells64, pbc_arr, name="cells")
    _check_pair_count(cutoff, cells64, pbc_arr, counts, pos64, name="cells")

    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    parts = [
        _search(pos64[s : s + c], cells64[b], pbc_arr[b], cutoff)
        for b, (s, c) in enumerate(zip(starts.tolist(), counts.tolist()))
    ]
    sizes = np.array([len(p[0]) for p in parts], dtype=np.int64)
    offsets = np.repeat(starts, sizes)
    i = np.concatenate([p[0] for p in parts]) + offsets if parts else np.zeros(0, np.int64)
    j = np.concatenate([p[1] for p in parts]) + offsets if parts else np.zeros(0, np.int64)
    S = np.concatenate([p[2] for p in parts]) if parts else np.zeros((0, 3), np.int32)
    if not _is_torch(positions):
        D = np.concatenate([p[3] for p in parts]) if parts else np.zeros((0, 3))
        d = np.concatenate([p[4] for p in parts]) if parts else np.zeros(0)
        dtype = _float_dtype(positions)
        return Neighbors(i, j, S, D.astype(dtype, copy=False), d.astype(dtype, copy=False))
    device = positions.device
    ti, tj, tS = (torch.from_numpy(a).to(device=device, dtype=torch.int64) for a in (i, j, S))
    cells_t = cells if _is_torch(cells) else torch.as_tensor(cells64, device=device)
    batch = torch.repeat_interleave(torch.arange(n_structures, device=device), torch.as_tensor(counts, device=device))
    vectors = edge_vectors(positions, cells_t.to(positions.dtype), ti, tj, tS, batch)
    return Neighbors(ti, tj, tS, vectors, torch.linalg.norm(vectors, dim=-1))


def _batch_torch(positions: Any, cells: Any, pbc: Any, n_atoms: Any, cutoff: float, backend: str = "torch") -> Neighbors:
    """``batch_neighbor_list`` on the torch backend: shapes and counts checked, one search for all structures."""
    numpy_out = not _is_torch(positions)
    pos = positions if not numpy_out else torch.as_tensor(np.asarray(positions))
    shape = tuple(cells.shape) if _is_torch(cells) else np.shape(cells)
    if len(shape) != 3 or shape[1:] != (3, 3):
        raise NeighborListError(f"cells: expected shape (B, 3, 3), got {shape}")
    n_structures = shape[0]
    counts = n_atoms.to(pos.device) if _is_torch(n_atoms) else torch.as_tensor(np.asarray(n_atoms), device=pos.device)
    counts = counts.reshape(-1).long()
    if counts.shape[0] != n_structures:
        raise NeighborListError(f"n_atoms: expected {n_structures} entries (one per cell), got {counts.shape[0]}")
    total = int(counts.sum()) if counts.numel() else 0
    if (counts.numel() and bool((counts < 0).any())) or total != pos.shape[0]:
        raise NeighborListError(
            f"n_atoms: expected non-negative counts summing to the {pos.shape[0]} positions, got sum {total}"
        )
    batch = torch.repeat_interleave(torch.arange(n_structures, device=pos.device), counts, output_size=pos.shape[0])
    cells_in = cells if _is_torch(cells) else np.asarray(cells, dtype=np.float64)
    return _torch_neighbors(pos, cells_in, _as_pbc(pbc, n_structures), batch, cutoff, "cells", numpy_out, backend)



# ----------------------------------------------------------------------------- Verlet skin (batched MD)


class SkinNeighborList:
    """A batched neighbor list with a Verlet skin, rebuilt only when it may have gone stale.

    ``nl = SkinNeighborList(cutoff, skin=0.5)``; ``edge_index, shifts = nl(positions, cells, pbc, batch)``
    returns every pair within ``cutoff + skin`` (Å) in ``alflow.graph``'s convention: edge_index (2, E)
    int64 with row 0 = i (centre), row 1 = j, and shifts (E, 3) integer cell shifts in the positions'
    dtype, so D = r_j - r_i + shifts @ cells[batch[i]]. Consumers filter by distance (or use a cutoff
    function that is zero beyond ``cutoff``).

    Rebuild rule, per structure b (cells may change: NPT): with F = cell0⁻¹·cell the deformation since
    the last build and δ the largest displacement of an atom measured in the build cell's frame
    (fractional coordinates now × cell0 − positions then), a pair outside the list has
    |D| ≥ (1 − ‖F − I‖) (cutoff + skin − 2δ); the list is kept while that bound is ≥ cutoff for every
    structure, so no pair within ``cutoff`` is ever missing. Without cell change this is the usual
    "no atom moved more than skin/2". Only the stale structures are searched again (the others keep
    their pairs); any change of the atom set (N, ``batch``, number of structures, ``pbc``, dtype)
    rebuilds everything. The check runs on the device; two booleans are read back together per call
    (a single host sync), plus the search's own syncs on a rebuild.

    Positions must not be wrapped into the cell between calls (a wrapped atom jumps a lattice vector,
    which forces a rebuild). ``batch`` must be sorted (structures contiguous), as everywhere in alflow.
    ``rebuilds`` counts the calls that rebuilt anything, ``structure_rebuilds`` the structures searched
    again; ``reset()`` forgets the list. Edges are grouped by rebuild, not sorted.
    """

    def __init__(self, cutoff: float, skin: float = 0.5, device: Any = None, backend: str | None = None) -> None:
        if torch is None:  # pragma: no cover
            raise NeighborListError("SkinNeighborList needs torch")
        self.cutoff = _check_cutoff(cutoff)
        try:
            skin_value = float(skin)
        except (TypeError, ValueError):
            raise NeighborListError(f"skin: expected a non-negative number in Å, got {skin!r}") from None
        if not np.isfinite(skin_value) or skin_value < 0.0:
            raise NeighborListError(f"skin: expected a non-negative finite number in Å, got {skin!r}")
        self.skin = skin_value
        self.device = torch.device(device) if device is not None else None
        self.backend = backend
        self.rebuilds = 0  # calls that rebuilt anything
        self.structure_rebuilds = 0  # structures searched again, summed over those calls
        self.reset()

    def reset(self) -> None:
        """Forget the current list: the next call rebuilds."""
        self._state: dict[str, Any] | None = None

    # -- the check ---------------------------------------------------------------------------------

    def _stale(self, positions: Any, cells: Any, pbc: Any, batch: Any) -> tuple[Any, Any] | None:
        """None when the atom set changed (full rebuild); else (changed, stale) on the device:
        changed a 0-d bool (batch or pbc differ), stale (B,) per-structure flags."""
        state = self._state
        if state is None:
            return None
        old = state["positions"]
        if (
            positions.shape != old.shape
            or positions.dtype != state["dtype"]
            or positions.device != old.device
            or cells.shape != state["cells"].shape
            or batch.shape != state["batch"].shape
        ):
            return None
        changed = (batch != state["batch"]).any() | (pbc != state["pbc"]).any()
        full = _complete_cells(cells.detach().to(torch.float64), pbc)
        deformation = state["inverse0"] @ full  # F = cell0^-1 cell, (B, 3, 3)
        eye = torch.eye(3, dtype=torch.float64, device=full.device)
        shrink = 1.0 - torch.linalg.norm((deformation - eye).reshape(-1, 9), dim=1)  # <= smallest singular value of F
        # positions now mapped into the build cell's frame, r' = r cell⁻¹ cell0, coordinate by coordinate
        # (per-atom (3, 3) gathers and bmm are several times slower on the CPU)
        to_build = (torch.linalg.inv_ex(full).inverse @ state["full0"]).reshape(-1, 9).index_select(0, batch)
        now = positions.detach().to(torch.float64)
        moved = torch.zeros(now.shape[0], dtype=torch.float64, device=now.device)
        for y in range(3):
            delta = now[:, 0] * to_build[:, y] + now[:, 1] * to_build[:, 3 + y] + now[:, 2] * to_build[:, 6 + y] - old[:, y]
            moved.addcmul_(delta, delta)
        worst = torch.zeros(cells.shape[0], dtype=torch.float64, device=full.device)
        worst = worst.scatter_reduce(0, batch, moved, "amax").sqrt()
        reach = (self.cutoff + self.skin - 2.0 * worst) * shrink
        return changed, ~(shrink > 0) | ~(reach >= self.cutoff)  # NaN (an exploded walker) counts as stale

    # -- the call ------------------------------------------------------------------------------------

    def __call__(self, positions: Any, cells: Any, pbc: Any, batch: Any) -> tuple[Any, Any]:
        """(edge_index (2, E) int64, shifts (E, 3) in the positions' dtype) for pairs within cutoff + skin."""
        device = self.device or positions.device
        positions = positions.to(device)
        cells = cells.to(device).reshape(-1, 3, 3)
        pbc = (pbc if _is_torch(pbc) else torch.as_tensor(np.asarray(pbc))).to(device=device, dtype=torch.bool)
        pbc = pbc.expand(cells.shape[0], 3) if pbc.ndim < 2 else pbc
        batch = batch.to(device=device, dtype=torch.int64)
        if positions.ndim != 2 or positions.shape[1] != 3:
            raise NeighborListError(f"positions: expected shape (N, 3), got {tuple(positions.shape)}")
        if batch.shape != (positions.shape[0],):
            raise NeighborListError(f"batch: expected shape ({positions.shape[0]},) (one index per atom), got {tuple(batch.shape)}")
        check = self._stale(positions, cells, pbc, batch)
        if check is None:
            self._build(positions, cells, pbc, batch)
        else:
            changed, stale = check
            changed, any_stale = torch.stack([changed, stale.any()]).tolist()  # the one host sync per call
            if changed:
                self._build(positions, cells, pbc, batch)
            elif any_stale:
                self._rebuild_some(positions, cells, pbc, batch, stale)
        state = self._state
        assert state is not None
        return state["edge_index"], state["shifts"]

    def _search(self, positions: Any, cells: Any, pbc: Any, counts: Any) -> tuple[Any, Any, Any]:
        nl = batch_neighbor_list(positions.detach(), cells.detach(), pbc, counts, self.cutoff + self.skin, backend=self.backend)
        return tuple(  # type: ignore[return-value]
            (x if _is_torch(x) else torch.from_numpy(np.asarray(x))).to(device=positions.device, dtype=torch.int64)
            for x in (nl.i, nl.j, nl.S)
        )

    def _build(self, positions: Any, cells: Any, pbc: Any, batch: Any) -> None:
        n_structures = cells.shape[0]
        counts = torch.bincount(batch, minlength=n_structures) if batch.numel() else batch.new_zeros(n_structures)
        if batch.numel() and (bool((batch[1:] < batch[:-1]).any()) or int(batch[-1]) >= n_structures):
            raise NeighborListError(
                f"batch: expected sorted structure indices in [0, {n_structures}) (structures contiguous), "
                f"got {batch.tolist()[:20]}"
            )
        i, j, S = self._search(positions, cells, pbc, counts)
        full0 = _complete_cells(cells.detach().to(torch.float64), pbc)
        self._state = {
            "positions": positions.detach().to(torch.float64).clone(),
            "dtype": positions.dtype,
            "cells": cells.detach().clone(),
            "pbc": pbc.clone(),
            "batch": batch.clone(),
            "counts": counts,
            "full0": full0,
            "inverse0": torch.linalg.inv_ex(full0).inverse,
            "edge_index": torch.stack([i, j]),
            "shifts": S.to(positions.dtype),
        }
        self.rebuilds += 1
        self.structure_rebuilds += n_structures

    def _rebuild_some(self, positions: Any, cells: Any, pbc: Any, batch: Any, stale: Any) -> None:
        """Rebuild the stale structures only; the others keep their pairs (independent walkers rarely
        go stale on the same step, so a full rebuild would happen nearly every step in a large batch)."""
        state = self._state
        assert state is not None
        structures = torch.nonzero(stale).squeeze(1)
        atoms = torch.nonzero(stale.index_select(0, batch)).squeeze(1)
        i, j, S = self._search(
            positions.index_select(0, atoms), cells.index_select(0, structures), pbc.index_select(0, structures),
            state["counts"].index_select(0, structures),
        )
        edge_index, shifts = state["edge_index"], state["shifts"]
        keep = torch.nonzero(~stale.index_select(0, batch.index_select(0, edge_index[0]))).squeeze(1)
        state["edge_index"] = torch.cat(
            [edge_index.index_select(1, keep), torch.stack([atoms.index_select(0, i), atoms.index_select(0, j)])], dim=1
        )
        state["shifts"] = torch.cat([shifts.index_select(0, keep), S.to(shifts.dtype)])
        state["positions"][atoms] = positions.detach().index_select(0, atoms).to(torch.float64)
        full = _complete_cells(cells.detach().index_select(0, structures).to(torch.float64), pbc.index_select(0, structures))
        state["full0"][structures] = full
        state["inverse0"][structures] = torch.linalg.inv_ex(full).inverse
        state["cells"][structures] = cells.detach().index_select(0, structures)
        self.rebuilds += 1
        self.structure_rebuilds += int(structures.numel())
