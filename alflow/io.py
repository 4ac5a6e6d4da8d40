"""Frame-level I/O: read structures/labels from files, validate and hash frames, write extxyz atomically.

``read_frames`` reads anything ASE reads (extxyz, ASE db, POSCAR/CONTCAR, CIF,
vasprun.xml, OUTCAR, ...) and, when ASE cannot, falls back to data-only parsers
chosen by the file name (``FALLBACK_FORMATS``: pymatgen's CIF and POSCAR parsers,
pymatgen JSON read as plain numbers). A structure file is data: reading one never
imports a module or builds an object the file names (no monty decoding). Calculator results (energy eV, forces eV/Å, stress eV/Å³) found
on a frame become labels: ``info[REF_ENERGY]``, ``arrays[REF_FORCES]``,
``info[REF_STRESS]`` (Voigt xx yy zz yz xz xy, ASE sign convention).
Frames without results come back unlabelled; the caller decides.

``frame_hash``: see ``alflow.data`` for what is hashed and why positions are
first quantised as the extxyz writer prints them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols

from alflow.keys import REF_ENERGY, REF_FORCES, REF_STRESS
from alflow.errors import InputError
from alflow.voigt import to_voigt
from alflow.fileio import TMP_PREFIX, atomic_open, fsync_dir  # noqa: F401 - re-exported for alflow.data

HASH_DECIMALS = 6  # Å
MIN_SEPARATION = 0.1  # Å: atoms (or periodic images) closer than this are coincident; no frame has them
MAX_COORDINATE = 1e5  # Å: larger |coordinates| or cell entries are not a structure (vesin 0.6.2's cell list dies
# of SIGFPE on a two-atom frame 5e5 Å long at a 5 Å cutoff, and at 1e5 Å with a 0.1 Å cutoff)
_CELL_LIST_SPAN = 5e3  # Å: frames spanning more than this get the direct search, never vesin's cell list at 0.1 Å
_BRUTE_FORCE_ATOMS = 300  # up to this many atoms the closest pair is found by direct minimum-image search


class DatasetError(InputError):
    """Bad input for a dataset: the message names the file/frame and what was expected."""


def voigt_stress(stress: object) -> np.ndarray:
    """Stress (6,) Voigt or (3, 3) full, eV/Å³ → float64 Voigt (6,), ASE order xx yy zz yz xz xy."""
    arr = np.asarray(stress, dtype=float)
    if arr.shape not in ((6,), (3, 3)):
        raise ValueError(f"stress must have shape (6,) or (3, 3), got {arr.shape}")
    return to_voigt(arr)  # the one Voigt conversion (alflow.voigt)


def labels_from_calc(atoms: Atoms) -> Atoms:
    """Move calculator results (energy/forces/stress) to REF_* labels, in place; drop the calculator.

    Existing REF_* labels win over calculator results. Returns ``atoms``.
    """
    calc = atoms.calc
    results = dict(getattr(calc, "results", None) or {}) if calc is not None else {}
    energy = results.get("energy", results.get("free_energy"))
    if energy is not None and REF_ENERGY not in atoms.info:
        atoms.info[REF_ENERGY] = float(energy)
    if results.get("forces") is not None and REF_FORCES not in atoms.arrays:
        atoms.arrays[REF_FORCES] = np.array(results["forces"], dtype=float)
    if results.get("stress") is not None and REF_STRESS not in atoms.info:
        atoms.info[REF_STRESS] = voigt_stress(results["stress"])
    atoms.calc = None
    return atoms


FALLBACK_FORMATS = "CIF (*.cif, *.mcif), POSCAR/CONTCAR (*.vasp, *.poscar), pymatgen JSON (*.json)"


def _format_of(path: Path) -> str | None:
    """The fallback format of ``path`` from its name (see ``FALLBACK_FORMATS``), or None."""
    name = path.name.lower()
    if name.endswith((".cif", ".mcif")):
        return "cif"
    if name.endswith((".vasp", ".poscar")) or name.startswith(("poscar", "contcar")):
        return "poscar"
    if name.endswith(".json"):
        return "json"
    return None


def _atoms_from_structure_dict(data: Any) -> Atoms:
    """An ``Atoms`` from a pymatgen ``Structure``/``Molecule`` dict, reading numbers only.

    Data only: ``@module``/``@class`` and site ``properties`` are ignored, nothing is imported or
    constructed from what the file names (pymatgen's own ``from_dict`` would decode them with monty).
    """
    if not isinstance(data, dict) or not isinstance(data.get("sites"), list):
        raise ValueError("expected a pymatgen Structure or Molecule dict (with 'sites')")
    lattice = data.get("lattice")
    cell = None
    if lattice is not None:
        if not isinstance(lattice, dict) or "matrix" not in lattice:
            raise ValueError("'lattice' must be a mapping with a 3x3 'matrix' (Å)")
        cell = np.asarray(lattice["matrix"], dtype=float)
        if cell.shape != (3, 3):
            raise ValueError(f"lattice.matrix has shape {cell.shape}; expected (3, 3)")
    numbers, positions = [], []
    for k, site in enumerate(data["sites"]):
        species = site.get("species") if isinstance(site, dict) else None
        if not isinstance(species, list) or len(species) != 1 or not isinstance(species[0], dict):
            raise ValueError(f"sites[{k}]: expected exactly one species (ordered structures only)")
        element, occu = species[0].get("element"), float(species[0].get("occu", 1.0))
        if element not in atomic_numbers or occu != 1.0:
            raise ValueError(f"sites[{k}]: expected an element symbol with occupancy 1, got {element!r} ({occu})")
        if "xyz" in site:
            xyz = np.asarray(site["xyz"], dtype=float)
        elif "abc" in site and cell is not None:
            xyz = np.asarray(site["abc"], dtype=float) @ cell
        else:
            raise ValueError(f"sites[{k}]: expected Cartesian 'xyz' (Å) or fractional 'abc' coordinates")
        if xyz.shape != (3,):
            raise ValueError(f"sites[{k}]: coordinates have shape {xyz.shape}; expected (3,)")
        numbers.append(atomic_numbers[element])
        positions.append(xyz)
    if cell is None:
        return Atoms(numbers=numbers, positions=np.reshape(positions, (-1, 3)), pbc=False)
    pbc = lattice.get("pbc", (True, True, True))
    return Atoms(numbers=numbers, positions=np.reshape(positions, (-1, 3)), cell=cell,
                 pbc=np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)))


def _read_pymatgen(path: Path) -> list[Atoms]:
    """Data-only fallback for files ASE cannot read: pymatgen's CIF and POSCAR parsers chosen by the file's
    name, and pymatgen JSON read as plain data (never monty's decoder, which imports what a file names)."""
    kind = _format_of(path)
    if kind is None:
        raise ValueError(f"no data-only fallback parser for this file name; the fallback reads {FALLBACK_FORMATS}")
    if kind == "json":
        import json

        with open(path) as handle:
            return [_atoms_from_structure_dict(json.load(handle))]
    from pymatgen.io.ase import AseAtomsAdaptor

    if kind == "cif":
        from pymatgen.io.cif import CifParser

        structures = CifParser(str(path)).parse_structures(primitive=False)
    else:
        from pymatgen.io.vasp import Poscar

        structures = [Poscar.from_file(str(path), check_for_potcar=False).structure]
    return [AseAtomsAdaptor.get_atoms(s) for s in structures]


def read_frames(path: str | os.PathLike, index: str | int = ":") -> list[Atoms]:
    """Read frames from ``path`` (ASE first, then pymatgen), converting calculator results to REF_* labels.

    Raises FileNotFoundError when the file is missing and DatasetError (naming the
    file) when neither ASE nor pymatgen can read it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        got = ase.io.read(path, index=index)
        frames = [got] if isinstance(got, Atoms) else list(got)
    except Exception as ase_err:  # noqa: BLE001 - any ASE failure means: try pymatgen
        try:
            frames = _read_pymatgen(path)  # a single structure, whatever the index
        except Exception as pmg_err:  # noqa: BLE001
            raise DatasetError(
                f"{path}: cannot read as a structure file "
                f"(ase: {type(ase_err).__name__}: {ase_err}; pymatgen: {type(pmg_err).__name__}: {pmg_err})"
            ) from pmg_err
    for atoms in frames:
        labels_from_calc(atoms)
        if REF_STRESS in atoms.info:
            try:
                atoms.info[REF_STRESS] = voigt_stress(atoms.info[REF_STRESS])
            except ValueError:
                pass  # left as is; validation reports it with file and frame
    return frames


def clean_for_write(atoms: Atoms) -> Atoms:
    """Copy of ``atoms`` safe for the extxyz writer: no calculator, no constraints, float labels.

    ASE's writer would otherwise write calculator results under other keys
    (``energy``, ``forces``) that readers turn back into a calculator.
    """
    out = atoms.copy()
    out.calc = None
    out.set_constraint()
    if REF_ENERGY in out.info:
        out.info[REF_ENERGY] = float(out.info[REF_ENERGY])
    if REF_FORCES in out.arrays:
        out.arrays[REF_FORCES] = np.asarray(out.arrays[REF_FORCES], dtype=float)
    if REF_STRESS in out.info:
        out.info[REF_STRESS] = voigt_stress(out.info[REF_STRESS])
    return out


def write_extxyz_atomic(frames: Iterable[Atoms], path: str | os.PathLike) -> int:
    """Write ``frames`` to ``path`` as extxyz atomically: temp file in the same dir, fsync, rename, fsync dir.

    A crash leaves either the old file (or none) plus a stray ``.tmp-*`` file,
    never a partial ``path``. Returns the number of frames written.
    """
    path = Path(path)
    cleaned = [clean_for_write(a) for a in frames]
    with atomic_open(path) as handle:  # the user's umask, as every file alflow writes
        ase.io.write(handle, cleaned, format="extxyz")
    return len(cleaned)


def _as_written(values: np.ndarray) -> np.ndarray:
    """Float array quantised exactly as ASE's extxyz writer prints it (``%16.8f``)."""
    flat = np.asarray(values, dtype=float).ravel()
    if flat.size == 0:
        return np.asarray(values, dtype=float).copy()
    text = ("%.8f " * flat.size) % tuple(flat)
    return np.array(text.split(), dtype=float).reshape(np.shape(values))


def frame_hash(atoms: Atoms) -> str:
    """Content hash (hex sha256) of numbers, cell, pbc and unwrapped positions (see module docstring)."""
    h = hashlib.sha256(b"alflow-frame-v1")
    h.update(np.asarray(atoms.numbers, dtype="<i8").tobytes())
    h.update((np.round(np.asarray(atoms.cell, dtype=float), HASH_DECIMALS) + 0.0).astype("<f8").tobytes())
    h.update(np.asarray(atoms.pbc, dtype=np.uint8).tobytes())
    h.update((np.round(_as_written(atoms.positions), HASH_DECIMALS) + 0.0).astype("<f8").tobytes())
    return h.hexdigest()


def _species_numbers(species: Iterable[int | str]) -> frozenset[int]:
    out = set()
    for s in species:
        if isinstance(s, str):
            if s not in atomic_numbers:
                raise ValueError(f"unknown element symbol {s!r} in species")
            out.add(atomic_numbers[s])
        else:
            out.add(int(s))
    return frozenset(out)


def _float_array(value: Any) -> np.ndarray | None:
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None
    return arr


def _closest_pair(atoms: Atoms) -> tuple[int, int, float] | None:
    """(i, j, d) of a pair closer than ``MIN_SEPARATION`` (Å, periodic images included), or None.

    Minimum image through wrapped fractional differences: exact for distances below half of every
    periodic cell height, which ``validate_structure`` ensures (heights >= 2 ``MIN_SEPARATION``).
    Above ``_BRUTE_FORCE_ATOMS`` atoms vesin's cell list is used, unless the frame spans more than
    ``_CELL_LIST_SPAN`` Å (vesin crashes on very sparse frames at this small cutoff).
    """
    n = len(atoms)
    if n < 2:
        return None
    pos = np.asarray(atoms.positions, dtype=float)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    span = float(np.ptp(pos, axis=0).max())
    if n > _BRUTE_FORCE_ATOMS and span <= _CELL_LIST_SPAN and np.abs(atoms.cell.array).max() <= _CELL_LIST_SPAN:
        # vesin's cell list (what alflow.neighbors runs), without importing torch
        import vesin

        i, j, d = vesin.NeighborList(cutoff=MIN_SEPARATION, full_list=False).compute(
            pos, np.asarray(atoms.cell, dtype=float), pbc, quantities="ijd", copy=True)
        keep = i != j
        if not keep.any():
            return None
        k = int(np.argmin(np.where(keep, d, np.inf)))
        return int(min(i[k], j[k])), int(max(i[k], j[k])), float(d[k])
    full = np.asarray(atoms.cell, dtype=float).copy()
    full[~pbc] = 0.0
    if pbc.any() and not pbc.all():  # complete the basis along non-periodic directions (never wrapped)
        q, _ = np.linalg.qr(full[pbc].T, mode="complete")
        for k, i in enumerate(np.flatnonzero(~pbc)):
            full[i] = q[:, int(pbc.sum()) + k]
    elif not pbc.any():
        full = np.eye(3)
    frac = pos @ np.linalg.inv(full)
    best: tuple[int, int, float] | None = None
    chunk = max(1, 2_000_000 // n)
    for a in range(0, n - 1, chunk):
        rows = np.arange(a, min(n - 1, a + chunk))
        df = frac[None, :, :] - frac[rows, None, :]  # (chunk, n, 3)
        df[..., pbc] -= np.round(df[..., pbc])
        vec = df @ full
        d2 = np.einsum("cnk,cnk->cn", vec, vec)
        d2[np.arange(len(rows))[:, None] >= (np.arange(n)[None, :] - a)] = np.inf  # pairs i < j only
        k = int(np.argmin(d2))
        r, j = divmod(k, n)
        if d2[r, j] < MIN_SEPARATION**2 and (best is None or d2[r, j] < best[2] ** 2):
            best = (int(rows[r]), int(j), float(np.sqrt(d2[r, j])))
    return best


def validate_structure(atoms: Atoms, where: str, species: Iterable[int | str] | None = None) -> None:
    """Raise DatasetError (message starts with ``where``) unless ``atoms`` is a structure a dataset can hold.

    Checks: at least one atom, elements 1..118 (and in ``species``), finite positions and cell,
    coordinates and cell entries within ``MAX_COORDINATE`` Å, periodic lattice vectors that are not
    degenerate (zero length, flat or zero volume, or thinner than 2 ``MIN_SEPARATION``), and no two atoms
    (or periodic images) closer than ``MIN_SEPARATION`` Å. Labels are not looked at (``validate_frame``).
    """
    if not isinstance(atoms, Atoms):
        raise DatasetError(f"{where}: expected an ase.Atoms, got {type(atoms).__name__}")
    n = len(atoms)
    if n == 0:
        raise DatasetError(f"{where}: frame has no atoms")
    numbers = np.asarray(atoms.numbers)
    bad = [int(z) for z in numbers if not 1 <= int(z) <= 118]
    if bad:
        raise DatasetError(f"{where}: unknown element (atomic number {bad[0]}); expected atomic numbers 1..118")
    if species is not None:
        allowed = _species_numbers(species)
        extra = sorted(set(int(z) for z in numbers) - allowed)
        if extra:
            names = ", ".join(chemical_symbols[z] for z in extra)
            want = ", ".join(chemical_symbols[z] for z in sorted(allowed))
            raise DatasetError(f"{where}: element(s) {names} not in the dataset's species [{want}]")
    positions = np.asarray(atoms.positions, dtype=float)
    cell = np.asarray(atoms.cell, dtype=float)
    if not np.all(np.isfinite(positions)):
        raise DatasetError(f"{where}: positions contain NaN/inf; expected finite Cartesian positions in Å")
    if not np.all(np.isfinite(cell)):
        raise DatasetError(f"{where}: cell contains NaN/inf; expected a finite cell in Å")
    if np.abs(positions).max() > MAX_COORDINATE:
        i = int(np.argmax(np.abs(positions).max(axis=1)))
        raise DatasetError(f"{where}: atom {i} is at {positions[i].tolist()} Å; expected |coordinates| <= "
                           f"{MAX_COORDINATE:g} Å")
    if np.abs(cell).max() > MAX_COORDINATE:
        raise DatasetError(f"{where}: cell {cell.tolist()} has entries above {MAX_COORDINATE:g} Å")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any():  # the criterion of alflow.neighbors (what training builds graphs with)
        periodic = cell[pbc]
        gram = periodic @ periodic.T
        norms2 = np.diag(gram)
        if norms2.min() <= 1e-16 or np.linalg.det(gram) <= 1e-12 * np.prod(norms2):
            raise DatasetError(f"{where}: flat or zero-volume cell: the periodic lattice vectors "
                               f"{periodic.tolist()} are degenerate (zero length or linearly dependent); "
                               f"expected independent vectors for every periodic direction (pbc={pbc.tolist()})")
        recip = np.linalg.pinv(periodic)  # columns: reciprocal vectors of the periodic lattice (no 2π)
        heights = 1.0 / np.linalg.norm(recip, axis=0)
        if heights.min() < 2 * MIN_SEPARATION:
            raise DatasetError(f"{where}: the cell is {heights.min():.3g} Å thick along a periodic direction "
                               f"(cell {cell.tolist()}, pbc {pbc.tolist()}); expected at least "
                               f"{2 * MIN_SEPARATION:g} Å, or atoms coincide with their own images")
    pair = _closest_pair(atoms)
    if pair is not None:
        i, j, d = pair
        raise DatasetError(f"{where}: atoms {i} ({chemical_symbols[numbers[i]]}) and {j} "
                           f"({chemical_symbols[numbers[j]]}) are {d:.3g} Å apart (periodic images included); "
                           f"expected at least {MIN_SEPARATION:g} Å between atoms")


def validate_frame(atoms: Atoms, where: str, species: Iterable[int | str] | None = None) -> None:
    """Raise DatasetError (message starts with ``where``) unless ``atoms`` is a usable labelled frame.

    Checks: the structure (``validate_structure``: elements, finite and bounded coordinates, a cell
    that is not flat, no coincident atoms), a finite scalar ``info[REF_ENERGY]`` (eV), finite
    ``arrays[REF_FORCES]`` of shape (N, 3) (eV/Å), and optional finite ``info[REF_STRESS]`` of shape
    (6,) or (3, 3) (eV/Å³).
    """
    validate_structure(atoms, where, species)
    n = len(atoms)
    if REF_ENERGY not in atoms.info:
        raise DatasetError(f"{where}: missing info['{REF_ENERGY}']; expected the total energy in eV")
    energy = _float_array(atoms.info[REF_ENERGY])
    if energy is None or energy.shape != () or not np.isfinite(energy):
        raise DatasetError(
            f"{where}: info['{REF_ENERGY}'] = {atoms.info[REF_ENERGY]!r}; expected one finite number (eV)"
        )
    if REF_FORCES not in atoms.arrays:
        raise DatasetError(f"{where}: missing arrays['{REF_FORCES}']; expected forces in eV/Å of shape ({n}, 3)")
    forces = _float_array(atoms.arrays[REF_FORCES])
    if forces is None or forces.shape != (n, 3):
        shape = None if forces is None else forces.shape
        raise DatasetError(f"{where}: arrays['{REF_FORCES}'] has shape {shape}; expected ({n}, 3) in eV/Å")
    if not np.all(np.isfinite(forces)):
        raise DatasetError(f"{where}: arrays['{REF_FORCES}'] contains NaN/inf; expected finite forces in eV/Å")
    if REF_STRESS in atoms.info:
        stress = _float_array(atoms.info[REF_STRESS])
        if stress is None or stress.shape not in ((6,), (3, 3)):
            shape = None if stress is None else stress.shape
            raise DatasetError(
                f"{where}: info['{REF_STRESS}'] has shape {shape}; expected Voigt (6,) or (3, 3) in eV/Å³"
            )
        if not np.all(np.isfinite(stress)):
            raise DatasetError(f"{where}: info['{REF_STRESS}'] contains NaN/inf; expected finite stress in eV/Å³")
