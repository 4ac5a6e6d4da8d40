"""``ase.Atoms`` → the batch a potential eats: ``dict[str, torch.Tensor]``.

Keys (see ``alflow.keys``): positions (N, 3) Å, numbers (N,), cell (B, 3, 3) Å
(rows are lattice vectors), pbc (B, 3), edge_index (2, E) with row 0 = i
(centre) and row 1 = j (neighbour), shifts (E, 3) integer cell shifts so that
D = r_j - r_i + shifts @ cell, batch (N,) structure index, n_atoms (B,).
With ``labels=True`` also REF_energy (B,) eV, REF_forces (N, 3) eV/Å,
REF_stress (B, 3, 3) eV/Å³ and stress_mask (B,) — frames without stress get zeros
and mask False.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms

from alflow import keys
from alflow.neighbors import batch_neighbor_list
from alflow.voigt import to_matrix

STRESS_MASK = "stress_mask"


def voigt_to_matrix(stress: np.ndarray) -> np.ndarray:
    """ASE Voigt (xx, yy, zz, yz, xz, xy) → (3, 3); a (3, 3) input is returned as is."""
    s = np.asarray(stress, dtype=float)
    if s.shape not in ((6,), (3, 3)):
        raise ValueError(f"stress: expected 6 Voigt components or a 3x3 matrix, got shape {s.shape}")
    return to_matrix(s)  # the one Voigt conversion (alflow.voigt)


def build_batch(
    positions: np.ndarray | torch.Tensor,
    numbers: np.ndarray | torch.Tensor,
    cells: np.ndarray | torch.Tensor,
    pbc: np.ndarray,
    n_atoms: np.ndarray | Sequence[int],
    cutoff: float,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """A batch from concatenated arrays (what multi-walker MD keeps between steps)."""
    dtype = dtype or torch.get_default_dtype()
    counts = np.asarray(n_atoms, dtype=np.int64).reshape(-1)
    pos = torch.as_tensor(positions, dtype=dtype, device=device)
    cell = torch.as_tensor(cells, dtype=dtype, device=pos.device).reshape(-1, 3, 3)
    pbc_arr = np.asarray(pbc, dtype=bool).reshape(-1, 3) if np.ndim(pbc) else np.full((len(counts), 3), bool(pbc))
    nl = batch_neighbor_list(pos.detach(), cell.detach(), pbc_arr, counts, cutoff)
    count_t = torch.as_tensor(counts, device=pos.device)
    return {
        keys.POSITIONS: pos,
        keys.NUMBERS: torch.as_tensor(numbers, dtype=torch.long, device=pos.device),
        keys.CELL: cell,
        keys.PBC: torch.as_tensor(pbc_arr, device=pos.device),
        keys.EDGE_INDEX: torch.stack([nl.i, nl.j]),
        keys.SHIFTS: nl.S.to(dtype),
        keys.BATCH: torch.repeat_interleave(torch.arange(len(counts), device=pos.device), count_t),
        keys.N_ATOMS: count_t,
    }


def atoms_to_batch(
    frames: Atoms | Sequence[Atoms],
    cutoff: float,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    labels: bool = False,
) -> dict[str, torch.Tensor]:
    """Collate one or many ``ase.Atoms`` into a batch with a periodic neighbor list (cutoff in Å)."""
    frames = [frames] if isinstance(frames, Atoms) else list(frames)
    if not frames:
        raise ValueError("frames: expected at least one structure, got none")
    batch = build_batch(
        np.concatenate([a.positions for a in frames]),
        np.concatenate([a.numbers for a in frames]),
        np.stack([a.cell.array for a in frames]),
        np.stack([a.pbc for a in frames]),
        [len(a) for a in frames],
        cutoff,
        dtype=dtype,
        device=device,
    )
    if any("charge" in a.info for a in frames):  # total charges for charge-aware models (PhysNet, AIMNet2)
        pos = batch[keys.POSITIONS]
        batch[keys.CHARGE] = torch.tensor([float(a.info.get("charge", 0.0)) for a in frames], dtype=pos.dtype, device=pos.device)
    if labels:
        batch.update(label_tensors(frames, batch[keys.POSITIONS].dtype, batch[keys.POSITIONS].device))
    return batch


def label_tensors(frames: Sequence[Atoms], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """REF_energy (B,), REF_forces (N, 3), REF_stress (B, 3, 3) and stress_mask (B,) tensors."""
    energies, forces, stresses, mask = [], [], [], []
    for index, atoms in enumerate(frames):
        if keys.REF_ENERGY not in atoms.info or keys.REF_FORCES not in atoms.arrays:
            raise ValueError(f"frame {index}: expected labels {keys.REF_ENERGY} and {keys.REF_FORCES}")
        energies.append(float(atoms.info[keys.REF_ENERGY]))
        forces.append(np.asarray(atoms.arrays[keys.REF_FORCES], dtype=float))
        stress = atoms.info.get(keys.REF_STRESS)
        mask.append(stress is not None)
        stresses.append(voigt_to_matrix(stress) if stress is not None else np.zeros((3, 3)))
    return {
        keys.REF_ENERGY: torch.tensor(energies, dtype=dtype, device=device),
        keys.REF_FORCES: torch.as_tensor(np.concatenate(forces), dtype=dtype, device=device),
        keys.REF_STRESS: torch.as_tensor(np.stack(stresses), dtype=dtype, device=device),
        STRESS_MASK: torch.tensor(mask, device=device),
    }
