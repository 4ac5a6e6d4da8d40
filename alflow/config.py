"""Run configuration: one YAML file describes a whole active-learning run.

YAML is parsed only here. Every model forbids unknown keys, so a typo is an
error, and every field has a default where one makes sense, so a minimal
config is ``name`` plus ``system.build``. Units are ASE's: Å, eV, eV/Å, fs,
K and GPa for pressures. Relative paths are resolved against the directory of
the config file (``config_from_dict``: ``base_dir``, default the working dir).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import functools
import re
import shlex
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError
from alflow.errors import InputError
from alflow.ensembles import ENGINES, ENSEMBLES
from alflow.ensembles import NAMES as ENSEMBLE_NAMES
from alflow.ensembles import for_engine as ensembles_for
from alflow.oracles import BUILTIN as BUILTIN_ORACLES
from alflow.results import STAGES  # the one oracle table (alflow.oracles.ORACLES)

FALLBACK_ARCHITECTURES = ("schnet", "painn", "mace", "physnet", "dimenetpp", "tensornet", "aimnet2", "ani", "dtnn", "sake")
Ensemble = Literal[ENSEMBLE_NAMES]  # the one ensemble table: alflow.ensembles.ENSEMBLES
ASE_ENSEMBLES = frozenset(ensembles_for("ase"))
IPI_ENSEMBLES = frozenset(ensembles_for("ipi"))  # no Nose-Hoover in i-PI
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_REPR_MAX = 80
ENV_KEPT = (("labelling", "parameters"), ("labelling", "fallback_parameters"))  # ${VAR} expanded by the oracle only
CONFIG_DIR_ENV = "ALFLOW_CONFIG_DIR"  # deployments: configs only from these directories (os.pathsep-separated)
MAX_CONFIG_BYTES = 1_000_000  # a run configuration is a few kB; more is a mistake or an attack
MAX_CONFIG_NODES = 100_000  # YAML nodes after expanding aliases (a "billion laughs" expands to ~10^9)


class ConfigError(InputError):
    """An unreadable or invalid configuration; ``errors`` holds one line per problem."""

    def __init__(self, message: str, errors: list[str] | None = None, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [message]
        self.path = path


@functools.lru_cache(maxsize=1)
def known_architectures() -> tuple[str, ...]:
    """Names accepted by ``potential.architecture``: ``potentials.available()`` or a static fallback."""
    try:
        import potentials

        names = tuple(str(n).lower() for n in potentials.available())
        return names or FALLBACK_ARCHITECTURES
    except Exception:  # noqa: BLE001 - the registry is optional at validation time
        return FALLBACK_ARCHITECTURES


def _fail(message: str, *subloc: str | int, got: Any) -> PydanticCustomError:
    """An error located ``subloc`` below the model that raises it (see ``_format_errors``)."""
    return PydanticCustomError("alflow", message.replace("{", "(").replace("}", ")"), {"subloc": subloc, "got": got})


def _resolve(value: str | Path | None, info: ValidationInfo) -> Any:
    """Make a relative path absolute against the config file's directory (context ``base_dir``)."""
    if value is None:
        return None
    base = Path((info.context or {}).get("base_dir") or Path.cwd())
    path = Path(value).expanduser()
    resolved = path if path.is_absolute() else (base / path).resolve()
    return resolved if isinstance(value, Path) else str(resolved)


FilePath = Annotated[str, AfterValidator(_resolve)]  # relative to the config file's directory


def Bounded(high: float, unit: str = "", *, low: float | None = None, kind: type = float) -> Any:  # noqa: N802
    """A number type (``kind``) within [``low``, ``high``] (units ``unit``); NaN and inf are rejected by every model.

    The bound is a sanity limit, far beyond any sensible value: an absurd number
    (a cutoff of 10^6 Å, 10^12 steps) would hang a neighbor list or exhaust
    memory long after validation. The field's own ``Field(gt=...)`` keeps its
    usual lower bound.
    """
    where = f" {unit}" if unit else ""

    def check(value: Any) -> Any:
        if value > high:
            raise ValueError(f"expected at most {high:g}{where} (an absurd value would hang or exhaust memory)")
        if low is not None and value < low:
            raise ValueError(f"expected at least {low:g}{where}")
        return value

    schema = {"maximum": high, **({"minimum": low} if low is not None else {})}
    return Annotated[kind, AfterValidator(check), Field(json_schema_extra=schema)]


Temperature = Bounded(1e5, "K", low=0.0)
Pressure = Bounded(1e4, "GPa", low=-1e4)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class BuildConfig(_Model):
    """A bulk crystal from ``ase.build.bulk``."""

    element: str = Field(description="Chemical symbol or formula, e.g. 'Cu' or 'NaCl'.")
    crystal: Literal["sc", "fcc", "bcc", "tetragonal", "bct", "hcp", "rhombohedral", "orthorhombic", "mcl",
                     "diamond", "zincblende", "rocksalt", "cesiumchloride", "fluorite", "wurtzite"] | None = Field(
        None, description="Crystal structure; None uses ASE's reference state of the element.")
    a: Bounded(100.0, "Å") | None = Field(None, gt=0, description="Lattice constant a (Å); None uses ASE's reference value.")
    c: Bounded(100.0, "Å") | None = Field(None, gt=0, description="Lattice constant c (Å), for hcp/tetragonal/wurtzite.")
    covera: Bounded(100.0) | None = Field(None, gt=0, description="c/a ratio (dimensionless), alternative to c.")
    cubic: bool = Field(False, description="Build the conventional cubic cell.")
    orthorhombic: bool = Field(False, description="Build an orthorhombic cell.")

    @field_validator("element")
    @classmethod
    def _symbols(cls, v: str) -> str:
        from ase.data import chemical_symbols
        from ase.symbols import string2symbols

        try:
            unknown = [s for s in string2symbols(v) if s not in chemical_symbols[1:]]
        except Exception:  # noqa: BLE001 - ase raises ValueError/KeyError on garbage
            unknown = [v]
        if unknown or not v:
            raise ValueError("not a chemical symbol or formula")
        return v


class RattleConfig(_Model):
    """Randomly displaced and strained copies of the structures, labelled as the first dataset."""

    n_frames: Bounded(100_000, kind=int) = Field(20, ge=1, description="Number of frames to generate.")
    stdev: Bounded(5.0, "Å") = Field(0.05, ge=0, description="Standard deviation of the Gaussian displacements (Å).")
    strain: float = Field(0.02, ge=0, lt=1, description="Maximum random cell strain (fraction, e.g. 0.02 = 2 %).")


class FoundationExploreConfig(_Model):
    """First labels picked from a short MD with the foundation model (``potential.foundation``) instead of rattling."""

    n_frames: Bounded(100_000, kind=int) = Field(20, ge=1, description="Frames picked by farthest-point sampling and labelled.")
    steps: Bounded(1_000_000, kind=int) = Field(200, ge=1, description="Langevin MD steps per structure with the foundation.")
    stride: int = Field(5, ge=1, description="Keep a snapshot every this many steps.")
    temperature: Temperature = Field(600.0, description="MD temperature (K).")
    timestep: Bounded(100.0, "fs") = Field(2.0, gt=0, description="Time step (fs).")


class SystemConfig(_Model):
    """The material: starting structures (files or ``build``) and the first training data."""

    structures: list[FilePath] | None = Field(None, min_length=1, description="Structure files (any format ASE reads, plus CIF, POSCAR and pymatgen JSON through data-only fallbacks), relative to the config file.")
    build: BuildConfig | None = Field(None, description="Build a bulk crystal instead of reading files.")
    supercell: tuple[int, int, int] | None = Field(None, description="Repeat the cell n1 x n2 x n3 times.")
    min_cell_length: Bounded(500.0, "Å") | None = Field(None, gt=0, description="Repeat until every perpendicular cell width is at least this (Å).")
    initial_dataset: FilePath | None = Field(None, description="Labelled frames (extxyz, ...) to start training from.")
    initial_rattle: RattleConfig | None = Field(default_factory=RattleConfig, description="Rattled frames labelled by the oracle to seed the dataset; null to disable.")
    initial_from_foundation: FoundationExploreConfig | None = Field(
        None, description="With potential.foundation: also label frames picked (farthest-point, descriptor space) from a short MD with the foundation.")

    @field_validator("supercell")
    @classmethod
    def _positive(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and min(v) < 1:
            raise ValueError("every repetition must be >= 1")
        if v is not None and v[0] * v[1] * v[2] > 1_000_000:
            raise ValueError("expected at most 10^6 repetitions in all (an absurd supercell would exhaust memory)")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> SystemConfig:
        if (self.structures is None) == (self.build is None):
            given = [k for k in ("structures", "build") if getattr(self, k) is not None]
            raise _fail("give exactly one of 'structures' (files) or 'build' (ase.build.bulk)", got=given or None)
        return self


class PotentialConfig(_Model):
    """The neural-network potential every committee member uses."""

    architecture: str = Field("schnet", description="Model name from the potentials registry (see known_architectures()).")
    cutoff: Bounded(30.0, "Å") = Field(5.0, gt=0, description="Neighbour cutoff radius (Å), at most 30.")
    hparams: dict[str, Any] = Field(default_factory=dict, description="Architecture hyper-parameters passed to the model constructor.")
    dtype: Literal["float32", "float64"] = Field("float32", description="Floating-point precision of the model.")
    checkpoint: FilePath | None = Field(None, description="Model file to start from instead of random weights.")
    # a foundation model to fine-tune (alflow/foundation.py, docs/foundation.md)
    foundation: FilePath | None = Field(
        None, description="Foundation model every member starts from and is fine-tuned: a MACE .model file (needs "
        "trusted: true) or an alflow checkpoint; its architecture, hparams, species and cutoff replace this section's.")
    trusted: bool = Field(False, description="Allow loading a pickled MACE .model foundation (it executes code).")
    freeze: list[str] = Field(default_factory=list, description="Parameter-name prefixes of the foundation kept frozen, e.g. model.interactions.0.")
    reinit_readout: bool = Field(False, description="Redraw each member's readout weights (seeded per member) before fine-tuning.")
    align_e0: bool = Field(True, description="Fit a per-element energy shift (eV) of the foundation to the first labelled frames.")
    align_scale: bool = Field(False, description="Also fit a scale of the foundation's network energy (from the forces).")
    align_frames: Bounded(100_000, kind=int) = Field(50, ge=1, description="At most this many first labelled frames for the alignment.")

    @model_validator(mode="after")
    def _foundation_only(self) -> PotentialConfig:
        if self.foundation is None:
            for name in ("freeze", "reinit_readout", "trusted"):
                if getattr(self, name):
                    raise _fail("needs potential.foundation", name, got=getattr(self, name))
        elif self.checkpoint is not None:
            raise _fail("give potential.foundation or potential.checkpoint, not both", "checkpoint", got=self.checkpoint)
        return self

    @field_validator("architecture")
    @classmethod
    def _known(cls, v: str) -> str:
        known = known_architectures()
        if v.lower() not in known:
            raise ValueError(f"unknown architecture; known: {', '.join(known)}")
        return v.lower()


class CommitteeConfig(_Model):
    """The committee of independently trained models whose disagreement measures uncertainty."""

    size: Bounded(256, kind=int) = Field(4, ge=2, description="Number of members.")
    kind: Literal["full", "shallow"] = Field(
        "full", description="full: independently trained members; shallow: one shared trunk and `heads` readout "
        "heads trained with a force NLL (potentials/shallow.py, docs/uncertainty.md).")
    heads: Bounded(256, kind=int) = Field(4, ge=2, description="Number of heads of a shallow committee.")
    shallow_forces: Literal["heads", "mean"] = Field(
        "heads", description="Shallow committee forces: every head's exact forces (K backward passes on the CPU, one batched on "
        "accelerators; the batched MD engine asks for them only on steps that record a frame), or the "
        "mean head's only with the per-atom energy spread as force deviation (the cost of one model).")
    bootstrap: bool = Field(False, description="Train each member on a bootstrap resample of the training set.")
    calibrate: bool = Field(True, description="Rescale the committee spread on the validation set (uncertainty calibration).")
    calibration_min_frames: int = Field(
        1, ge=1, description="Calibrate only with at least this many validation frames; fewer leave alpha = 1.")
    calibration: Literal["scale", "isotonic"] = Field(
        "isotonic", description="Map from committee deviation to true error, refitted every iteration on every "
        "labelled frame so far: per-element isotonic regression, or per-element scale alpha (docs/uncertainty.md).")
    calibration_decay: float = Field(
        0.5, gt=0, le=1, description="Weight per iteration of age of the calibration data (1: all iterations equal).")
    calibration_min_atoms: Bounded(10_000_000, kind=int) = Field(
        20, ge=1, description="Atoms of an element needed for its own calibration; fewer use the global fit.")
    trust_target: Bounded(1e3) | None = Field(
        None, gt=0, description="True max force error (eV/A) a trusted frame should stay below, for the logged "
        "trust-window coverage; null: selection.lower.")


class TrainingConfig(_Model):
    """Training of each committee member."""

    epochs: Bounded(1_000_000, kind=int) = Field(200, ge=1, description="Maximum epochs per training.")
    batch_size: Bounded(1_000_000, kind=int) = Field(8, ge=1, description="Structures per batch.")
    lr: Bounded(10.0) = Field(1e-3, gt=0, description="Learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    energy_weight: float = Field(1.0, ge=0, description="Loss weight of energies (per atom, eV²).")
    forces_weight: float = Field(10.0, ge=0, description="Loss weight of forces ((eV/Å)²).")
    stress_weight: float = Field(0.0, ge=0, description="Loss weight of stresses ((eV/Å³)²); 0 ignores stress.")
    patience: int = Field(30, ge=1, description="Early stopping: epochs without validation improvement.")
    ema_decay: float | None = Field(0.99, ge=0, lt=1, description="Exponential moving average of weights; null disables.")
    grad_clip: float | None = Field(10.0, gt=0, description="Gradient-norm clipping threshold; null disables.")
    valid_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of frames held out for validation.")
    test_fraction: float = Field(0.0, ge=0, lt=1, description="Fraction of frames held out for testing.")
    warm_start: bool = Field(True, description="Continue from the previous iteration's weights.")
    max_time_s: float | None = Field(None, gt=0, description="Wall-time limit per member and training (s); members trained together get K times it.")
    # the trainer of round two (alflow/train.py, docs/training.md)
    members: Literal["auto", "grouped", "sequential"] = Field(
        "auto", description="Train the K members together (grouped: stacked parameters, torch.vmap) or one after another; auto: grouped on an accelerator, sequential on the CPU (grouped measured no faster there, docs/benchmarks.md).")
    batch_atoms: int | None = Field(None, ge=1, description="Fill training and validation batches to this many atoms (at least one frame each) instead of batch_size frames; null: batch_size frames.")
    schedule: Literal["plateau", "cosine"] = Field("plateau", description="LR schedule: halve on a validation plateau, or cosine decay to lr/100 over the epochs.")
    warmup_epochs: float = Field(0.0, ge=0, description="Linear LR warm-up from lr/100 over this many epochs (fractions allowed).")
    loss: Literal["mse", "huber"] = Field("mse", description="Per-component loss: squared error, or Huber with huber_delta (eV/atom, eV/Å, eV/Å³).")
    huber_delta: float = Field(0.01, gt=0, description="Huber threshold, in the units of each term.")
    final_epochs: int = Field(0, ge=0, description="Final stage (stage two / SWA-like): the last this many epochs, or from an early stop on, with final_energy_weight and lr * final_lr_factor; 0 disables.")
    final_energy_weight: float | None = Field(None, ge=0, description="Energy loss weight of the final stage; null: 10 x energy_weight.")
    final_lr_factor: float = Field(0.1, gt=0, le=1, description="LR of the final stage as a fraction of lr.")
    nll_epochs: Bounded(1_000_000, kind=int) = Field(
        20, ge=0, description="Shallow committee: epochs of Gaussian force-NLL fine-tuning after the MSE stage.")
    nll_weight: float = Field(1.0, ge=0, description="Shallow committee: weight of the force NLL in the fine-tuning loss.")
    replay_frames: Bounded(1_000_000, kind=int) = Field(
        20, ge=0, description="With potential.foundation: structures (initial set, earlier explorations) labelled by the "
        "foundation itself that join every member's training set against forgetting; 0 disables.")
    replay_weight: Bounded(100.0) = Field(
        0.5, ge=0, description="Weight of a replay frame relative to an oracle frame (it enters floor/ceil(w) times per epoch).")
    nll_trunk_lr_factor: float = Field(
        0.1, ge=0, le=1, description="Shallow committee: trunk LR during NLL fine-tuning as a fraction of lr (0 freezes it).")

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        if self.valid_fraction + self.test_fraction >= 1:
            raise _fail("valid_fraction + test_fraction must be < 1", "test_fraction", got=self.test_fraction)
        if self.energy_weight == self.forces_weight == self.stress_weight == 0:
            raise _fail("at least one loss weight must be > 0", "forces_weight", got=0.0)
        return self


class WalkerConfig(_Model):
    """One molecular-dynamics walker (``replicas`` copies with different seeds)."""

    ensemble: Ensemble = Field("nvt-langevin", description="Thermodynamic ensemble / integrator.")
    temperature: Temperature | list[Temperature] = Field(300.0, description="Temperature (K); a list is a linear ramp over the run.")
    pressure: Pressure | list[Pressure] | None = Field(None, validate_default=True, description="Pressure (GPa); required for npt-*, a list is a ramp.")
    timestep: Bounded(100.0, "fs") = Field(2.0, gt=0, description="Time step (fs).")
    steps: Bounded(1_000_000_000, kind=int) = Field(1000, gt=0, description="MD steps per iteration.")
    stride: int = Field(10, gt=0, description="Score the committee every this many steps.")
    friction: Bounded(100.0, "1/fs") = Field(0.01, gt=0, description="Langevin friction (1/fs).")
    nbeads: Bounded(1024, kind=int) = Field(4, ge=1, description="Path-integral beads (pimd only).")
    start: Literal["relaxed", "rattled", "strained", "vacancy", "interstitial", "surface"] = Field(
        "relaxed", description="How the starting structure is prepared.")
    rattle_stdev: Bounded(5.0, "Å") = Field(0.05, ge=0, description="Displacement standard deviation for start=rattled (Å).")
    strain: float = Field(0.02, gt=-1, lt=1, description="Isotropic strain for start=strained (fraction).")
    miller: tuple[int, int, int] = Field((1, 1, 1), description="Surface orientation for start=surface.")
    vacuum: Bounded(1000.0, "Å") = Field(10.0, gt=0, description="Vacuum thickness for start=surface (Å).")
    seed: int | None = Field(None, ge=0, lt=2**62, description="Random seed (>= 0); null derives one from the run seed and walker index.")
    replicas: Bounded(10_000, kind=int) = Field(1, ge=1, description="Independent copies of this walker.")

    @field_validator("temperature")
    @classmethod
    def _temperatures(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values or min(values) < 0:
            raise ValueError("temperatures must be >= 0 K (a list needs at least one value)")
        return v

    @field_validator("pressure")
    @classmethod
    def _pressure(cls, v: float | list[float] | None, info: ValidationInfo) -> float | list[float] | None:
        ensemble = info.data.get("ensemble", "")
        rule = ENSEMBLES[ensemble].pressure if ensemble in ENSEMBLES else "optional"
        if v is None and rule == "required":
            raise ValueError(f"pressure (GPa) is required for ensemble {ensemble!r}")
        if v is not None and rule == "forbidden":
            raise ValueError(f"pressure is not allowed for ensemble {ensemble!r}")
        if isinstance(v, list) and not v:
            raise ValueError("a pressure ramp needs at least one value")
        return v

    @field_validator("miller")
    @classmethod
    def _miller(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if not any(v):
            raise ValueError("Miller indices cannot all be zero")
        return v

    @model_validator(mode="after")
    def _stride(self) -> WalkerConfig:
        if self.stride > self.steps:
            raise _fail("stride must be <= steps", "stride", got=self.stride)
        return self


class ExplorationConfig(_Model):
    """Molecular dynamics with the committee to find uncertain structures."""

    engine: Literal[ENGINES] = Field(  # type: ignore[valid-type] - the engines of alflow.ensembles
        "batched", description="MD engine: batched (every walker in one device batch; the default, and i-PI when a walker "
        "needs pimd), ASE integrators (a thread per walker) or i-PI over a socket (docs/exploration.md).")
    walkers: list[WalkerConfig] = Field(default_factory=lambda: [WalkerConfig()], min_length=1, description="MD walkers run each iteration.")
    min_distance: Bounded(10.0, "Å") = Field(0.5, gt=0, description="Stop a walker when two atoms come closer than this (Å): it exploded.")
    uncertain_patience: int = Field(20, ge=1, description="Stop a walker after this many steps above selection.upper.")

    @model_validator(mode="after")
    def _engine_can(self) -> ExplorationConfig:
        batched = frozenset(ensembles_for("batched"))  # the batched engine's ensembles (alflow.ensembles)
        if "engine" not in self.model_fields_set and any(w.ensemble not in batched for w in self.walkers):
            object.__setattr__(self, "engine", "ipi")  # the default: batched, unless a walker needs i-PI (pimd)
        allowed = frozenset(ensembles_for(self.engine))
        for i, walker in enumerate(self.walkers):
            if walker.ensemble not in allowed:
                raise _fail(f"engine {self.engine!r} cannot run this ensemble; it supports {', '.join(sorted(allowed))}",
                            "walkers", i, "ensemble", got=walker.ensemble)
            if self.engine == "ipi":  # i-PI ramps linearly between two set points (t_ramp/p_ramp), no further
                for name in ("temperature", "pressure"):
                    value = getattr(walker, name)
                    if isinstance(value, list) and len(value) > 2:
                        raise _fail("engine 'ipi' ramps linearly between two set points at most (i-PI's "
                                    "t_ramp/p_ramp); give [start, end] or use engine 'ase'",
                                    "walkers", i, name, got=value)
        return self


class SelectionConfig(_Model):
    """Which explored frames go to the oracle, from the committee's max force deviation."""

    lower: float = Field(0.05, gt=0, description="Trust level (eV/Å): frames below are considered known.")
    upper: float = Field(0.5, gt=0, description="Frames above this (eV/Å) are considered unphysical, not labelled.")
    energy_lower: float | None = Field(None, ge=0, description="Optional energy deviation trust level (eV/atom).")
    energy_upper: float | None = Field(None, gt=0, description="Optional energy deviation upper level (eV/atom).")
    adaptive_fraction: float | None = Field(
        None, gt=0, le=1,
        description="When fewer frames than the budget are above lower: top the candidates up with the most uncertain "
                    "frames to ceil(f * n) of the n non-failed frames. null: only frames above lower.")
    max_per_iteration: int = Field(20, ge=1, description="At most this many frames labelled per iteration.")
    max_per_walker: int | None = Field(None, ge=1, description="At most this many frames from one walker per iteration.")
    min_stride: int = Field(1, ge=1, description="Minimum distance between selected frames of one trajectory (frames).")
    diversity: Literal["none", "fps"] = Field(
        "fps", description="fps: farthest-point sampling among the candidates; none: the most uncertain first "
                           "(measured against fps in docs/labelling.md).")
    fps_pool: float | None = Field(
        None, ge=1, description="diversity fps: farthest-point sampling among the ceil(fps_pool x budget) most "
                                "uncertain candidates only. null: among every candidate.")
    strategy: Literal["committee", "random"] = Field("committee", description="Uncertainty-based or random selection (baseline).")
    min_interatomic_distance: float = Field(0.6, gt=0, description="Reject frames with atoms closer than this (Å).")
    max_force: float = Field(50.0, gt=0, description="Reject frames whose predicted force exceeds this (eV/Å).")
    covalent_fraction: float = Field(
        0.5, ge=0, le=2, description="Reject pairs closer than this fraction of their covalent radii sum.")
    volume_per_atom: tuple[float, float] = Field(
        (1.0, 500.0), description="Reject 3D-periodic frames whose volume per atom (Å³) is outside [min, max].")
    cell_angles: tuple[float, float] = Field(
        (20.0, 160.0), description="Reject 3D-periodic frames with a cell angle (degrees) outside [min, max].")
    dataset_distance: float = Field(
        2e-4, ge=0, description="fps: drop candidates this close to a dataset frame in descriptor space (near-duplicates).")

    @model_validator(mode="after")
    def _ordered(self) -> SelectionConfig:
        for name in ("volume_per_atom", "cell_angles"):
            low, high = getattr(self, name)
            if not 0 <= low < high:
                raise _fail("expected [min, max] with 0 <= min < max", name, got=[low, high])
        if self.cell_angles[1] > 180:
            raise _fail("angles are at most 180 degrees", "cell_angles", got=list(self.cell_angles))
        if self.upper <= self.lower:
            raise _fail(f"must be greater than lower ({self.lower})", "upper", got=self.upper)
        if self.energy_lower is not None and self.energy_upper is not None and self.energy_upper <= self.energy_lower:
            raise _fail(f"must be greater than energy_lower ({self.energy_lower})", "energy_upper", got=self.energy_upper)
        return self


class LabellingConfig(_Model):
    """The reference calculator ("oracle") that labels selected frames."""

    oracle: str = Field("emt", description=f"Built-in ({', '.join(BUILTIN_ORACLES)}) or 'module:Class' of an ASE calculator.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the calculator.")
    kpoint_density: Bounded(100.0, "points per Å⁻¹") | None = Field(None, gt=0, description="k-point density (points per Å⁻¹) for periodic DFT.")
    timeout_s: Bounded(1e7, "s") = Field(3600.0, gt=0, description="Wall-time limit per single-point calculation (s).")
    threads: Bounded(4096, kind=int) = Field(1, ge=1, description="Threads / MPI ranks per calculation.")
    retries: Bounded(100, kind=int) = Field(1, ge=0, description="Retries of a failed calculation, using fallback_parameters in turn.")
    memory_limit_gb: Bounded(1e5, "GB") | None = Field(
        None, ge=0.5, description="Address-space limit (RLIMIT_AS, GB = 1e9 bytes) of each label worker and the code it "
                                  "runs; a calculation that needs more fails as an error (MemoryError). It limits virtual memory: "
                                  "leave it null for GPU oracles (CUDA reserves large address ranges). null: no limit.")
    fallback_parameters: list[dict[str, Any]] = Field(default_factory=list, description="Parameter overrides tried on retries.")
    mpi_command: str | None = Field(
        None, min_length=1, description="MPI launcher put in front of the code's command (QE, CP2K, VASP, a "
                                        "'module:Class' taking `command`), e.g. 'srun -n {cores}' or 'mpirun -np {cores}'.")
    cores_per_calculation: Bounded(100000, kind=int) = Field(1, ge=1, description="MPI ranks per calculation ({cores} of mpi_command).")
    max_in_flight: Bounded(100000, kind=int) | None = Field(
        None, ge=1, description="Calculations running at once in a label stage; null: execution.max_workers.")
    max_force_warning: Bounded(1e6, "eV/Å") = Field(
        50.0, gt=0, description="Warn about labels whose largest force exceeds this (eV/Å; usually overlapping atoms); "
                                "they are stored, `alflow data remove --where 'max_force>50'` removes them.")

    @field_validator("oracle")
    @classmethod
    def _oracle(cls, v: str) -> str:
        if v.lower() in BUILTIN_ORACLES:
            return v.lower()
        if not _IMPORT_PATH.match(v):
            raise ValueError(f"unknown oracle; use one of {', '.join(BUILTIN_ORACLES)} or 'package.module:Class'")
        return v

    @model_validator(mode="after")
    def _mpi(self) -> LabellingConfig:
        if self.mpi_command is None:
            if self.cores_per_calculation != 1:
                raise _fail("cores_per_calculation needs mpi_command (e.g. 'srun -n {cores}')", "cores_per_calculation",
                            got=self.cores_per_calculation)
            return self
        from alflow.oracles import ORACLES

        spec = ORACLES.get(self.oracle)
        if spec is not None and spec.executable is None and not spec.env_command:
            raise _fail(f"oracle {self.oracle} runs inside the Python worker, not as a command an MPI launcher can "
                        "start; mpi_command works with espresso, cp2k, vasp or a 'module:Class' taking command",
                        "mpi_command", got=self.mpi_command)
        try:
            launcher = self.mpi_command.format(cores=self.cores_per_calculation)
            words = shlex.split(launcher)
        except (KeyError, IndexError, ValueError) as err:
            raise _fail(f"expected a launcher command with at most the placeholder (cores) ({err})", "mpi_command",
                        got=self.mpi_command) from None
        if not words:
            raise _fail("expected a launcher command, e.g. 'srun -n {cores}'", "mpi_command", got=self.mpi_command)
        return self


class EOSGateConfig(_Model):
    """Equation-of-state gate (alflow.gates): V0 and bulk modulus of the committee vs the oracle."""

    structure: FilePath | None = Field(None, description="Structure file; null: the first system structure (supercell applied).")
    strain: float = Field(0.04, gt=0, le=0.2, description="Linear strain range: lengths scaled by 1 + s, s in [-strain, strain].")
    points: Bounded(101, kind=int) = Field(7, ge=5, description="Volumes on the E-V curve (oracle labels, paid once).")
    eos: Literal["birchmurnaghan", "murnaghan", "vinet", "sj", "taylor", "antonschmidt", "p3"] = Field(
        "birchmurnaghan", description="ase.eos.EquationOfState form.")
    tol_volume: float = Field(0.01, gt=0, description="Tolerance on the relative error of the equilibrium volume.")
    tol_bulk_modulus: float = Field(0.05, gt=0, description="Tolerance on the relative error of the bulk modulus.")
    tol_energy: Bounded(100.0, "eV/atom") | None = Field(None, gt=0, description="Tolerance on the largest energy error on the curve (eV/atom); null: not checked.")


class ElasticGateConfig(_Model):
    """Elastic-constants gate (alflow.gates): clamped-ion C_ij by finite strain, committee vs oracle."""

    structure: FilePath | None = Field(None, description="Structure file; null: the first system structure (supercell applied).")
    delta: float = Field(0.01, gt=0, le=0.05, description="Strain of each of the 12 deformations (+-delta per Voigt component).")
    tol: float | None = Field(0.1, gt=0, description="Tolerance on max |dC_ij| / max |C_ij| of the oracle; null: not checked.")
    tol_gpa: Bounded(1e4, "GPa") | None = Field(None, gt=0, description="Tolerance on max |dC_ij| (GPa); null: not checked.")

    @model_validator(mode="after")
    def _some_tolerance(self) -> ElasticGateConfig:
        if self.tol is None and self.tol_gpa is None:
            raise _fail("set tol (relative) and/or tol_gpa", "tol", got=None)
        return self


class PhononGateConfig(_Model):
    """Phonon gate (alflow.gates, needs phonopy): frequencies at q-points, committee vs oracle."""

    structure: FilePath | None = Field(None, description="Unit cell file; null: the first system structure (supercell applied).")
    supercell: tuple[int, int, int] = Field((2, 2, 2), description="Phonopy supercell of the structure.")
    distance: float = Field(0.01, gt=0, le=0.1, description="Finite displacement (Å).")
    qpoints: list[tuple[float, float, float]] = Field(
        default_factory=lambda: [(0.0, 0.0, 0.0), (0.5, 0.0, 0.0), (0.5, 0.5, 0.0), (0.5, 0.5, 0.5)], min_length=1,
        description="q-points, fractional coordinates of the structure's reciprocal cell.")
    tol_thz: float = Field(0.2, gt=0, description="Tolerance on the largest frequency error (THz).")

    @field_validator("supercell")
    @classmethod
    def _supercell(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(v) < 1 or v[0] * v[1] * v[2] > 1000:
            raise ValueError("expected 1 to 1000 repetitions in all, each >= 1")
        return v

    @model_validator(mode="after")
    def _phonopy(self) -> PhononGateConfig:
        import importlib.util

        if importlib.util.find_spec("phonopy") is None:
            raise _fail("the phonons gate needs the package phonopy, which is not installed: pip install phonopy "
                        "(or pip install 'alflow[phonons]')", got="phonons")
        return self


class RDFGateConfig(_Model):
    """Radial-distribution-function gate (alflow.gates, alflow.gate_md): g(r) of a seeded Langevin MD run, committee vs oracle."""

    structure: FilePath | None = Field(None, description="Structure file; null: the first system structure (supercell applied). Repeated until wider than 2 rmax.")
    temperature: Bounded(1e5, "K") = Field(..., gt=0, description="MD temperature (K).")
    timestep: Bounded(20.0, "fs") = Field(2.0, gt=0, description="MD time step (fs).")
    equilibration: Bounded(1_000_000, kind=int) = Field(200, ge=0, description="Steps before sampling starts.")
    steps: Bounded(10_000_000, kind=int) = Field(400, ge=1, description="Steps of the sampled part.")
    samples: Bounded(10_000, kind=int) = Field(10, ge=1, description="Frames sampled evenly over `steps` (the oracle's are labels, kept in the dataset).")
    friction: float = Field(0.01, gt=0, le=1.0, description="Langevin friction (1/fs).")
    seed: int = Field(0, ge=0, description="Seed of the initial velocities and the thermostat noise (both runs).")
    rmax: Bounded(30.0, "Å") = Field(5.0, gt=0, description="Largest distance of g(r) (Å).")
    bins: Bounded(10_000, kind=int) = Field(100, ge=5, description="Histogram bins of g(r).")
    tol: float = Field(0.1, gt=0, description="Tolerance on the integrated |g_model - g_oracle| relative to the integral of g_oracle.")
    tol_peak: Bounded(10.0, "Å") | None = Field(None, gt=0, description="Tolerance on the shift of the first peak (Å); null: not checked.")
    timeout_s: Bounded(1e7, "s") = Field(3600.0, gt=0, description="Wall-time limit of the oracle's MD run (s); it runs once.")

    @model_validator(mode="after")
    def _samples(self) -> RDFGateConfig:
        if self.samples > self.steps:
            raise _fail(f"expected at most `steps` ({self.steps}) samples", "samples", got=self.samples)
        return self


class GatesConfig(_Model):
    """Physics gates (alflow.gates, docs/convergence.md): the loop converges only when every configured gate holds."""

    eos: EOSGateConfig | None = Field(None, description="Equation of state: V0 and bulk modulus vs the oracle.")
    elastic: ElasticGateConfig | None = Field(None, description="Elastic constants vs the oracle.")
    phonons: PhononGateConfig | None = Field(None, description="Phonon frequencies vs the oracle (phonopy).")
    rdf: RDFGateConfig | None = Field(None, description="Radial distribution function of an MD run vs the oracle's.")
    refine: Bounded(100_000, kind=int) = Field(4, ge=0, description="Frames near each failing gate's structures (rattled copies; the committee's MD frames for rdf) offered to the oracle when the explored candidates leave room in the iteration's label budget; 0: off.")

    def configured(self) -> dict[str, Any]:
        """name -> config of every gate that is set, in the gate table's order."""
        return {name: spec for name in ("eos", "elastic", "phonons", "rdf") if (spec := getattr(self, name)) is not None}


class LoopConfig(_Model):
    """When the active-learning loop stops."""

    max_iterations: Bounded(100_000, kind=int) = Field(10, ge=1, description="Maximum iterations (train, explore, select, label).")
    max_labels: int | None = Field(None, ge=1, description="Stop once this many frames were labelled in total.")
    convergence_fraction: float = Field(0.99, gt=0, le=1, description="Converged when this fraction of explored frames is below selection.lower.")
    convergence_patience: int = Field(1, ge=1, description="Consecutive converged iterations required to stop.")
    gates: GatesConfig = Field(default_factory=GatesConfig, description="Physics gates that must also hold to converge (eos, elastic, phonons, rdf).")


_WALLTIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}(:\d{2})?$")  # [D-]HH:MM[:SS], Slurm's and PBS's forms
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*(B|[KMGTP]i?B)$", re.IGNORECASE)  # 64GB, 3.5GiB (dask.utils.parse_bytes)


class PoolConfig(_Model):
    """One kind of batch job: each job is a Dask worker on a Slurm/PBS node (``alflow.cluster``)."""

    jobs: Bounded(10000, kind=int) = Field(1, ge=0, description="Jobs of this pool submitted when the flow starts.")
    queue: str | None = Field(None, min_length=1, description="Slurm partition / PBS queue (-p / -q).")
    account: str | None = Field(None, min_length=1, description="Account charged (-A).")
    walltime: str = Field("01:00:00", description="Wall-time limit of each job, [D-]HH:MM[:SS].")
    cores: Bounded(4096, kind=int) = Field(1, ge=1, description="CPU cores per job.")
    memory: str = Field("4GB", description="Memory per job, e.g. 64GB.")
    processes: Bounded(4096, kind=int) = Field(1, ge=1, description="Dask worker processes per job (cores are shared among them).")
    gpus: Bounded(64, kind=int) = Field(0, ge=0, description="GPUs per job (Slurm --gres=gpu:N or --gpus=N; PBS ngpus=N).")
    gpu_directive: Literal["gres", "gpus"] = Field("gres", description="Slurm: request GPUs as --gres=gpu:N or --gpus=N.")
    prologue: list[str] = Field(default_factory=list, description="Shell lines run before the worker starts (module load, conda activate).")
    directives: list[str] = Field(default_factory=list, description="Extra scheduler directives, e.g. '--constraint=a100' (Slurm) or '-l place=scatter' (PBS).")
    resources: dict[str, float] = Field(default_factory=dict, description="Dask worker resources each worker advertises, e.g. {GPU: 1}; "
                                                                          "execution.dask_resources sends stages there.")

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, v: str) -> str:
        if not _WALLTIME.match(v.strip()):
            raise ValueError("expected a wall time [D-]HH:MM[:SS], e.g. 02:00:00 or 1-00:00:00")
        return v.strip()

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        if not _MEMORY.match(v.strip()):
            raise ValueError("expected an amount of memory with its unit, e.g. 64GB or 3.5GiB")
        return v.strip().replace(" ", "")

    @field_validator("prologue", "directives")
    @classmethod
    def _lines(cls, v: list[str]) -> list[str]:
        for line in v:
            if "\n" in line or not line.strip():
                raise ValueError("expected one non-empty line per entry (a list of lines)")
        return v

    @model_validator(mode="after")
    def _shape(self) -> PoolConfig:
        if self.processes > self.cores:
            raise _fail("expected at most one worker process per core", "processes", got=self.processes)
        for name, amount in self.resources.items():
            if not amount > 0:
                raise _fail("expected a positive amount of a worker resource", "resources", name, got=amount)
        return self


class AdaptConfig(_Model):
    """Adaptive scaling of a one-pool cluster: Dask submits and cancels jobs between these bounds."""

    minimum_jobs: Bounded(10000, kind=int) = Field(0, ge=0, description="Fewest jobs kept.")
    maximum_jobs: Bounded(10000, kind=int) = Field(1, ge=1, description="Most jobs at once.")

    @model_validator(mode="after")
    def _order(self) -> AdaptConfig:
        if self.minimum_jobs > self.maximum_jobs:
            raise _fail("expected minimum_jobs <= maximum_jobs", "minimum_jobs", got=self.minimum_jobs)
        return self


CLUSTER_KINDS = ("local", "address", "slurm", "pbs")


class ClusterConfig(_Model):
    """Where the Dask workers come from (task_runner: dask): ``alflow.cluster``, docs/cluster.md."""

    kind: Literal["local", "address", "slurm", "pbs"] = Field(
        "local", description="local: a LocalCluster of max_workers processes; address: a running scheduler; "
                             "slurm / pbs: batch jobs through dask-jobqueue.")
    address: str | None = Field(None, min_length=1, description="kind address: the scheduler, e.g. tcp://10.0.0.5:8786.")
    pools: dict[str, PoolConfig] = Field(default_factory=dict, description="kind slurm/pbs: the kinds of job, "
                                         "e.g. {gpu: {gpus: 1, resources: {GPU: 1}}, cpu: {cores: 32}}.")
    adapt: AdaptConfig | None = Field(None, description="kind slurm/pbs with one pool: adaptive number of jobs.")
    interface: str | None = Field(None, min_length=1, description="Network interface the scheduler and workers use (e.g. ib0); null: Dask's default.")
    log_directory: FilePath | None = Field(None, description="Where the jobs write their stdout/stderr; null: the submit directory.")
    dashboard_address: str = Field("127.0.0.1:8787", min_length=1, description="Dask dashboard (loopback: reach it through an ssh tunnel).")
    python: str | None = Field(None, min_length=1, description="Python of the workers on the nodes; null: this interpreter.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _kind(self) -> ClusterConfig:
        if (self.kind == "address") != (self.address is not None):
            raise _fail("address is set exactly when kind is address", "address", got=self.address)
        batch = self.kind in ("slurm", "pbs")
        if self.pools and not batch:
            raise _fail(f"pools need kind slurm or pbs, not {self.kind}", "pools", got=sorted(self.pools))
        if batch and not self.pools:
            raise _fail(f"kind {self.kind} needs at least one pool, e.g. pools: cpu: cores: 8", "pools",
                        got=self.pools)
        if self.adapt is not None and (not batch or len(self.pools) != 1):
            raise _fail("adapt needs kind slurm/pbs with exactly one pool (Dask's adaptive scaling cannot tell which "
                        "pool a stage's resources need): set jobs per pool instead", "adapt", got=sorted(self.pools))
        for name in self.pools:
            if not re.fullmatch(r"[A-Za-z0-9_]+", name):
                raise _fail("expected a pool name of letters, digits and '_'", "pools", name, got=name)
        return self


class ExecutionConfig(_Model):
    """Where and how tasks run."""

    task_runner: Literal["thread", "process", "dask"] = Field("thread", description="Prefect task runner.")
    max_workers: Bounded(4096, kind=int) = Field(2, ge=1, description="Concurrent tasks.")
    dask_address: str | None = Field(None, description="Deprecated alias of cluster: {kind: address, address: ...}.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="task_runner=dask: local, address, slurm or pbs "
                                   "(alflow.cluster, docs/cluster.md).")
    dask_resources: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="task_runner=dask: worker resources each stage needs, e.g. {train: {GPU: 1}, explore: {GPU: 1}} "
                    "sends training and exploration to workers started with `--resources GPU=1`.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Torch device; auto uses CUDA when present.")
    torch_threads: Bounded(1024, kind=int) | None = Field(None, ge=1, description="Torch CPU threads of every stage (torch.set_num_threads); null: torch's default (one per core). 1 is faster for small models on a busy machine.")
    prefect_home: FilePath | None = Field(None, description="PREFECT_HOME directory; null keeps Prefect's default.")

    @property
    def resolved_cluster(self) -> ClusterConfig:
        """``cluster``, or kind address for the deprecated ``dask_address`` (the config itself keeps what was written)."""
        if self.dask_address is not None:
            return ClusterConfig(kind="address", address=self.dask_address)
        return self.cluster

    @model_validator(mode="after")
    def _dask(self) -> ExecutionConfig:
        if self.dask_address is not None and self.task_runner != "dask":
            raise _fail("dask_address needs task_runner: dask", "dask_address", got=self.dask_address)
        if self.dask_resources and self.task_runner != "dask":
            raise _fail("dask_resources needs task_runner: dask", "dask_resources", got=self.dask_resources)
        if self.cluster.kind != "local" and self.task_runner != "dask":
            raise _fail(f"cluster kind {self.cluster.kind} needs task_runner: dask", "cluster", "kind", got=self.cluster.kind)
        if self.dask_address is not None:  # the old spelling of cluster kind address (resolved_cluster)
            if self.cluster.kind != "local":
                raise _fail("give either dask_address (deprecated) or cluster, not both", "dask_address",
                            got=self.dask_address)
        pools = self.cluster.pools
        stages = STAGES  # the stage table (alflow.results)
        for stage, needs in self.dask_resources.items():
            if stage not in stages:
                raise _fail(f"expected a stage name ({', '.join(stages)})", "dask_resources", stage, got=stage)
            for name, amount in needs.items():
                if not amount > 0:
                    raise _fail("expected a positive amount of a worker resource", "dask_resources", stage, name,
                                got=amount)
                if pools and not any(p.resources.get(name, 0) >= amount for p in pools.values()):
                    raise _fail(f"no pool of execution.cluster.pools advertises {name}={amount:g} (its tasks would wait "
                                f"forever); add it to a pool's resources", "dask_resources", stage,
                                name, got=amount)
        return self


class RunConfig(_Model):
    """A whole active-learning run."""

    name: str = Field(min_length=1, description="Run name.")
    run_dir: Annotated[Path, AfterValidator(_resolve)] | None = Field(None, description="Output directory; default runs/<name> next to the config file.")
    seed: int = Field(0, ge=0, lt=2**62, description="Master random seed (>= 0: numpy and torch refuse negative seeds).")
    system: SystemConfig
    potential: PotentialConfig = Field(default_factory=PotentialConfig)
    committee: CommitteeConfig = Field(default_factory=CommitteeConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    exploration: ExplorationConfig = Field(default_factory=ExplorationConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    labelling: LabellingConfig = Field(default_factory=LabellingConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    _env_placeholders: dict[tuple[str | int, ...], tuple[str, str]] = PrivateAttr(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _directory_name(cls, v: str) -> str:
        if v in (".", "..") or any(c in v for c in ("/", "\\", "\0")) or v != v.strip():
            raise ValueError("the run name is one directory name under runs/: no '/', '\\', NUL, no '.' or '..', "
                             "no leading or trailing spaces")
        return v

    @model_validator(mode="after")
    def _default_run_dir(self, info: ValidationInfo) -> RunConfig:
        if self.run_dir is None:
            object.__setattr__(self, "run_dir", _resolve(Path("runs") / self.name, info))
        return self

    def summary(self) -> str:
        """One line: architecture, committee, walkers, oracle and iterations."""
        counts: dict[str, int] = {}
        for w in self.exploration.walkers:
            counts[w.ensemble] = counts.get(w.ensemble, 0) + w.replicas
        walkers = ", ".join(f"{n}x {e}" for e, n in counts.items())
        model = (f"fine-tuned from {Path(self.potential.foundation).name}" if self.potential.foundation is not None
                 else f"{self.potential.architecture} (cutoff {self.potential.cutoff:g} Å)")
        return (f"{self.name}: {model}, "
                f"committee of {self.committee.size}, {sum(counts.values())} walker(s) on {self.exploration.engine} "
                f"({walkers}), oracle {self.labelling.oracle}, up to {self.loop.max_iterations} iterations")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as ``1e-3`` as numbers."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """Like SafeLoader's, but a key given twice is an error instead of silently overriding."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)|\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return next((m for a in typing.get_args(annotation) if (m := _model_in(a))), None)
    return None


def _value_type(annotation: Any) -> Any:
    """The value type of a ``dict[str, X]`` annotation (also inside Optional), else None."""
    for a in (typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)):
        if typing.get_origin(a) is dict:
            return typing.get_args(a)[1]
    return None


def _item_type(annotation: Any) -> Any:
    for a in (typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)):
        if typing.get_origin(a) in (list, tuple):
            return typing.get_args(a)[0]
    return None


def _clean_loc(loc: tuple[str | int, ...]) -> tuple[str, tuple[str | int, ...], str]:
    """Dotted field path (union tags dropped), the raw loc, and a 'did you mean' hint for unknown keys."""
    parts: list[str | int] = []
    annotation: Any = RunConfig
    hint = ""
    for part in loc:
        model = _model_in(annotation)
        if isinstance(part, int):
            parts.append(part)
            annotation = _item_type(annotation)
        elif model is None and (value := _value_type(annotation)) is not None:  # a key of a dict field (pools.gpu)
            parts.append(part)
            annotation = value
        elif model is not None:
            parts.append(part)
            field = model.model_fields.get(part)
            annotation = field.annotation if field else None
            if field is None and (close := difflib.get_close_matches(part, list(model.model_fields), n=1)):
                hint = f"; did you mean {close[0]!r}?"
    return ".".join(str(p) for p in parts) or "<top level>", tuple(parts), hint


def _line_of(node: yaml.Node | None, loc: tuple[str | int, ...]) -> int | None:
    """1-based line of the deepest YAML node along ``loc`` (an unknown key points at the key)."""
    line = None
    for depth, part in enumerate(loc, 1):
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
            node = pair[1] if pair else None
            if pair and depth == len(loc):
                return pair[0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            node = None
    return node.start_mark.line + 1 if node is not None else line


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_MAX else text[: _REPR_MAX - 3] + "..."


def _format_errors(exc: ValidationError, root: yaml.Node | None = None) -> list[str]:
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        loc, value, message = tuple(err["loc"]), err.get("input"), err["msg"]
        if err["type"] == "alflow":
            loc, value = loc + tuple(err["ctx"]["subloc"]), err["ctx"]["got"]
        path, clean, hint = _clean_loc(loc)
        message = message.removeprefix("Value error, ") + hint
        line = f"{path}: {message}" if err["type"] == "missing" else f"{path}: {message} (got {_short(value)})"
        if root is not None and (n := _line_of(root, clean)) is not None:
            line += f" [line {n}]"
        if line not in lines:
            lines.append(line)
    return lines


def _substitute_env(data: dict[str, Any], source: str,
                    root: yaml.Node | None) -> tuple[dict[str, Any], dict[tuple[str | int, ...], tuple[str, str]]]:
    """``${ENV_VAR}`` references (``alflow.secrets``): replaced by the variable's value, except under
    ``ENV_KEPT`` (oracle parameters), where they stay and are expanded only when the oracle is built.

    Returns the substituted data and ``{field path: (text as written, text substituted)}``, so that
    ``config_to_yaml`` writes the reference back, never the value. A variable that is not set is a
    ``ConfigError`` naming the field, the variable and the line.
    """
    from alflow.secrets import MissingEnvVar, expand_env

    placeholders: dict[tuple[str | int, ...], tuple[str, str]] = {}
    errors: list[str] = []

    def walk(value: Any, loc: tuple[str | int, ...]) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*loc, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*loc, i)) for i, v in enumerate(value)]
        if not isinstance(value, str) or "$" not in value:
            return value
        dotted = ".".join(str(p) for p in loc)
        try:
            expanded = expand_env(value, dotted)
        except MissingEnvVar as err:
            line = _line_of(root, loc) if root is not None else None
            errors.append(f"{err}{f' [line {line}]' if line is not None else ''}")
            return value
        if loc[:2] in ENV_KEPT:
            return value
        if expanded != value:
            placeholders[loc] = (value, expanded)
        return expanded

    out = walk(data, ())
    if errors:
        head = f"{source}: invalid configuration ({len(errors)} error{'s' * (len(errors) != 1)})"
        raise ConfigError("\n  ".join([head, *errors]), errors=errors, path=source)
    return out, placeholders


def _validate(data: Any, base_dir: Path, source: str, root: yaml.Node | None = None) -> RunConfig:
    if not isinstance(data, dict):
        where = f" [line {root.start_mark.line + 1}]" if root is not None else ""
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}{where}", path=source)
    data, placeholders = _substitute_env(data, source, root)
    try:
        cfg = RunConfig.model_validate(data, context={"base_dir": base_dir})
        cfg._env_placeholders = placeholders
        return cfg
    except ValidationError as exc:
        errors = _format_errors(exc, root)
        head = f"{source}: invalid configuration ({len(errors)} error{'s' * (len(errors) != 1)})"
        raise ConfigError("\n  ".join([head, *errors]), errors=errors, path=source) from None


def config_from_dict(data: dict[str, Any], base_dir: str | Path | None = None) -> RunConfig:
    """Validate a mapping; relative paths are resolved against ``base_dir`` (default: working dir)."""
    base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    return _validate(data, base, "<dict>")


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Number of nodes of the document with every alias expanded (memoized: linear in the distinct nodes).

    Raises ``ValueError`` above ``limit`` nodes or for an alias that contains itself.
    """
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise ValueError(f"an alias refers to a node that contains it [line {node.start_mark.line + 1}]")
        busy.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        busy.discard(key)
        if total > limit:
            raise ValueError(f"more than {limit} values once aliases are expanded (nested aliases? "
                             f"[line {node.start_mark.line + 1}])")
        sizes[key] = total
        return total

    return size(root)


def config_digest(path: str | Path) -> str:
    """sha256 (hex) of the config file's bytes: what ``alflow deploy --pin-config`` pins."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})", path=path) from None


def check_config_location(path: str | Path, allowed: str | None = None) -> Path:
    """``path`` (resolved, symlinks followed) when it lies in an allowed directory, else ``ConfigError``.

    ``allowed``: directories separated by ``os.pathsep`` (default ``$ALFLOW_CONFIG_DIR``); unset or
    empty allows every path. A deployed flow calls this before it reads the config (docs/security.md).
    """
    real = Path(os.path.realpath(path))
    allowed = os.environ.get(CONFIG_DIR_ENV, "") if allowed is None else allowed
    dirs = [Path(os.path.realpath(d)) for d in allowed.split(os.pathsep) if d]
    if dirs and not any(real.is_relative_to(d) for d in dirs):
        raise ConfigError(f"config_path {path}: not inside an allowed directory ({CONFIG_DIR_ENV}="
                          f"{os.pathsep.join(map(str, dirs))}); this deployment runs only configs from there",
                          path=path)
    return real


def load_config(path: str | Path, *, sha256: str | None = None) -> RunConfig:
    """Read and validate a YAML run configuration; raises ``ConfigError`` listing every problem.

    ``sha256``: the hex digest the file's bytes must have (a pinned deployment); the bytes
    checked are the bytes parsed.

    The file may hold at most ``MAX_CONFIG_BYTES`` bytes and ``MAX_CONFIG_NODES``
    values with aliases expanded, so a hostile file fails at once instead of
    expanding to gigabytes during validation.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})", path=path) from None
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256.strip().lower():
        raise ConfigError(f"{path}: content (sha256 {hashlib.sha256(raw).hexdigest()}) differs from the pinned "
                          f"sha256 {sha256}; this deployment runs only the config it was deployed with "
                          "(redeploy with `alflow deploy --pin-config` to change it)", path=path)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; a run configuration is a few kB "
                          "(is this the right file?)", path=path)
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})", path=path) from None
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            try:
                _expanded_size(root, MAX_CONFIG_NODES)
            except (ValueError, RecursionError) as exc:
                why = str(exc) if isinstance(exc, ValueError) else "aliases nested too deeply"
                raise ConfigError(f"{path}: too large a configuration: {why}", path=path) from None
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: YAML syntax error: {problem}", path=path) from None
    finally:
        loader.dispose()
    return _validate(data, path.resolve().parent, str(path), root)


def config_to_yaml(cfg: RunConfig) -> str:
    """The configuration, defaults included, as YAML text; ``${ENV_VAR}`` references as written, not their values."""
    data = cfg.model_dump(mode="json")
    for loc, (written, substituted) in cfg._env_placeholders.items():
        node: Any = data
        for part in loc[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        try:
            current = node[loc[-1]] if node is not None else None
        except (KeyError, IndexError, TypeError):
            continue
        # a string the validation changed (a path made absolute) is no secret: keep what was validated
        if current is not None and (not isinstance(current, str) or current == substituted):
            node[loc[-1]] = written
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def dump_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (paths are absolute, so ``load_config`` gives back an equal config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# alflow run configuration '{cfg.name}' (all defaults resolved)\n" + config_to_yaml(cfg))
    return path


def json_schema() -> dict[str, Any]:
    """JSON schema of ``RunConfig`` (e.g. for editor completion of YAML files)."""
    schema = RunConfig.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "alflow run configuration"}
