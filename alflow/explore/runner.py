"""From a run configuration to scored frames: the system, the walkers, any engine (batched, ase, ipi).

:func:`system_structure` builds or reads the material (``system`` section) and
:func:`explore` runs every walker of the ``exploration`` section through ASE or
i-PI, writing one scored extxyz trajectory per walker in ``out_dir`` — the same
frames and info keys in both engines.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.build import bulk

from alflow.config import RunConfig, SystemConfig, WalkerConfig
from alflow.explore.ase_md import WalkerSpec, run_walkers
from alflow.explore.structures import expand_to_min_width, read_structure, starting_structure


def system_structures(system: SystemConfig) -> list[Atoms]:
    """The configured structures (Å), repeated to ``supercell`` and/or ``min_cell_length``."""
    if system.build is not None:
        b = system.build
        kwargs = {k: v for k, v in dict(crystalstructure=b.crystal, a=b.a, c=b.c, covera=b.covera).items() if v is not None}
        base = [bulk(b.element, cubic=b.cubic, orthorhombic=b.orthorhombic, **kwargs)]
    else:
        base = [read_structure(path) for path in system.structures or []]
    out = []
    for atoms in base:
        if system.supercell is not None:
            atoms = atoms.repeat(system.supercell)
        if system.min_cell_length is not None:
            atoms = expand_to_min_width(atoms, system.min_cell_length)
        out.append(atoms)
    return out


def walker_starts(config: RunConfig, structures: list[Atoms], iteration: int = 0) -> list[tuple[WalkerConfig, Atoms, int, str]]:
    """(walker config, start structure, seed, name) per walker and replica; seeds derive from the run seed,
    iteration and index."""
    starts: list[tuple[WalkerConfig, Atoms, int, str]] = []
    for index, walker in enumerate(config.exploration.walkers):
        for replica in range(walker.replicas):
            seed = walker.seed if walker.seed is not None else config.seed * 100_003 + iteration * 1_009 + len(starts)
            rng = np.random.default_rng(seed)
            base = structures[len(starts) % len(structures)]
            atoms = starting_structure(base, walker.start, rng, rattle_stdev=walker.rattle_stdev, strain=walker.strain,
                                       miller=walker.miller, vacuum=walker.vacuum)
            starts.append((walker, atoms, seed, f"w{index:02d}r{replica:02d}-{walker.ensemble}"))
    return starts


def walker_specs(config: RunConfig, structures: list[Atoms], iteration: int = 0) -> list[WalkerSpec]:
    """ASE walker specs, one per walker and replica (see :func:`walker_starts`)."""
    return [_spec(walker, atoms, seed, name) for walker, atoms, seed, name in walker_starts(config, structures, iteration)]


def _spec(walker: WalkerConfig, atoms: Atoms, seed: int, name: str) -> WalkerSpec:
    return WalkerSpec(atoms=atoms, ensemble=walker.ensemble, temperature=walker.temperature, pressure=walker.pressure,
                      timestep=walker.timestep, steps=walker.steps, stride=walker.stride, friction=walker.friction,
                      seed=seed, name=name)


def explore(config: RunConfig, model_path: str | Path, out_dir: str | Path, *, iteration: int = 0,
            structures: list[Atoms] | None = None, device: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run the configured walkers with the committee in ``model_path``; returns one result dict per walker."""
    out_dir = Path(out_dir)
    structures = structures or system_structures(config.system)
    device = device or config.execution.device
    if config.exploration.engine in ("ase", "batched"):
        import potentials

        specs = walker_specs(config, structures, iteration)
        model = potentials.load(model_path, device=None if device == "auto" else device)
        if getattr(model, "architecture", None) == "mace":  # cuEquivariance kernels on CUDA, where installed
            from alflow.devices import resolve_device
            from potentials.mace import maybe_cueq

            model = maybe_cueq(model, resolve_device(device))
        rules = dict(upper=config.selection.upper, patience=config.exploration.uncertain_patience,
                     min_distance=config.exploration.min_distance, device=device, progress=progress)
        if config.exploration.engine == "batched":
            from alflow.explore.batched import run_batched

            results = run_batched(specs, model, out_dir, **rules)
        else:
            results = run_walkers(specs, model, out_dir, **rules)
        return [asdict(r) for r in results]
    from alflow.explore.ipi import IPIRunSpec, load_alpha, run_ipi_walkers
    from alflow.explore.ipi_driver import StopRules

    alpha = load_alpha(model_path)  # the committee's calibration: i-PI rescales the members by it
    specs = [IPIRunSpec(atoms=atoms, ensemble=walker.ensemble, temperature=walker.temperature, pressure=walker.pressure,
                        timestep=walker.timestep, steps=walker.steps, stride=walker.stride, nbeads=walker.nbeads,
                        friction=walker.friction, seed=seed, alpha=alpha, name=name)
             for walker, atoms, seed, name in walker_starts(config, structures, iteration)]
    rules = StopRules(upper=config.selection.upper, patience=config.exploration.uncertain_patience,
                      min_distance=config.exploration.min_distance)
    # the walkers run concurrently; the limit is what they had one after another (600 s each)
    results = [asdict(r) for r in run_ipi_walkers(specs, model_path, out_dir, rules=rules, device=device,
                                                  wall_seconds=600.0 * max(1, len(specs)))]
    (out_dir / "walkers.json").write_text(json.dumps(results, indent=1))
    return results
