"""Typed stage results: what each stage of the loop produces, and what ``loop``, ``report`` and the CLI read.

One frozen dataclass per stage, in the stage table ``RESULTS`` (stage name -> class; its order is the
loop's stage order, ``STAGES``). A stage computation (``alflow.stages``) builds one and returns
``to_dict()``, a small JSON-serialisable dict, because that is what crosses process and Prefect/Dask
boundaries and what ``state.json`` stores (keys = field names, so state files keep their layout).
Readers turn a stored dict back with ``Stage.from_dict(d)``: keys it does not know (``worker``, added
by the Prefect task) are kept out of the fields, missing ones (older state files) take the defaults.

Units: seconds (s), energies eV/atom, forces eV/Å as in ``alflow.metrics``; paths are relative to
the run directory (``LoopRun.path`` makes them absolute).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypedDict, TypeVar

T = TypeVar("T", bound="StageResult")


@dataclass(frozen=True)
class StageResult:
    """Common to every stage: wall time of the computation (s) and where it ran (``host:pid``, Prefect tasks)."""

    stage: ClassVar[str] = ""
    seconds: float = 0.0
    worker: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict ``state.json`` stores (``worker`` only when set)."""
        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if out.get("worker") is None:
            out.pop("worker", None)
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | StageResult) -> T:
        """Back from a stored dict (unknown keys ignored, missing keys default)."""
        return _from_dict(cls, data)


def _from_dict(cls: type[Any], data: Any) -> Any:
    """``cls`` from a stored dict: known keys only, lists back to tuples (records where a field says ``of``)."""
    if isinstance(data, cls):
        return data
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(data).items() if k in known}
    for name, value in values.items():
        record = known[name].metadata.get("of")
        if isinstance(value, (list, tuple)):
            values[name] = tuple(record.from_dict(v) for v in value) if record is not None else tuple(value)
    return cls(**values)


def _jsonable(value: Any) -> Any:
    if isinstance(value, StageResult) or isinstance(value, WalkerRecord):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class WalkerRecord:
    """One explored walker: status (DONE, UNCERTAIN, EXPLODED, ERROR, ...), steps run, frames written (s, eV/Å)."""

    name: str
    status: str
    steps: int = 0
    frames: int = 0
    trajectory: str = ""
    max_force_deviation: float | None = None
    message: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | WalkerRecord) -> WalkerRecord:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class Initial(StageResult):
    """The first dataset: frames imported from ``system.initial_dataset``, rattled frames labelled."""

    stage: ClassVar[str] = "initial"
    n_imported: int = 0
    n_rattled: int = 0
    n_labelled: int = 0
    n_failed: int = 0
    dataset_size: int = 0
    species: tuple[int, ...] = ()
    elements: tuple[str, ...] = ()


@dataclass(frozen=True)
class Trained(StageResult):
    """One iteration's committee: its file, the split, α and the errors per split (eV/atom, eV/Å, eV/Å³)."""

    stage: ClassVar[str] = "train"
    committee: str = ""
    n_frames: int = 0
    n_train: int = 0
    n_valid: int = 0
    n_test: int = 0
    alpha: float = 1.0
    calibration_note: str | None = None
    warm_start: bool = False
    train_seconds: float = 0.0  # of ``seconds``, the training itself
    train_epochs: int | None = None  # epochs summed over the members
    members_mode: str | None = None  # how the members were trained (alflow.train: grouped, sequential)
    valid: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)
    members: tuple[dict[str, Any], ...] = ()
    calibration: dict[str, Any] = field(default_factory=dict)  # the fit (alflow.calibration): map, data, metrics


@dataclass(frozen=True)
class Gated(StageResult):
    """The physics gates of one iteration (``alflow.gates``): each gate's result dict (``GateResult.to_dict``),
    whether all held, and the oracle labels the gates bought in this stage (paid once: the same structures
    every iteration, so later iterations find them in the dataset)."""

    stage: ClassVar[str] = "gate"
    gates: tuple[dict[str, Any], ...] = ()
    passed: bool = False
    n_frames: int = 0  # gate structures, all gates
    n_labelled: int = 0  # new oracle labels in this stage (counted in the budget, kept in the dataset)
    n_failed: int = 0
    dataset_size: int = 0
    refine: str | None = None  # extxyz of unlabelled frames near the failing gates' structures (loop.gates.refine)


@dataclass(frozen=True)
class Explored(StageResult):
    """Every walker of one iteration and the count of each status."""

    stage: ClassVar[str] = "explore"
    walkers: tuple[WalkerRecord, ...] = field(default=(), metadata={"of": WalkerRecord})
    statuses: dict[str, int] = field(default_factory=dict)
    n_frames: int = 0


@dataclass(frozen=True)
class Selected(StageResult):
    """The explored frames classified; the ones chosen for the oracle (``selected``: an extxyz, or None)."""

    stage: ClassVar[str] = "select"
    n_frames: int = 0
    n_accurate: int = 0
    n_candidate: int = 0
    n_failed: int = 0
    n_selected: int = 0
    adaptive: bool = False
    budget: int | None = None
    rejections: dict[str, int] = field(default_factory=dict)
    selected: str | None = None
    predictions: str | None = None
    n_from_gates: int = 0  # of n_selected: frames near failing gates (loop.gates.refine)


@dataclass(frozen=True)
class Labelled(StageResult):
    """The selected frames labelled; the committee's true errors on them (eV/Å)."""

    stage: ClassVar[str] = "label"
    n_frames: int = 0
    n_labelled: int = 0
    n_failed: int = 0
    n_attempts: int = 0
    dataset_size: int = 0
    forces_rmse: float | None = None
    max_force_error: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)  # metrics on these frames before/after calibration


# The stage table: name -> result type, in the loop's order.
RESULTS: dict[str, type[StageResult]] = {cls.stage: cls for cls in (Initial, Trained, Gated, Explored, Selected,
                                                                    Labelled)}
STAGES: tuple[str, ...] = tuple(RESULTS)


def result_of(stage: str, data: dict[str, Any] | StageResult) -> StageResult:
    """The typed result of ``stage`` from its stored dict."""
    return RESULTS[stage].from_dict(data)


class RunSummary(TypedDict):
    """What a session of the loop ends with (``LoopRun.summary``); the CLI and the Prefect flow print it."""

    name: str
    status: str  # new, running, converged, max_iterations, max_labels
    iterations: int
    labels: int  # oracle labels of the run (initial rattle included, imported frames not)
    dataset_size: int
    final_model: str | None  # absolute path of the final committee, once the run stopped
    run_dir: str
    sessions: int
