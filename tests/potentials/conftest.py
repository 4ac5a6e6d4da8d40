"""Fixtures for the potential tests: small randomly initialised models and periodic Cu–Ni cells."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

import potentials
from potentials.base import Potential

# small models per architecture, so that every contract test stays fast; unlisted ones get their defaults
SMALL_HPARAMS: dict[str, dict] = {
    "schnet": {"n_atom_basis": 16, "n_filters": 16, "n_interactions": 2, "n_rbf": 8},
    "painn": {"n_atom_basis": 16, "n_interactions": 2, "n_rbf": 8},
    # the MACE adapter's own small test model (tests/potentials/test_mace.py)
    "mace": {"hidden_irreps": "8x0e + 8x1o", "max_ell": 2, "correlation": 2, "num_interactions": 2,
             "num_radial_basis": 4, "radial_MLP": [16], "MLP_irreps": "4x0e"},
    "dtnn": {"n_atom_basis": 16, "n_factors": 16, "n_interactions": 2, "n_rbf": 10},
    "physnet": {"n_atom_basis": 16, "n_modules": 2, "n_residual_atomic": 1, "n_residual_interaction": 1,
                "n_residual_output": 1, "n_rbf": 8},
    "ani": {"n_radial": 8, "n_angular": 4, "n_angle_sections": 4, "hidden": [16, 8]},
    "dimenetpp": {"hidden_channels": 16, "out_emb_channels": 16, "num_blocks": 2, "int_emb_size": 8,
                  "basis_emb_size": 4, "num_spherical": 3, "num_radial": 4, "num_output_layers": 1},
    "tensornet": {"hidden_channels": 8, "num_layers": 2, "num_rbf": 8},
    "aimnet2": {"n_features": 8, "n_rbf": 6, "n_vector": 4, "hidden": [32], "aim_size": 16},
    "sake": {"hidden_features": 16, "n_layers": 2, "n_heads": 2, "n_rbf": 8},
}
SPECIES = ("Cu", "Ni")
CUTOFF = 4.0  # Å: first two fcc shells; larger than the 3.6 Å cubic cell, so many periodic images


def build_small(
    name: str,
    *,
    cutoff: float = CUTOFF,
    species: tuple[str, ...] = SPECIES,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    perturb: float = 0.1,
) -> Potential:
    """A small model of architecture ``name`` with every parameter perturbed, in eval mode.

    Each tensor gets Gaussian noise of ``perturb`` times its own standard deviation
    (``perturb`` itself for constant tensors such as zero-initialised biases), so that
    outputs depend clearly on species and geometry — a test cannot pass with a
    near-constant model — while their scale stays that of the initialisation.
    An architecture whose optional dependency is missing is skipped with the reason.
    Built once per argument set (some architectures take seconds to build); each call returns a copy.
    """
    key = (name, cutoff, tuple(species), dtype, seed, perturb)
    if key not in _BUILT:
        try:
            _BUILT[key] = _build_small(name, cutoff, species, dtype, seed, perturb)
        except ImportError as exc:
            _BUILT[key] = f"architecture {name!r} cannot be built here: {type(exc).__name__}: {exc}"
    built = _BUILT[key]
    if isinstance(built, str):
        pytest.skip(built)
    return copy.deepcopy(built)


_BUILT: dict[tuple, Potential | str] = {}


def _build_small(
    name: str, cutoff: float, species: tuple[str, ...], dtype: torch.dtype, seed: int, perturb: float
) -> Potential:
    torch.manual_seed(seed)
    model = potentials.build(name, list(species), cutoff, **SMALL_HPARAMS.get(name, {}))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() > 0:
                std = float(p.std()) if p.numel() > 1 else 0.0
                noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                p.add_(perturb * (std if std > 0 else 1.0) * noise)
    return model.to(dtype).eval()


@pytest.fixture(params=potentials.available())
def arch(request: pytest.FixtureRequest) -> str:
    """Each registered architecture name in turn."""
    return request.param


@pytest.fixture
def make_model(arch: str) -> Callable[..., Potential]:
    """Factory: ``make_model(cutoff=..., dtype=..., seed=...)`` builds a small model of the current architecture."""
    return lambda **kwargs: build_small(arch, **kwargs)


@pytest.fixture
def model(make_model: Callable[..., Potential]) -> Potential:
    """A small float64 model of the current architecture (species Cu, Ni; cutoff 4 Å)."""
    return make_model()


def cu_ni_crystal(a: float = 3.6) -> Atoms:
    """A perfect L1_2 Cu3Ni crystal: 4-atom cubic fcc cell, edge ``a`` Å (smaller than the cutoff)."""
    atoms = bulk("Cu", "fcc", a=a, cubic=True)
    atoms.numbers[0] = 28
    return atoms


def cu_ni_rattled(seed: int = 0) -> Atoms:
    """A sheared, rattled 4-atom Cu2Ni2 cell: no symmetry left, two species."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.numbers[[1, 3]] = 28
    cell = atoms.cell.array.copy()
    cell[0] += 0.25 * cell[1] - 0.1 * cell[2]
    cell[2] += 0.15 * cell[0]
    atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(stdev=0.08, seed=seed)
    return atoms


@pytest.fixture
def cu_ni() -> Atoms:
    """Rattled, sheared periodic Cu2Ni2 cell (see :func:`cu_ni_rattled`)."""
    return cu_ni_rattled()


@pytest.fixture
def three_structures() -> list[Atoms]:
    """Three different periodic structures: rattled Cu2Ni2, 1-atom fcc Ni, a rattled 8-atom Cu6Ni2 cell."""
    small = bulk("Ni", "fcc", a=3.52)
    big = cu_ni_crystal(a=3.65).repeat((1, 1, 2))
    big.rattle(stdev=0.06, seed=7)
    return [cu_ni_rattled(seed=3), small, big]


@pytest.fixture
def cu3ni() -> Atoms:
    """Perfect L1_2 Cu3Ni crystal (see :func:`cu_ni_crystal`)."""
    return cu_ni_crystal()


@pytest.fixture
def rotation() -> np.ndarray:
    """A random proper rotation matrix (det +1), fixed seed."""
    q, r = np.linalg.qr(np.random.default_rng(42).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def emt_training_batch(n_frames: int = 20, seed: int = 0, cutoff: float = 4.0) -> dict[str, torch.Tensor]:
    """A float64 labelled batch of rattled, strained 4-atom Cu cells with EMT energies and forces."""
    import numpy as np
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from alflow import keys
    from alflow.graph import atoms_to_batch

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_frames):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.02 * rng.normal(size=(3, 3))), scale_atoms=True)
        atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        atoms.info[keys.REF_ENERGY] = atoms.get_potential_energy()
        atoms.arrays[keys.REF_FORCES] = atoms.get_forces()
        frames.append(atoms)
    return atoms_to_batch(frames, cutoff, dtype=torch.float64, labels=True)


def force_training_losses(model: Potential, batch: dict[str, torch.Tensor], steps: int = 40, lr: float = 3e-3) -> tuple[list[float], float]:
    """Adam on the force MSE for ``steps`` steps: (loss per step, loss of predicting zero force)."""
    from alflow import keys

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = ((model(batch)[keys.FORCES] - batch[keys.REF_FORCES]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, float((batch[keys.REF_FORCES] ** 2).mean())
