"""The one table of MD ensembles: which engine runs each, and whether it takes a pressure.

Everything else derives from ``ENSEMBLES``: the config literal (``WalkerConfig.ensemble``), the
config check that an engine can run a walker's ensemble, each engine's own list
(``alflow.explore.ase_md.ENSEMBLES``, ``alflow.explore.ipi.IPI_ENSEMBLES``), and
``docs/exploration.md`` (tied to it by a test). Adding an ensemble: one row here, its
integrator in each engine that lists it, and a row in the docs. No heavy imports here
(the config module imports this one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class EnsembleSpec:
    """One ensemble. ``pressure``: ``required`` (GPa, NPT), ``forbidden`` (NVE/NVT) or ``optional``."""

    name: str
    engines: tuple[str, ...]  # engines that can run it: "batched" (device-resident), "ase" (ASE integrators), "ipi"
    pressure: Literal["required", "forbidden", "optional"]
    summary: str


ENGINES = ("batched", "ase", "ipi")
ENSEMBLES: dict[str, EnsembleSpec] = {e.name: e for e in (
    EnsembleSpec("nve", ("batched", "ase", "ipi"), "forbidden", "velocity Verlet"),
    EnsembleSpec("nvt-langevin", ("batched", "ase", "ipi"), "forbidden", "Langevin thermostat (friction in 1/fs)"),
    EnsembleSpec("nvt-svr", ("batched", "ase", "ipi"), "forbidden", "Bussi stochastic velocity rescaling"),
    EnsembleSpec("nvt-nose-hoover", ("batched", "ase"), "forbidden", "Nose-Hoover chain (not in i-PI)"),
    EnsembleSpec("npt-iso", ("batched", "ase", "ipi"), "required", "isotropic barostat (MTK in ASE)"),
    EnsembleSpec("npt-aniso", ("batched", "ase", "ipi"), "required", "anisotropic (full-cell) barostat"),
    EnsembleSpec("pimd", ("ipi",), "optional", "path-integral MD with nbeads beads (i-PI only)"),
)}
NAMES = tuple(ENSEMBLES)


def for_engine(engine: str) -> tuple[str, ...]:
    """The ensembles ``engine`` runs, in table order."""
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    return tuple(name for name, spec in ENSEMBLES.items() if engine in spec.engines)
