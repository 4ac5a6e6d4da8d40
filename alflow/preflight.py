"""Checks of a run configuration against this machine and its files, before anything is spent.

``load_config`` checks the configuration on its own (types, ranges, NaN/inf, field names);
``preflight(config)`` checks what only the machine and the files can tell, so that
``alflow validate`` and the start of ``alflow run`` fail before the first oracle call
instead of after the initial set is labelled:

- ``potential.architecture`` / ``potential.hparams``: the names against the architecture's
  own constructor (``potentials.get_class(name).hparam_names()``), then one model built with
  the run's species and cutoff (bad values fail here); no NaN/inf anywhere in the values;
- ``potential.checkpoint``: a readable alflow model file that matches the potential section
  (architecture, hyperparameters, cutoff) and covers the run's species;
- ``potential.foundation``: readable (a ``.model`` only with ``trusted``), knows the run's species,
  every ``freeze`` prefix names parameters of it (``alflow.foundation``);
- ``system.structures``: files that exist and parse; ``system.initial_dataset``: a file that
  exists, parses and holds frames the dataset accepts (``alflow.io.validate_frame``);
- ``system``: at least 2 frames for the first training (initial dataset plus rattled frames);
- ``exploration``: the walkers' start structures can be prepared (vacancy, surface, strain);
  i-PI is installed for ``engine: ipi``;
- ``loop.gates``: each gate's structure exists, parses, has only the run's elements, and the gate
  builds its structures from it (``alflow.gates``);
- ``labelling``: the oracle can run here (module installed, executable on PATH:
  ``alflow.oracles.missing_requirement``); no NaN/inf in its parameters;
- ``execution.device``: usable here (``alflow.devices.resolve_device``).

The oracle and device checks apply when the stages run on this machine (every task runner
but Dask with a scheduler address, whose workers may have other codes and devices).
Every problem is listed, each naming its field, in one :class:`alflow.config.ConfigError` (exit 2).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from alflow.config import ConfigError, RunConfig

_DONE: set[str] = set()  # configs already checked in this process (the run command, then the flow)


def _non_finite(value: Any, where: str) -> list[str]:
    """``where.key: expected a finite number`` for every NaN/inf float inside nested dicts/lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{where}: expected a finite number (got {value!r})"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, f"{where}.{k}")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _non_finite(v, f"{where}.{i}")]
    return []


def runs_here(config: RunConfig) -> bool:
    """Whether the stages run on this machine (not on the workers of a remote Dask scheduler)."""
    return not (config.execution.task_runner == "dask" and config.execution.resolved_cluster.kind != "local")


def _structures(config: RunConfig, problems: list[str]) -> list[Any]:
    from alflow.explore.runner import system_structures

    for i, path in enumerate(config.system.structures or []):
        if not Path(path).is_file():
            problems.append(f"system.structures.{i}: {path}: no such file")
    if any(p.startswith("system.structures") for p in problems):
        return []
    try:
        return system_structures(config.system)
    except Exception as err:  # noqa: BLE001 - any reader error is a bad structure file
        problems.append(f"system.structures: cannot read: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
        return []


def _exploration(config: RunConfig, structures: list[Any], problems: list[str]) -> None:
    """The walkers' start structures can be prepared; i-PI is installed when a walker runs there."""
    import shutil
    import sys

    if structures:
        from alflow.explore.runner import walker_starts

        try:
            with warnings.catch_warnings():  # spglib/pymatgen deprecation notes: not the user's concern here
                warnings.simplefilter("ignore")
                starts = walker_starts(config, structures)
        except Exception as err:  # noqa: BLE001 - a start (vacancy, surface, strain) this structure cannot take
            problems.append(f"exploration.walkers: cannot prepare the start structures ({type(err).__name__}: {err})")
            starts = []
        walkers = config.exploration.walkers
        for walker, atoms, _seed, name in starts:
            if len(atoms) == 0:
                index = next(k for k, w in enumerate(walkers) if w is walker)
                problems.append(f"exploration.walkers.{index}.start: {walker.start!r} leaves no atoms in walker "
                                f"{name}; use a larger cell (system.supercell)")
    if config.exploration.engine == "ipi" and runs_here(config):
        if shutil.which("i-pi") is None and not (Path(sys.executable).parent / "i-pi").is_file():
            problems.append("exploration.engine: 'ipi' needs i-PI's `i-pi` command (pip install ipi), not found here")


def _enough_data(config: RunConfig, n_dataset: int, problems: list[str]) -> None:
    """Training needs 2 frames: the initial dataset plus the rattled frames must be able to give them."""
    rattle = config.system.initial_rattle
    n = n_dataset + (rattle.n_frames if rattle is not None else 0)
    if config.system.initial_from_foundation is not None:
        n += config.system.initial_from_foundation.n_frames
    if n < 2:
        problems.append(f"system: the initial dataset can have at most {n} frame(s) ({n_dataset} in initial_dataset, "
                        f"{rattle.n_frames if rattle is not None else 0} from initial_rattle); training needs at "
                        "least 2: set system.initial_dataset or raise system.initial_rattle.n_frames")


def _initial_dataset(config: RunConfig, problems: list[str]) -> tuple[set[int], int]:
    from alflow.io import read_frames, validate_frame

    path = config.system.initial_dataset
    if path is None:
        return set(), 0
    if not Path(path).exists():
        problems.append(f"system.initial_dataset: {path}: no such file")
        return set(), 2  # reported as missing; not also as too small
    try:
        frames = read_frames(path)
    except Exception as err:  # noqa: BLE001
        problems.append(f"system.initial_dataset: {path}: cannot read ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
        return set(), 2
    if not frames:
        problems.append(f"system.initial_dataset: {path}: no frames")
    for i, atoms in enumerate(frames):  # the checks the dataset makes on import, before anything is spent
        try:
            validate_frame(atoms, f"system.initial_dataset: {path}, frame {i}")
        except ValueError as err:
            problems.append(str(err))
            return set(), 2
    return {int(z) for a in frames for z in a.numbers}, len(frames)


def _potential(config: RunConfig, species: list[int], problems: list[str]) -> None:
    import potentials

    pot = config.potential
    if config.system.initial_from_foundation is not None and pot.foundation is None:
        problems.append("system.initial_from_foundation: needs potential.foundation (the model that explores)")
    if pot.foundation is not None:  # the foundation's architecture and hparams replace the section's
        _foundation(config, species, problems)
        return
    problems += _non_finite(pot.hparams, "potential.hparams")
    try:
        allowed = potentials.get_class(pot.architecture).hparam_names()
    except Exception as err:  # noqa: BLE001 - an architecture whose module cannot be imported here
        problems.append(f"potential.architecture: {pot.architecture!r} cannot be loaded here ({err})")
        return
    unknown = sorted(set(pot.hparams) - set(allowed))
    if unknown:
        problems.append(f"potential.hparams: unknown hyperparameter(s) {', '.join(unknown)} for {pot.architecture!r}; "
                        f"allowed: {', '.join(allowed) or '(none)'}")
        return
    if any(p.startswith("potential.hparams") for p in problems):
        return
    try:
        with warnings.catch_warnings():  # e3nn's TorchScript notes on building MACE: not the user's concern here
            warnings.simplefilter("ignore")
            model = potentials.build(pot.architecture, species or [1], pot.cutoff, **pot.hparams)
    except Exception as err:  # noqa: BLE001 - a bad value: its own message
        problems.append(f"potential.hparams: {pot.architecture!r} cannot be built with these values "
                        f"({type(err).__name__}: {err})")
        return
    if pot.checkpoint is not None:
        _checkpoint(config, model, species, problems)


def _foundation(config: RunConfig, species: list[int], problems: list[str]) -> None:
    """``potential.foundation``: readable (trusted for a .model), knows the run's species, freeze prefixes exist."""
    from alflow.foundation import check_freeze, check_species, load_foundation, readout_parameters

    pot = config.potential
    if config.committee.kind != "full":
        problems.append(f"committee.kind: {config.committee.kind!r} cannot start from potential.foundation (its members "
                        "are copies of the foundation); use kind: full")
    try:
        model = load_foundation(pot.foundation, trusted=pot.trusted)
        check_species(model, species)
        check_freeze(model, pot.freeze)
        if pot.reinit_readout and not readout_parameters(model):
            problems.append(f"potential.reinit_readout: architecture {model.architecture!r} has no parameter named "
                            "*readout*; set reinit_readout: false")
    except ConfigError as err:
        problems.append(str(err))


def _checkpoint(config: RunConfig, model: Any, species: list[int], problems: list[str]) -> None:
    from potentials.registry import metadata, read_checkpoint

    path = config.potential.checkpoint
    if not Path(path).is_file():
        problems.append(f"potential.checkpoint: {path}: no such model file")
        return
    try:
        payload = read_checkpoint(path, device="cpu")
    except Exception as err:  # noqa: BLE001 - CheckpointError names the file
        problems.append(f"potential.checkpoint: {err}")
        return
    meta = payload["metadata"]
    metas = meta.get("members", []) if payload.get("kind") == "committee" else [meta]
    if not metas:
        problems.append(f"potential.checkpoint: {path}: a committee without members")
        return
    want = metadata(model)
    diffs = [f"{key} {metas[0].get(key)!r} in the file, {want[key]!r} in the configuration"
             for key in ("architecture", "hparams", "cutoff") if metas[0].get(key) != want[key]]
    if diffs:
        problems.append(f"potential.checkpoint: {path} does not match the potential section ({'; '.join(diffs)})")
    elif species and set(species) - set(metas[0].get("species", [])):
        from ase.data import chemical_symbols

        missing = sorted(set(species) - set(metas[0].get("species", [])))
        problems.append(f"potential.checkpoint: {path} has no weights for element(s) "
                        f"{', '.join(chemical_symbols[z] for z in missing)} of this run")


def _labelling(config: RunConfig, problems: list[str]) -> None:
    from alflow.oracles import missing_requirement

    lab = config.labelling
    problems += _non_finite(lab.parameters, "labelling.parameters")
    problems += _non_finite(lab.fallback_parameters, "labelling.fallback_parameters")
    if runs_here(config) and (problem := missing_requirement(lab.oracle, lab.parameters)):
        problems.append(f"labelling.oracle: {problem}")


def _device(config: RunConfig, problems: list[str]) -> None:
    from alflow.devices import resolve_device
    from alflow.errors import DeviceError

    if not runs_here(config):
        return
    try:
        resolve_device(config.execution.device, what="execution.device")
    except DeviceError as err:
        problems.append(str(err))


def _gates(config: RunConfig, species: set[int], problems: list[str]) -> None:
    """Each configured gate's structure (``loop.gates.<gate>.structure``) exists, parses, has only the run's elements,
    and the gate can build its structures from it (alflow.gates)."""
    from alflow import gates
    from alflow.explore.runner import system_structures
    from alflow.explore.structures import read_structure

    for name, spec in config.loop.gates.configured().items():
        where = f"loop.gates.{name}.structure"
        try:
            if spec.structure is not None and not Path(spec.structure).is_file():
                problems.append(f"{where}: {spec.structure}: no such file")
                continue
            atoms = read_structure(spec.structure) if spec.structure is not None else system_structures(config.system)[0]
            extra = sorted({int(z) for z in atoms.numbers} - species)
            if extra:
                problems.append(f"{where}: elements {extra} (atomic numbers) are not in the system structures or the "
                                "initial dataset, so the committee cannot evaluate them")
                continue
            gates.structures(name, spec, atoms)
        except Exception as err:  # noqa: BLE001 - any reason the gate cannot start is reported with its field
            problems.append(f"{where}: cannot build the {name} gate's structures ({type(err).__name__}: {err})")


def problems(config: RunConfig) -> list[str]:
    """Every problem ``preflight`` finds, one line each naming its field (empty: nothing found)."""
    found: list[str] = []
    run_dir = Path(config.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        found.append(f"run_dir: {run_dir} exists and is not a directory")
    elif (parent := next((p for p in run_dir.parents if p.exists()), None)) is not None and not parent.is_dir():
        found.append(f"run_dir: {parent} (a parent of {run_dir}) is not a directory")
    structures = _structures(config, found)
    dataset_species, n_dataset = _initial_dataset(config, found)
    _enough_data(config, n_dataset, found)
    species = {int(z) for s in structures for z in s.numbers} | dataset_species
    _potential(config, sorted(species), found)
    _exploration(config, structures, found)
    if structures:
        _gates(config, species, found)
    _labelling(config, found)
    _device(config, found)
    return found


def preflight(config: RunConfig, source: str | Path | None = None) -> None:
    """Raise one ConfigError listing every problem (module docstring); a config checked before passes at once."""
    key = config.model_dump_json()
    if key in _DONE:
        return
    found = problems(config)
    if found:
        where = source or config.name
        head = f"{where}: cannot run here ({len(found)} problem{'s' * (len(found) != 1)}; nothing was computed)"
        raise ConfigError("\n  ".join([head, *found]), errors=found, path=source)
    _DONE.add(key)
