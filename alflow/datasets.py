"""Reference datasets generated on the fly with a real (cheap) calculator.

``cu_emt_dataset`` is the benchmark set of the issue: fcc Cu (a = 3.61 Å) in
periodic cubic supercells of 32 (2×2×2) and 108 (3×3×3) atoms, some strained,
run with Langevin MD under ASE's EMT (Jacobsen, Stoltze, Nørskov, Surf. Sci. 366,
394 (1996)) at temperatures spread over 300–1500 K, and sampled every
``sample_every`` steps after ``equilibration`` steps. Each frame carries
``info[REF_energy]`` (eV), ``arrays[REF_forces]`` (eV/Å) and ``info[REF_stress]``
(eV/Å³, Voigt, ASE sign), as ``alflow.io`` stores labels.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, thermalize_momenta

from alflow.keys import LABELLER, REF_ENERGY, REF_FORCES, REF_STRESS, SOURCE, STEP

CU_LATTICE = 3.61  # Å, fcc Cu
DATASET_KEY = "dataset_key"  # info field: hash of the generator parameters (cache check)
_SIZE_REPEATS = {4 * n**3: n for n in range(1, 7)}  # atoms in a cubic fcc supercell -> repetition


def _strain_matrix(rng: np.random.Generator, strain: float) -> np.ndarray:
    """1 + ε with ε symmetric, entries uniform in [-strain, strain] (dimensionless)."""
    eps = rng.uniform(-strain, strain, size=(3, 3))
    return np.eye(3) + 0.5 * (eps + eps.T)


def _label(atoms: Atoms, **info: object) -> Atoms:
    """A calculator-free copy of ``atoms`` carrying the EMT energy, forces and stress as REF_* labels."""
    frame = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell.array, pbc=atoms.pbc)
    frame.info[REF_ENERGY] = float(atoms.get_potential_energy())
    frame.arrays[REF_FORCES] = np.array(atoms.get_forces(), dtype=float)
    frame.info[REF_STRESS] = np.array(atoms.get_stress(voigt=True), dtype=float)
    frame.info.update(info)
    return frame


def _key(params: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _read_cache(path: Path, key: str, n_frames: int) -> list[Atoms] | None:
    from alflow.io import read_frames

    try:
        frames = read_frames(path)
    except Exception:  # noqa: BLE001 - an unreadable cache is regenerated
        return None
    if len(frames) != n_frames or any(a.info.get(DATASET_KEY) != key for a in frames):
        return None
    return frames


def cu_emt_dataset(
    n_frames: int = 500,
    seed: int = 0,
    temperatures: tuple[float, float] = (300.0, 1500.0),
    sizes: Sequence[int] = (32, 108),
    strain: float = 0.03,
    *,
    path: str | os.PathLike | None = None,
    frames_per_run: int = 20,
    sample_every: int = 20,
    equilibration: int = 60,
    timestep_fs: float = 4.0,
    friction: float = 0.02,
    strained_fraction: float = 0.5,
) -> list[Atoms]:
    """``n_frames`` labelled Cu frames from Langevin MD with EMT; deterministic given the arguments.

    The frames come from ``ceil(n_frames / frames_per_run)`` independent MD runs. Run r
    uses the supercell ``sizes[r % len(sizes)]`` atoms (a cubic fcc supercell: 32, 108,
    256, ...), a temperature from a shuffled even grid over ``temperatures`` (K), and
    with probability ``strained_fraction`` a random symmetric strain with entries
    up to ±``strain``. Each run equilibrates ``equilibration`` steps of
    ``timestep_fs`` fs (friction ``friction`` 1/fs), then records a frame every
    ``sample_every`` steps. ``info`` also holds ``temperature_K``, ``run`` and ``step``.

    With ``path``, frames are read from that extxyz file when it was written with
    the same arguments, else generated and written there atomically.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames: expected a positive number of frames, got {n_frames}")
    if not sizes or any(int(s) not in _SIZE_REPEATS for s in sizes):
        raise ValueError(f"sizes: each must be atoms in a cubic fcc supercell ({sorted(_SIZE_REPEATS)}), got {list(sizes)}")
    t_low, t_high = (float(t) for t in temperatures)
    if not 0 < t_low <= t_high:
        raise ValueError(f"temperatures: expected (low, high) with 0 < low <= high in K, got {temperatures}")
    if not 0 <= strain < 0.5:
        raise ValueError(f"strain: expected a fraction in [0, 0.5), got {strain}")
    if frames_per_run < 1 or sample_every < 1 or equilibration < 0:
        raise ValueError("frames_per_run and sample_every must be >= 1 and equilibration >= 0")

    params = dict(n_frames=n_frames, seed=seed, temperatures=[t_low, t_high], sizes=[int(s) for s in sizes],
                  strain=strain, frames_per_run=frames_per_run, sample_every=sample_every,
                  equilibration=equilibration, timestep_fs=timestep_fs, friction=friction,
                  strained_fraction=strained_fraction, lattice=CU_LATTICE)
    key = _key(params)
    if path is not None and Path(path).is_file():
        cached = _read_cache(Path(path), key, n_frames)
        if cached is not None:
            return cached

    n_runs = -(-n_frames // frames_per_run)
    rng = np.random.default_rng(seed)
    temps = np.linspace(t_low, t_high, n_runs)[rng.permutation(n_runs)]
    frames: list[Atoms] = []
    for run in range(n_runs):
        run_rng = np.random.default_rng([seed, run])
        n = int(sizes[run % len(sizes)])
        atoms = bulk("Cu", "fcc", a=CU_LATTICE, cubic=True).repeat(_SIZE_REPEATS[n])
        applied = 0.0
        if run_rng.random() < strained_fraction and strain > 0:
            m = _strain_matrix(run_rng, strain)
            atoms.set_cell(atoms.cell.array @ m, scale_atoms=True)
            applied = float(np.abs(m - np.eye(3)).max())
        atoms.calc = EMT()
        temp = float(temps[run])
        thermalize_momenta(atoms, temp, rng=run_rng)
        Stationary(atoms)
        atoms.set_constraint(FixCom())
        dyn = Langevin(atoms, timestep_fs * units.fs, temperature_K=temp, friction=friction / units.fs,
                       fixcm=False, rng=run_rng)
        dyn.run(equilibration)
        take = min(frames_per_run, n_frames - len(frames))
        for k in range(take):
            dyn.run(sample_every)
            frames.append(_label(atoms, **{SOURCE: "md", LABELLER: "emt", STEP: equilibration + (k + 1) * sample_every,
                                           "run": run, "temperature_K": temp, "max_strain": applied, DATASET_KEY: key}))
    if path is not None:
        from alflow.io import write_extxyz_atomic

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_extxyz_atomic(frames, path)
    return frames
