"""What every exploration engine writes: scored frames, walker results, stop rules.

One function builds a scored frame (:func:`scored_frame`), one appends it to a
walker's extxyz trajectory (:class:`Trajectory`), one writes ``walkers.json``
(:func:`write_results`), and one class applies the stop rules (:class:`StopRule`),
whatever the engine (ASE threads, the batched device engine, i-PI), so that the
frames, their info keys and the statuses are the same everywhere.

Statuses: ``DONE`` (step budget reached), ``UNCERTAIN`` (max force deviation above
``upper`` eV/Å for ``patience`` consecutive steps), ``EXPLODED`` (non-finite or
huge forces, or two atoms closer than ``min_distance`` Å), ``ERROR`` (anything
unexpected; the message says what).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import write

from alflow import keys

DONE, UNCERTAIN, EXPLODED, ERROR = "DONE", "UNCERTAIN", "EXPLODED", "ERROR"
STATUSES = (DONE, UNCERTAIN, EXPLODED, ERROR)
TEMPERATURE_K = "temperature_K"  # info: the walker's target temperature at that step (K)
ALPHA = "committee_alpha"  # info: the committee calibration factor the scores were computed with
MAX_FORCE = 1.0e3  # eV/Å: a force component beyond this means the walker exploded


@dataclass(frozen=True)
class WalkerResult:
    """What a walker did: JSON-serialisable (``asdict``). ``steps`` is the last step reached."""

    name: str
    status: str
    steps: int
    frames: int
    trajectory: str
    max_force_deviation: float  # largest seen (eV/Å)
    message: str = ""
    seconds: float = 0.0


def scored_frame(
    atoms: Atoms,
    scores: Mapping[str, Any],
    step: int,
    walker: str,
    temperature: float,
    *,
    alpha: float | None = None,
    source: str = "md",
) -> Atoms:
    """A copy of ``atoms`` (positions Å, cell, momenta) carrying the committee's prediction and uncertainty.

    ``scores``: ``energy`` (eV), ``forces`` (N, 3) eV/Å, ``force_deviation`` (N,) eV/Å,
    ``max_force_deviation`` (eV/Å), ``energy_deviation_per_atom`` (eV/atom).
    """
    frame = atoms.copy()
    frame.calc = None
    frame.info.update({
        keys.MAX_FORCE_DEVIATION: float(scores[keys.MAX_FORCE_DEVIATION]),
        keys.ENERGY_DEVIATION_PER_ATOM: float(scores[keys.ENERGY_DEVIATION_PER_ATOM]),
        keys.PRED_ENERGY: float(scores["energy"]),
        keys.STEP: int(step),
        keys.WALKER: str(walker),
        keys.SOURCE: source,
        TEMPERATURE_K: float(temperature),
    })
    if alpha is not None:
        frame.info[ALPHA] = float(alpha)
    frame.arrays[keys.PRED_FORCES] = np.asarray(scores["forces"], dtype=float).reshape(len(atoms), 3)
    frame.arrays[keys.FORCE_DEVIATION] = np.asarray(scores["force_deviation"], dtype=float).reshape(len(atoms))
    return frame


class Trajectory:
    """A walker's scored extxyz trajectory; :meth:`start` truncates it, :meth:`append` adds a frame."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.frames = 0

    def start(self) -> Trajectory:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self.frames = 0
        return self

    def append(self, frame: Atoms) -> None:
        write(self.path, frame, format="extxyz", append=True)
        self.frames += 1


def write_results(out_dir: str | Path, results: Sequence[WalkerResult]) -> Path:
    """``out_dir/walkers.json``: one record per walker, in order."""
    path = Path(out_dir) / "walkers.json"
    path.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return path


def exploded_message(*, finite: bool = True, max_force: float = 0.0, min_distance: float = math.inf,
                     limit_distance: float = 0.0, limit_force: float = MAX_FORCE) -> str:
    """The EXPLODED message for the reason found (first of: non-finite, huge force, atoms too close)."""
    if not finite:
        return "non-finite positions, energy or forces"
    if max_force > limit_force:
        return f"force component {max_force:.3g} eV/Å (> {limit_force:g} eV/Å)"
    return f"atoms {min_distance:.3f} Å apart (< {limit_distance} Å)"


def uncertain_message(upper: float, above: int) -> str:
    return f"max force deviation above {upper} eV/Å for {above} steps"


class StopRule:
    """The per-walker stop rules, applied step by step from the committee's scores.

    ``update(scores)`` returns ``(status, message)``: ``DONE`` while the walker may go on.
    """

    def __init__(self, upper: float, patience: int, min_distance: float, max_force: float = MAX_FORCE) -> None:
        self.upper, self.patience, self.min_distance, self.max_force = float(upper), int(patience), float(min_distance), float(max_force)
        self.above = 0
        self.worst = 0.0

    def update(self, scores: Mapping[str, Any]) -> tuple[str, str]:
        deviation = float(scores[keys.MAX_FORCE_DEVIATION])
        if math.isfinite(deviation):
            self.worst = max(self.worst, deviation)
        forces = np.asarray(scores["forces"], dtype=float)
        finite = bool(np.isfinite(float(scores["energy"])) and np.isfinite(forces).all())
        biggest = float(np.abs(forces).max()) if finite and forces.size else 0.0
        distance = float(scores.get("min_distance", math.inf))
        if not finite or biggest > self.max_force or distance < self.min_distance:
            return EXPLODED, exploded_message(finite=finite, max_force=biggest, min_distance=distance,
                                              limit_distance=self.min_distance, limit_force=self.max_force)
        # NaN deviation: no spread this step (a shallow committee between recorded frames); a run above
        # ``upper`` at the last look counts on until the next look says otherwise (as the batched engine)
        seen = deviation > self.upper if math.isfinite(deviation) else self.above > 0
        self.above = self.above + 1 if seen else 0
        if self.above >= self.patience:
            return UNCERTAIN, uncertain_message(self.upper, self.above)
        return DONE, ""
