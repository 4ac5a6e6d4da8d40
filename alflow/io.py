"""Frame-level I/O: read structures/labels from files, validate and hash frames, write extxyz atomically.

``read_frames`` reads anything ASE reads (extxyz, ASE db, POSCAR/CONTCAR, CIF,
vasprun.xml, OUTCAR, ...) and falls back to pymatgen (``Structure.from_file``)
when ASE cannot. Calculator results (energy eV, forces eV/Å, stress eV/Å³) found
on a frame become labels: ``info[REF_ENERGY]``, ``arrays[REF_FORCES]``,
``info[REF_STRESS]`` (Voigt xx yy zz yz xz xy, ASE sign convention).
Frames without results come back unlabelled; the caller decides.

``frame_hash``: see ``alflow.data`` for what is hashed and why positions are
first quantised as the extxyz writer prints them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
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

TMP_PREFIX = ".tmp-"
HASH_DECIMALS = 6  # Å


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


def _read_pymatgen(path: Path) -> list[Atoms]:
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    return [AseAtomsAdaptor.get_atoms(Structure.from_file(str(path)))]


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


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_extxyz_atomic(frames: Iterable[Atoms], path: str | os.PathLike) -> int:
    """Write ``frames`` to ``path`` as extxyz atomically: temp file in the same dir, fsync, rename, fsync dir.

    A crash leaves either the old file (or none) plus a stray ``.tmp-*`` file,
    never a partial ``path``. Returns the number of frames written.
    """
    path = Path(path)
    cleaned = [clean_for_write(a) for a in frames]
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-", suffix=".extxyz", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        with os.fdopen(fd, "w") as fh:
            ase.io.write(fh, cleaned, format="extxyz")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
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


def validate_frame(atoms: Atoms, where: str, species: Iterable[int | str] | None = None) -> None:
    """Raise DatasetError (message starts with ``where``) unless ``atoms`` is a usable labelled frame.

    Checks: 1..118 (and ``species``) elements, finite positions and cell,
    finite scalar ``info[REF_ENERGY]`` (eV), finite ``arrays[REF_FORCES]`` of shape
    (N, 3) (eV/Å), and optional finite ``info[REF_STRESS]`` of shape (6,) or (3, 3) (eV/Å³).
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
    if not np.all(np.isfinite(atoms.positions)):
        raise DatasetError(f"{where}: positions contain NaN/inf; expected finite Cartesian positions in Å")
    if not np.all(np.isfinite(np.asarray(atoms.cell))):
        raise DatasetError(f"{where}: cell contains NaN/inf; expected a finite cell in Å")
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
