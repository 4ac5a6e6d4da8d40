"""MD walkers through ASE's integrators, scored on the fly by the committee.

A walker is a start structure + an ensemble + a schedule (:class:`WalkerSpec`).
:func:`run_walkers` steps many walkers together: each runs its own ASE integrator
in a thread, and their force calls are gathered into one batched committee call
per step (:class:`~alflow.explore.evaluator.LockstepBatcher`). Every ``stride``
steps a walker writes its frame with the committee scores to its own extxyz
trajectory. A walker stops, with a recorded status and without disturbing the
others, when

- ``UNCERTAIN``: the max force deviation stays above ``upper`` (eV/Å) for
  ``patience`` consecutive steps,
- ``EXPLODED``: forces or energy are not finite, or two atoms come closer than
  ``min_distance`` (Å),
- ``DONE``: it reached its step budget, or ``ERROR`` for anything unexpected.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.md.md import MolecularDynamics
from ase.md.velocitydistribution import Stationary, thermalize_momenta

from alflow import keys
from alflow.ensembles import for_engine as ensembles_for
from alflow.explore.evaluator import LockstepBatcher, ModelEvaluator
from alflow.explore.frames import (  # noqa: F401 - re-exported: the one writer every engine shares
    DONE,
    ERROR,
    EXPLODED,
    UNCERTAIN,
    StopRule,
    Trajectory,
    WalkerResult,
    scored_frame,
    write_results,
)

ENSEMBLES = ensembles_for("ase")  # the one ensemble table: alflow.ensembles


@dataclass
class WalkerSpec:
    """One MD walker. Units: K, GPa, fs, 1/fs."""

    atoms: Atoms
    ensemble: str = "nvt-langevin"
    temperature: float | Sequence[float] = 300.0  # K; a list is a linear ramp over the run
    pressure: float | Sequence[float] | None = None  # GPa, NPT only; a list is a ramp
    timestep: float = 2.0  # fs
    steps: int = 1000
    stride: int = 10  # write (and score) a frame every `stride` steps
    friction: float = 0.01  # 1/fs (Langevin)
    seed: int = 0
    name: str = "walker"
    thermalize: bool = True  # draw Maxwell-Boltzmann momenta at the first temperature; False keeps atoms' momenta

    def __post_init__(self) -> None:
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble: expected one of {', '.join(ENSEMBLES)}, got {self.ensemble!r}")
        if self.ensemble.startswith("npt"):
            if self.pressure is None:
                raise ValueError(f"pressure: required for ensemble {self.ensemble!r} (GPa)")
            if not self.atoms.pbc.all():
                raise ValueError(f"{self.name}: ensemble {self.ensemble!r} needs a 3D-periodic cell, got pbc={self.atoms.pbc.tolist()}")
        if self.steps < 1 or self.stride < 1:
            raise ValueError(f"steps and stride: expected positive integers, got {self.steps}, {self.stride}")

    def records(self, step: int) -> bool:
        """Whether a frame is written after ``step`` (every ``stride`` steps, and the last step)."""
        return step % self.stride == 0 or step >= self.steps


def ramp(value: float | Sequence[float], fraction: float) -> float:
    """Linear interpolation through ``value`` (a number or a list of set points) at ``fraction`` in [0, 1]."""
    if np.ndim(value) == 0:
        return float(value)  # type: ignore[arg-type]
    points = np.asarray(value, dtype=float)
    return float(np.interp(fraction, np.linspace(0.0, 1.0, len(points)), points))


def make_dynamics(atoms: Atoms, spec: WalkerSpec) -> MolecularDynamics:
    """The ASE integrator for ``spec`` (velocities must already be set)."""
    dt = spec.timestep * units.fs
    temperature = ramp(spec.temperature, 0.0)
    rng = np.random.default_rng(spec.seed)
    if spec.ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt)
    if spec.ensemble == "nvt-langevin":
        from ase.md.langevin import Langevin

        return Langevin(atoms, timestep=dt, temperature_K=temperature, friction=spec.friction / units.fs, rng=rng, fixcm=False)
    if spec.ensemble == "nvt-svr":
        from ase.md.bussi import Bussi

        return Bussi(atoms, timestep=dt, temperature_K=temperature, taut=100 * dt, rng=rng)
    if spec.ensemble == "nvt-nose-hoover":
        from ase.md.nose_hoover_chain import NoseHooverChainNVT

        return NoseHooverChainNVT(atoms, timestep=dt, temperature_K=temperature, tdamp=100 * dt)
    from ase.md.nose_hoover_chain import IsotropicMTKNPT, MTKNPT

    cls = IsotropicMTKNPT if spec.ensemble == "npt-iso" else MTKNPT
    pressure = ramp(spec.pressure, 0.0) * units.GPa  # type: ignore[arg-type]
    return cls(atoms, timestep=dt, temperature_K=temperature, pressure_au=pressure, tdamp=100 * dt, pdamp=1000 * dt)


def set_targets(dyn: MolecularDynamics, temperature: float, pressure_gpa: float | None) -> None:
    """Move a running integrator's target temperature (K) and pressure (GPa), for ramps."""
    kT = temperature * units.kB
    if hasattr(dyn, "set_temperature"):  # Langevin
        dyn.set_temperature(temperature_K=temperature)
    elif hasattr(dyn, "target_kinetic_energy"):  # Bussi
        dyn.temp = kT
        dyn.target_kinetic_energy = 0.5 * kT * dyn.ndof
    elif hasattr(dyn, "_thermostat"):  # Nosé–Hoover chains, MTK
        dyn._thermostat._kT = kT
        if hasattr(dyn, "_barostat"):
            dyn._barostat._kT = kT
        dyn._temperature_K = temperature
    if pressure_gpa is not None and hasattr(dyn, "_pressure_au"):
        dyn._pressure_au = pressure_gpa * units.GPa


class LockstepCalculator(Calculator):
    """ASE calculator of one walker; its evaluations are batched with the other walkers'."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, batcher: LockstepBatcher | None = None, evaluator: ModelEvaluator | None = None) -> None:
        super().__init__()
        if (batcher is None) == (evaluator is None):
            raise ValueError("LockstepCalculator: give exactly one of batcher or evaluator")
        self.batcher = batcher
        self.evaluator = evaluator
        self.scores: dict[str, Any] = {}
        # False between recorded frames: the committee spread may be skipped (NaN deviations; a shallow committee)
        self.want_spread = True

    def calculate(self, atoms: Atoms | None = None, properties: Any = None, system_changes: Any = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        spread = self.want_spread
        r = (self.batcher.compute(self.atoms, spread=spread) if self.batcher is not None
             else self.evaluator([self.atoms], spread=spread)[0])
        self.results = {"energy": r["energy"], "free_energy": r["energy"], "forces": r["forces"]}
        if r["stress"] is not None:
            s = r["stress"]
            self.results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        self.scores = r


def check_finite_settings(spec: WalkerSpec) -> str:
    """'' when the walker's numbers are usable, else a message naming the field (NaN/inf temperature, ...)."""
    for name in ("temperature", "pressure", "timestep", "friction"):
        value = getattr(spec, name)
        if value is None:
            continue
        values = np.asarray(value, dtype=float).reshape(-1)
        if values.size == 0 or not np.isfinite(values).all():
            return f"{spec.name}: {name} must be finite, got {value!r}"
    if spec.timestep <= 0:
        return f"{spec.name}: timestep must be > 0 fs, got {spec.timestep!r}"
    if not (np.isfinite(spec.atoms.positions).all() and np.isfinite(spec.atoms.cell.array).all()):
        return f"{spec.name}: start structure has non-finite positions or cell"
    return ""


def run_walker(
    spec: WalkerSpec,
    calc: LockstepCalculator,
    trajectory: Path,
    upper: float,
    patience: int,
    min_distance: float,
    on_step: Callable[[str, float], None] | None = None,
    alpha: float | None = None,
) -> WalkerResult:
    """Run one walker to its end; never raises (a failure is an ``ERROR`` result of this walker only)."""
    start = time.perf_counter()
    atoms = spec.atoms.copy()
    atoms.calc = calc
    traj = Trajectory(trajectory).start()
    rule = StopRule(upper, patience, min_distance)
    status, message, step = DONE, "", 0
    temperature = ramp(spec.temperature, 0.0)
    try:
        bad = check_finite_settings(spec)
        if bad:
            raise ValueError(bad)
        if spec.thermalize:
            thermalize_momenta(atoms, temperature_K=temperature, rng=np.random.default_rng(spec.seed))
            Stationary(atoms)
        dyn = make_dynamics(atoms, spec)
        for step in range(spec.steps + 1):
            # the deviation is read where a frame is recorded (or the walker ends); between those, a shallow
            # committee gives the mean forces at one model's cost (the stop rule carries its last look on)
            calc.want_spread = spec.records(step)
            if step > 0:
                fraction = step / spec.steps
                temperature = ramp(spec.temperature, fraction)
                set_targets(dyn, temperature, None if spec.pressure is None else ramp(spec.pressure, fraction))
                dyn.run(1)
            else:
                atoms.get_forces()
            scores = calc.scores
            status, message = rule.update(scores)
            stop = status != DONE or step == spec.steps
            if spec.records(step) or stop:
                traj.append(scored_frame(atoms, scores, step, spec.name, temperature, alpha=alpha))
            if on_step is not None and step > 0:
                on_step(spec.name, float(scores[keys.MAX_FORCE_DEVIATION]))
            if status != DONE:
                break
    except Exception as exc:  # noqa: BLE001 - one walker's failure must not kill the others
        status, message = ERROR, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
    return WalkerResult(spec.name, status, step, traj.frames, str(trajectory), rule.worst, message, time.perf_counter() - start)


def committee_alpha(model: Any) -> float | None:
    """The calibration factor α of a committee (None for a single potential or a non-committee provider)."""
    alpha = getattr(model, "alpha", None)
    try:
        return None if alpha is None else float(alpha)
    except (TypeError, ValueError):
        return None


def run_walkers(
    specs: Sequence[WalkerSpec],
    model: Any,
    out_dir: str | Path,
    *,
    upper: float = 0.5,
    patience: int = 20,
    min_distance: float = 0.5,
    batched: bool = True,
    device: str | None = "auto",
    progress: bool = True,
) -> list[WalkerResult]:
    """Run every walker; returns one :class:`WalkerResult` each and writes ``walkers.json``.

    ``model`` is a Potential/Committee or a ready :class:`ModelEvaluator`.
    ``batched=True`` steps all walkers together with one model call per step;
    ``batched=False`` runs them one after another (the baseline).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"walker names must be unique, got {names}")
    evaluator = model if isinstance(model, ModelEvaluator) else ModelEvaluator(model, device)
    bar = _progress_bar(sum(s.steps for s in specs), len(specs), progress)
    lock = threading.Lock()
    state = {"worst": 0.0}

    def on_step(name: str, deviation: float) -> None:
        with lock:
            if math.isfinite(deviation):  # NaN between recorded frames (a shallow committee's skipped spread)
                state["worst"] = max(state["worst"], deviation)
            if bar is not None:
                bar.update(1)

    def trajectory(spec: WalkerSpec) -> Path:
        return out_dir / f"{spec.name}.extxyz"

    common = dict(upper=upper, patience=patience, min_distance=min_distance, on_step=on_step,
                  alpha=committee_alpha(evaluator.model))
    results: dict[str, WalkerResult] = {}
    if batched:
        batcher = LockstepBatcher(evaluator)
        for _ in specs:
            batcher.register()

        def target(spec: WalkerSpec) -> None:
            try:
                results[spec.name] = run_walker(spec, LockstepCalculator(batcher=batcher), trajectory(spec), **common)
            finally:
                batcher.retire()
                if bar is not None:
                    with lock:
                        bar.set_postfix(alive=len(specs) - len(results), max_dev=f"{state['worst']:.3f}")

        threads = [threading.Thread(target=target, args=(s,), name=f"walker-{s.name}", daemon=True) for s in specs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for spec in specs:
            results[spec.name] = run_walker(spec, LockstepCalculator(evaluator=evaluator), trajectory(spec), **common)
    if bar is not None:
        bar.close()
    ordered = [results[s.name] for s in specs]
    write_results(out_dir, ordered)
    return ordered


def _progress_bar(total: int, n_walkers: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"MD ({n_walkers} walkers)", unit="step", dynamic_ncols=True)
