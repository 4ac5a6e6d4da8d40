"""Starting structures for walkers: read, expand, and make the places a bulk dataset misses.

Vacancies, interstitials and slabs come from pymatgen; strain, shear and rattle are
applied here. Every function returns a new ``ase.Atoms`` (Å) and never mutates its input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read


def read_structure(path: str | Path) -> Atoms:
    """The (last) structure in any file ASE reads (CIF, POSCAR, extxyz, ...), else via pymatgen."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such structure file")
    try:
        return read(path, index=-1)
    except Exception as ase_error:  # noqa: BLE001 - fall back to pymatgen's readers
        try:
            from pymatgen.core import Structure
            from pymatgen.io.ase import AseAtomsAdaptor

            return AseAtomsAdaptor.get_atoms(Structure.from_file(str(path)))
        except Exception as pmg_error:  # noqa: BLE001
            raise ValueError(f"{path}: neither ASE ({ase_error}) nor pymatgen ({pmg_error}) could read it") from None


def perpendicular_widths(cell: np.ndarray) -> np.ndarray:
    """Distances between opposite faces of the cell (Å)."""
    volume = abs(np.linalg.det(cell))
    return np.array([volume / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)])


def expand_to_min_width(atoms: Atoms, min_width: float) -> Atoms:
    """Repeat periodic directions until every perpendicular width is ≥ ``min_width`` (Å)."""
    widths = perpendicular_widths(atoms.cell.array)
    reps = [int(np.ceil(min_width / w)) if p else 1 for w, p in zip(widths, atoms.pbc)]
    return atoms.repeat(reps)


def strained(atoms: Atoms, strain: np.ndarray | float) -> Atoms:
    """Apply a strain tensor ε (3x3, or a scalar for isotropic) to cell and positions."""
    eps = np.eye(3) * strain if np.ndim(strain) == 0 else np.asarray(strain, dtype=float)
    eps = 0.5 * (eps + eps.T)
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    return out


def random_strain(atoms: Atoms, magnitude: float, rng: np.random.Generator) -> Atoms:
    """A random symmetric strain with components uniform in ±``magnitude`` (includes shear)."""
    return strained(atoms, rng.uniform(-magnitude, magnitude, (3, 3)))


def rattled(atoms: Atoms, stdev: float, rng: np.random.Generator) -> Atoms:
    """Gaussian displacements of standard deviation ``stdev`` (Å) per Cartesian component."""
    out = atoms.copy()
    out.positions = atoms.positions + rng.normal(0.0, stdev, atoms.positions.shape)
    return out


def vacancy(atoms: Atoms, rng: np.random.Generator) -> Atoms:
    """Remove one symmetry-distinct site (pymatgen's VacancyGenerator when available, else a random atom)."""
    from pymatgen.io.ase import AseAtomsAdaptor

    structure = AseAtomsAdaptor.get_structure(atoms)
    try:
        from pymatgen.analysis.defects.generators import VacancyGenerator

        defects = list(VacancyGenerator().generate(structure))
        site = defects[int(rng.integers(len(defects)))].site
        index = int(np.argmin(structure.lattice.get_all_distances(site.frac_coords, structure.frac_coords)))
    except ImportError:
        from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

        equivalent = SpacegroupAnalyzer(structure).get_symmetrized_structure().equivalent_indices
        index = int(equivalent[int(rng.integers(len(equivalent)))][0])
    out = atoms.copy()
    del out[index]
    return out


def interstitial(atoms: Atoms, rng: np.random.Generator, element: str | None = None) -> Atoms:
    """Insert one atom at the largest empty site (a Voronoi-like search on a grid; pymatgen-free)."""
    element = element or atoms.get_chemical_symbols()[int(rng.integers(len(atoms)))]
    from ase.geometry import get_distances

    grid = np.stack(np.meshgrid(*(np.linspace(0, 1, 12, endpoint=False),) * 3, indexing="ij"), -1).reshape(-1, 3)
    cart = grid @ atoms.cell.array
    _, distances = get_distances(cart, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)  # minimum image
    nearest = distances.min(axis=1)
    best = np.flatnonzero(nearest == nearest.max())
    out = atoms.copy()
    out.append(element)
    out.positions[-1] = cart[best[int(rng.integers(len(best)))]]
    return out


def slab(atoms: Atoms, miller: tuple[int, int, int], vacuum: float = 10.0, min_thickness: float = 8.0) -> Atoms:
    """A slab cut along ``miller`` with ``vacuum`` Å on both sides (pymatgen's SlabGenerator), periodic in-plane."""
    from pymatgen.core.surface import SlabGenerator
    from pymatgen.io.ase import AseAtomsAdaptor

    structure = AseAtomsAdaptor.get_structure(atoms)
    generator = SlabGenerator(structure, tuple(miller), min_slab_size=min_thickness, min_vacuum_size=vacuum,
                              center_slab=True, in_unit_planes=False, primitive=True)
    slabs = generator.get_slabs()
    if not slabs:
        raise ValueError(f"miller: no slab could be cut along {miller}")
    out = AseAtomsAdaptor.get_atoms(slabs[0].get_orthogonal_c_slab())
    out.pbc = [True, True, False]
    return out


def starting_structure(
    atoms: Atoms,
    start: str,
    rng: np.random.Generator,
    *,
    rattle_stdev: float = 0.05,
    strain: float = 0.03,
    miller: tuple[int, int, int] = (1, 1, 1),
    vacuum: float = 10.0,
) -> Atoms:
    """The walker's first structure, by ``start``: relaxed, rattled, strained, vacancy, interstitial, surface."""
    if start == "relaxed":
        return atoms.copy()
    if start == "rattled":
        return rattled(atoms, rattle_stdev, rng)
    if start == "strained":
        return random_strain(atoms, strain, rng)
    if start == "vacancy":
        return vacancy(atoms, rng)
    if start == "interstitial":
        return interstitial(atoms, rng)
    if start == "surface":  # in-plane as wide as the bulk cell
        return expand_to_min_width(slab(atoms, miller, vacuum), float(perpendicular_widths(atoms.cell.array).min()))
    raise ValueError(f"start: expected relaxed|rattled|strained|vacancy|interstitial|surface, got {start!r}")
