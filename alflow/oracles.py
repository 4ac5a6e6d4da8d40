"""Oracles: the reference calculators that label frames, built by name, plus the k-point convention.

An oracle is any ASE calculator. Built-in names (``build_calculator``), one row each in
``ORACLES`` (the one table: config literals, CLI help, dispatch, availability checks and the
``docs/labelling.md`` table, tied by a test, derive from it):

==========  =========  ==============================================================
name        source     defaults (override any key with ``parameters``)
==========  =========  ==============================================================
emt         reference  ``ase.calculators.emt.EMT`` (toy metal potential; tests)
gpaw        dft        PW(500 eV), PBE, Fermi-Dirac 0.05 eV, energy 1e-6 eV/electron;
                       stress only in PW mode (never requested in LCAO/FD mode)
espresso    dft        pw.x, PBE pseudopotentials from /usr/share/espresso/pseudo,
                       ecutwfc 40 Ry, ecutrho 8x, MV smearing 0.01 Ry, conv_thr 1e-8 Ry
cp2k        dft        cp2k_shell, PBE, DZVP-MOLOPT-SR-GTH + GTH-PBE, CUTOFF 400 Ry,
                       REL_CUTOFF 60 Ry, Fermi-Dirac 300 K with ADDED_MOS, Broyden mixing
xtb         reference  tblite GFN2-xTB, Γ-only, periodic with stress
chgnet      teacher    CHGNet pretrained weights shipped in the wheel
sevenn      teacher    SevenNet-0 weights shipped in the wheel
model       teacher    ``model_path``: an alflow checkpoint or a trusted MACE ``.model``
                       (the dry run: labels from a model, e.g. the foundation)
vasp        dft        ase Vasp: PBE, ENCUT 520, EDIFF 1e-6, ISMEAR 0 / SIGMA 0.05
module:Cls  reference  any ASE calculator class, ``Cls(**parameters)``
==========  =========  ==============================================================

Label source: "dft" for DFT codes, "teacher" for pretrained universal
potentials (never to be mistaken for DFT), "reference" for the rest.

k-points (``kpoint_grid``): density rho in points per Å⁻¹, reciprocal vectors
b_i with the 2π (b_i · a_j = 2π δ_ij): n_i = max(1, ceil(rho |b_i|)) along
periodic directions, 1 along non-periodic ones -- ASE's ``kptdensity``
convention. Every code gets a Γ-centred grid (GPAW ``gamma=True``, QE
``koffset 0 0 0``, CP2K an explicit list of Γ-centred points, VASP
``gamma=True``), so one config means the same sampling in every code. xtb is
Γ-only. ``kpoint_density=None`` means ``DEFAULT_KPOINT_DENSITY``; an explicit
``kpts`` in ``parameters`` wins over both.

Energy label: the force-consistent (free) energy where the code reports one,
so REF_forces = -dE/dR and REF_stress = dE/dε / V hold for REF_energy.
"""

from __future__ import annotations

import copy
import glob
import importlib
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, ground_state_magnetic_moments
from alflow.errors import InputError
from alflow.secrets import MissingEnvVar, expand_env

DEFAULT_KPOINT_DENSITY = 3.5  # points per Å⁻¹ (ASE's default kptdensity)
ESPRESSO_PSEUDO_DIR = "/usr/share/espresso/pseudo"
CP2K_DATA_DIR = "/usr/share/cp2k/data"
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


class OracleError(InputError):
    """Unknown oracle or unusable parameters; the message names the oracle and the parameter."""


class ScfNotConverged(RuntimeError):
    """The code finished without a converged self-consistent field."""


def source_of(oracle: str) -> str:
    """Label source of an oracle: "dft", "teacher" or "reference"."""
    return SOURCES.get(oracle.lower(), "reference")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``base`` with ``override`` merged in, nested dicts merged key by key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ------------------------------------------------------------------------------------- k-points
def kpoint_grid(cell: Any, pbc: Any, density: float | None) -> tuple[int, int, int]:
    """Γ-centred grid sizes for ``density`` points per Å⁻¹ (module docstring); (1, 1, 1) for None/non-periodic."""
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    if density is None or not pbc.any():
        return (1, 1, 1)
    cell = np.asarray(cell, dtype=float)
    full = cell.copy()
    for i in range(3):  # non-periodic directions may have a zero vector: fill with a unit normal
        if not pbc[i] or np.linalg.norm(full[i]) == 0:
            full[i] = 0.0
    if abs(np.linalg.det(full)) < 1e-12:
        q, _ = np.linalg.qr(full[pbc].T, mode="complete")
        for k, i in enumerate(np.flatnonzero(~pbc)):
            full[i] = q[:, int(pbc.sum()) + k]
    recip = 2.0 * math.pi * np.linalg.inv(full).T  # rows b_i, b_i · a_j = 2π δ_ij
    return tuple(max(1, math.ceil(density * np.linalg.norm(recip[i]) - 1e-9)) if pbc[i] else 1 for i in range(3))


def gamma_centred_points(grid: tuple[int, int, int]) -> list[tuple[tuple[float, float, float], float]]:
    """Fractional Γ-centred grid points (in (-1/2, 1/2]) reduced by time reversal k ≡ -k, with weights."""
    pts: dict[tuple[float, ...], float] = {}
    for idx in np.ndindex(*grid):
        k = tuple(((i / n + 0.5) % 1.0) - 0.5 if n > 1 else 0.0 for i, n in zip(idx, grid))
        k = tuple(0.5 if abs(x + 0.5) < 1e-12 else round(x, 12) for x in k)
        minus = tuple(0.5 if abs(-x + 0.5) < 1e-12 or abs(-x - 0.5) < 1e-12 else round(-x, 12) for x in k)
        key = k if minus not in pts else minus
        pts[key] = pts.get(key, 0.0) + 1.0
    total = sum(pts.values())
    return [(k, w / total) for k, w in pts.items()]


def _is_3d(atoms: Atoms) -> bool:
    return bool(np.all(atoms.pbc))


def _grid(atoms: Atoms, density: float | None, gamma_only: bool) -> tuple[int, int, int]:
    if gamma_only:
        return (1, 1, 1)
    return kpoint_grid(atoms.cell, atoms.pbc, DEFAULT_KPOINT_DENSITY if density is None else density)


# ------------------------------------------------------------------------------------- builders
def _emt(p: dict, atoms: Atoms, density: float | None, directory: Path, gamma_only: bool) -> tuple[Any, bool]:
    from ase.calculators.emt import EMT

    return EMT(**p), True


def _gpaw(p: dict, atoms: Atoms, density: float | None, directory: Path, gamma_only: bool) -> tuple[Any, bool]:
    from gpaw import GPAW

    defaults = {
        "mode": {"name": "pw", "ecut": 500.0},
        "xc": "PBE",
        "occupations": {"name": "fermi-dirac", "width": 0.05},
        "convergence": {"energy": 1e-6, "density": 1e-5},
        "txt": str(directory / LOG_FILES["gpaw"]),
    }
    params = deep_merge(defaults, p)
    if "kpts" not in p:
        params["kpts"] = {"size": _grid(atoms, density, gamma_only), "gamma": True}
    if len(atoms) == 1 and np.any(atoms.get_initial_magnetic_moments()):
        params.setdefault("hund", True)
    mode = params["mode"]
    mode_name = mode if isinstance(mode, str) else mode.get("name", "") if isinstance(mode, dict) else getattr(mode, "name", "")
    return GPAW(**params), str(mode_name).lower() == "pw"  # stress is implemented in PW mode only


def _pseudopotentials(symbols: set[str], pseudo_dir: str) -> dict[str, str]:
    files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(pseudo_dir, "*")) if f.lower().endswith(".upf"))
    out = {}
    for sym in sorted(symbols):
        mine = [f for f in files if re.match(rf"^{sym}[._-]", f, flags=re.IGNORECASE)]
        if not mine:
            raise OracleError(f"espresso: no pseudopotential for {sym} in {pseudo_dir}; "
                              f"pass parameters.pseudopotentials={{'{sym}': 'file.UPF'}} and parameters.pseudo_dir")
        pbe = [f for f in mine if "pbe" in f.lower()]
        out[sym] = (pbe or mine)[0]
    return out


def _espresso(p: dict, atoms: Atoms, density: float | None, directory: Path, gamma_only: bool) -> tuple[Any, bool]:
    from ase.calculators.espresso import Espresso, EspressoProfile

    p = dict(p)
    pseudo_dir = p.pop("pseudo_dir", os.environ.get("ESPRESSO_PSEUDO", ESPRESSO_PSEUDO_DIR))
    command = p.pop("command", "pw.x")
    command = shell_free_command(command, "labelling.parameters.command").removeprefix("exec ")  # ASE splits it
    pseudos = p.pop("pseudopotentials", None) or _pseudopotentials(set(atoms.get_chemical_symbols()), pseudo_dir)
    user = deep_merge(p.pop("input_data", {}) or {}, {k: p.pop(k) for k in list(p)
                                                   if k in ("control", "system", "electrons", "ions", "cell")})
    ecut = float(user.get("system", {}).get("ecutwfc", p.pop("ecutwfc", 40.0)))
    defaults = {
        "control": {"calculation": "scf", "tprnfor": True, "tstress": _is_3d(atoms), "outdir": "./out",
                    "disk_io": "none"},
        "system": {"ecutwfc": ecut, "ecutrho": 8.0 * ecut, "occupations": "smearing", "smearing": "mv",
                   "degauss": 0.01},
        "electrons": {"conv_thr": 1e-8, "mixing_beta": 0.4, "electron_maxstep": 200},
    }
    input_data = deep_merge(defaults, user)
    kpts = p.pop("kpts", _grid(atoms, density, gamma_only))
    profile = EspressoProfile(command=command, pseudo_dir=pseudo_dir)
    calc = Espresso(profile=profile, directory=str(directory), pseudopotentials=pseudos, input_data=input_data,
                    kpts=kpts, koffset=(0, 0, 0), **p)
    return calc, _is_3d(atoms)


CP2K_INPUT = """&FORCE_EVAL
  &DFT
    &MGRID
      REL_CUTOFF {rel_cutoff}
      NGRIDS 4
    &END MGRID
    &QS
      EPS_DEFAULT {eps_default}
    &END QS
    &SCF
      EPS_SCF {eps_scf}
      SCF_GUESS ATOMIC
      ADDED_MOS {added_mos}
      &SMEAR ON
        METHOD FERMI_DIRAC
        ELECTRONIC_TEMPERATURE [K] {temperature}
      &END SMEAR
      &DIAGONALIZATION ON
        ALGORITHM STANDARD
      &END DIAGONALIZATION
      &MIXING
        METHOD BROYDEN_MIXING
        ALPHA {alpha}
        NBROYDEN 8
      &END MIXING
    &END SCF
{kpoints}  &END DFT
&END FORCE_EVAL
"""


def cp2k_kpoints_section(grid: tuple[int, int, int]) -> str:
    """CP2K &KPOINTS as an explicit Γ-centred list (SCHEME GENERAL); empty for Γ-only (Γ-point code path)."""
    if tuple(grid) == (1, 1, 1):
        return ""
    lines = ["    &KPOINTS", "      SCHEME GENERAL", "      SYMMETRY OFF", "      FULL_GRID ON"]
    lines += [f"      KPOINT {k[0]:.12f} {k[1]:.12f} {k[2]:.12f} {w:.12f}" for k, w in gamma_centred_points(grid)]
    return "\n".join(lines + ["    &END KPOINTS", ""])


def _cp2k(p: dict, atoms: Atoms, density: float | None, directory: Path, gamma_only: bool) -> tuple[Any, bool]:
    from ase.calculators.cp2k import CP2K
    from ase.units import Rydberg

    p = dict(p)
    if os.path.isdir(CP2K_DATA_DIR):
        os.environ.setdefault("CP2K_DATA_DIR", CP2K_DATA_DIR)
    settings = {"rel_cutoff": p.pop("rel_cutoff", 60), "eps_scf": p.pop("eps_scf", 1e-7),
                "eps_default": p.pop("eps_default", 1e-12),
                "temperature": p.pop("electronic_temperature", 300.0), "alpha": p.pop("mixing_alpha", 0.2),
                "added_mos": p.pop("added_mos", max(10, 2 * len(atoms)))}
    grid = tuple(p.pop("kpts")) if "kpts" in p else _grid(atoms, density, gamma_only)
    inp = p.pop("inp", None) or CP2K_INPUT.format(kpoints=cp2k_kpoints_section(grid), **settings)
    defaults = {"command": "cp2k_shell", "xc": "PBE", "basis_set": "DZVP-MOLOPT-SR-GTH",
                "basis_set_file": "BASIS_MOLOPT", "potential_file": "GTH_POTENTIALS", "pseudo_potential": "GTH-PBE",
                "cutoff": 400 * Rydberg, "max_scf": 200, "stress_tensor": _is_3d(atoms), "print_level": "LOW"}
    moments = atoms.get_initial_magnetic_moments()
    if np.any(moments):
        defaults.update(uks=True, multiplicity=int(round(abs(moments.sum()))) + 1)
    params = {**defaults, **p, "inp": inp}
    params["command"] = shell_free_command(params["command"], "labelling.parameters.command")  # ASE uses a shell
    return CP2K(label=str(directory / "cp2k"), **params), _is_3d(atoms)


def _xtb(p: dict, atoms: Atoms, density: float | None, directory: Path, gamma_only: bool) -> tuple[Any, bool]:
    from tblite.ase import TBLite

    params = {"method": "GFN2-xTB", "max_iterations": 250, "electronic_temperature": 300.0, "verbosity": 0, **p}
    return TBLite(**params), _is_3d(atoms)  # unpaired electrons from the initial magnetic moments


def _chgnet(p: dict, atoms: Atoms, density: float | None, directory: Path, gamma_only: bool) -> tuple[Any, bool]:
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    p = dict(p)
    model = CHGNet.load(model_name=p.pop("model_name", "0.3.0"), use_device=p.get("use_device", "cpu"), verbose=False)
    return CHGNetCalculator(model=model, **{"use_device": "cpu", **p}), _is_3d(atoms)


def _sevenn(p: dict, atoms: Atoms, density: float | None, directory: Path, gamma_only: bool) -> tuple[Any, bool]:
    from sevenn.calculator import SevenNetCalculator

    return SevenNetCalculator(**{"model": "7net-0", "device": "cpu", **p}), _is_3d(atoms)


def _model(p: dict, atoms: Atoms, density: float | None, directory: Path, gamma_only: bool) -> tuple[Any, bool]:
    """A model instead of DFT (the dry run, docs/foundation.md): ``model_path`` an alflow checkpoint (potential or
    committee: its mean) or a MACE ``.model`` file with ``trusted: true``; ``device`` (default cpu)."""
    from alflow.calculator import AlflowCalculator

    p = dict(p)
    path, trusted, device = p.pop("model_path", None), bool(p.pop("trusted", False)), p.pop("device", "cpu")
    if path is None or p:
        raise OracleError(f"oracle 'model': expected parameters model_path (and optionally trusted, device); "
                          f"got {sorted([*p, *(['model_path'] if path else [])])}")
    if str(path).endswith(".model"):
        from alflow.foundation import load_foundation

        try:
            model = load_foundation(path, trusted=trusted, where="labelling.parameters.model_path")
        except InputError as err:
            raise OracleError(str(err)) from None
    elif not Path(path).is_file():
        raise OracleError(f"oracle 'model': labelling.parameters.model_path {path}: no such model file")
    else:
        model = path
    return AlflowCalculator(model, device=device), _is_3d(atoms)


def _vasp(p: dict, atoms: Atoms, density: float | None, directory: Path, gamma_only: bool) -> tuple[Any, bool]:
    from ase.calculators.vasp import Vasp

    defaults = {"xc": "PBE", "encut": 520, "ediff": 1e-6, "ismear": 0, "sigma": 0.05, "prec": "Accurate",
                "lreal": False, "lwave": False, "lcharg": False, "isym": 0, "nelm": 200}
    if "kpts" not in p:
        defaults.update(kpts=_grid(atoms, density, gamma_only), gamma=True)
    if np.any(atoms.get_initial_magnetic_moments()):
        defaults["ispin"] = 2
    if p.get("command") is not None:  # ASE runs it with shell=True
        p = {**p, "command": shell_free_command(p["command"], "labelling.parameters.command")}
    return Vasp(directory=str(directory), **{**defaults, **p}), _is_3d(atoms)


@dataclass(frozen=True)
class Oracle:
    """One built-in oracle: how to build it, what it needs, where its log goes."""

    name: str
    source: str  # label source: "dft", "teacher" or "reference"
    build: Callable[..., tuple[Any, bool]]  # (parameters, atoms, kpoint density, directory, gamma_only) -> (calc, stress?)
    module: str | None = None  # Python module it imports (availability check, code version)
    executable: str | None = None  # default command, checked on PATH (parameters["command"] overrides it)
    log_file: str | None = None  # the code's own output file in the task directory
    env_command: tuple[str, ...] = ()  # environment variables that hold the command instead (vasp)


# The one table of built-in oracles (module docstring). Add a row here and a row in docs/labelling.md.
ORACLES: dict[str, Oracle] = {o.name: o for o in (
    Oracle("emt", "reference", _emt, module="ase"),
    Oracle("gpaw", "dft", _gpaw, module="gpaw", log_file="gpaw.txt"),
    Oracle("espresso", "dft", _espresso, executable="pw.x", log_file="espresso.pwo"),
    Oracle("cp2k", "dft", _cp2k, executable="cp2k_shell", log_file="cp2k.out"),
    Oracle("xtb", "reference", _xtb, module="tblite"),
    Oracle("chgnet", "teacher", _chgnet, module="chgnet"),
    Oracle("sevenn", "teacher", _sevenn, module="sevenn"),
    Oracle("model", "teacher", _model, module="torch"),
    Oracle("vasp", "dft", _vasp, log_file="OUTCAR", env_command=("ASE_VASP_COMMAND", "VASP_COMMAND", "VASP_SCRIPT")),
)}
BUILTIN = tuple(ORACLES)
SOURCES = {name: o.source for name, o in ORACLES.items()}
LOG_FILES = {name: o.log_file for name, o in ORACLES.items() if o.log_file}
BUILDERS = {name: o.build for name, o in ORACLES.items()}


def missing_requirement(oracle: str, parameters: dict[str, Any] | None = None) -> str | None:
    """Why ``oracle`` cannot run on this machine (a module that is not installed, a command not on PATH), or None.

    Cheap (no import of the code itself, nothing is calculated). ``worker_pythonpath`` in ``parameters``
    (a teacher installed elsewhere) skips the module check: the label worker imports from there.
    """
    import importlib.util
    import shlex
    import shutil

    parameters = parameters or {}
    spec = ORACLES.get(oracle.lower())
    if spec is None and "worker_pythonpath" in parameters:
        return None  # the class is importable in the worker only (its own import path)
    if spec is None:
        try:
            import_class(oracle)
        except OracleError as err:
            return str(err)
        return None
    if spec.module and "worker_pythonpath" not in parameters:
        try:
            found = importlib.util.find_spec(spec.module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"oracle {spec.name!r}: Python module {spec.module!r} is not installed (see docs/labelling.md)"
    command = parameters.get("command")
    if command is None and spec.env_command:
        command = next((os.environ[v] for v in spec.env_command if os.environ.get(v)), None)
        if command is None:
            return f"oracle {spec.name!r}: no command: set ${spec.env_command[0]} or parameters.command"
        if spec.env_command[-1] == "VASP_SCRIPT" and os.environ.get("VASP_SCRIPT") == command:
            return None  # a Python script ASE runs itself
    command = command or spec.executable
    if command:
        try:
            program = command_argv(command)[0]
        except OracleError:
            return f"oracle {spec.name!r}: cannot read the command {command!r}"
        if shutil.which(program) is None:
            return (f"oracle {spec.name!r}: executable {program!r} not found on PATH"
                    f"{'' if parameters.get('command') else ' (set parameters.command to its path)'}")
    return None


_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def command_argv(command: str | list[str] | tuple[str, ...], where: str = "parameters.command") -> list[str]:
    """The argument vector of an external command: a list as is, a string split like a shell would
    (``shlex.split``: quotes, no variables, no globbing), leading ``NAME=value`` assignments removed."""
    try:
        argv = [str(a) for a in command] if isinstance(command, (list, tuple)) else shlex.split(str(command))
    except ValueError as err:
        raise OracleError(f"{where}: cannot split the command {command!r} ({err})") from None
    while argv and _ASSIGNMENT.match(argv[0]):
        argv = argv[1:]
    if not argv:
        raise OracleError(f"{where}: expected a command (a program and its arguments), got {command!r}")
    return argv


def shell_free_command(command: str | list[str] | tuple[str, ...], where: str = "parameters.command") -> str:
    """``command`` for a calculator that hands its command to ``/bin/sh -c`` (ASE's CP2K and VASP):
    every word quoted, so the shell only executes the program (``exec``) and interprets nothing --
    no ``;``, ``|``, ``$(...)``, redirections or globs. ``NAME=value`` words in front become ``env NAME=value``."""
    argv = [str(a) for a in command] if isinstance(command, (list, tuple)) else None
    if argv is None:
        try:
            argv = shlex.split(str(command))
        except ValueError as err:
            raise OracleError(f"{where}: cannot split the command {command!r} ({err})") from None
    command_argv(argv, where)  # not empty
    if _ASSIGNMENT.match(argv[0]):
        argv = ["env", *argv]
    return "exec " + shlex.join(argv)


def import_class(path: str) -> type:
    """``"package.module:Class"`` -> the class; OracleError naming what is missing."""
    if not _IMPORT_PATH.match(path):
        raise OracleError(f"oracle {path!r}: expected a built-in name ({', '.join(BUILTIN)}) or 'package.module:Class'")
    module_name, cls_name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise OracleError(f"oracle {path!r}: cannot import module {module_name!r} ({err}); label workers import "
                          "only installed modules and the directories in parameters.worker_pythonpath or "
                          "$PYTHONPATH, never the working directory") from err
    try:
        return getattr(module, cls_name)
    except AttributeError:
        raise OracleError(f"oracle {path!r}: module {module_name!r} has no attribute {cls_name!r}") from None


def build_calculator(
    oracle: str,
    parameters: dict[str, Any],
    atoms: Atoms,
    kpoint_density: float | None = None,
    directory: str | os.PathLike = ".",
    gamma_only: bool = False,
) -> tuple[Any, bool]:
    """The ASE calculator for ``atoms`` and whether stress is to be requested (3D periodic and supported)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = oracle.lower()
    try:  # ${ENV_VAR} references (secrets) are expanded only here, in the process that runs the code
        parameters = expand_env(parameters, "labelling.parameters")
    except MissingEnvVar as err:
        raise OracleError(str(err)) from None
    if name in ORACLES:
        if ORACLES[name].executable and (problem := missing_requirement(name, parameters)):
            raise OracleError(problem)  # not a bare AssertionError from a shell that could not start the code
        return ORACLES[name].build(dict(parameters), atoms, kpoint_density, directory, gamma_only)
    cls = import_class(oracle)
    try:
        calc = cls(**parameters)
    except TypeError as err:
        raise OracleError(f"oracle {oracle!r}: bad parameters {sorted(parameters)} ({err})") from err
    props = getattr(calc, "implemented_properties", ())
    return calc, _is_3d(atoms) and "stress" in props


def isolated_atom(symbol: str, box: float = 10.0, periodic: bool = True) -> Atoms:
    """One atom of ``symbol`` centred in a cubic box (Å), initial moment = Hund's-rule ground-state moment."""
    if symbol not in atomic_numbers:
        raise OracleError(f"elements: unknown element symbol {symbol!r}")
    atoms = Atoms(symbol, positions=[(box / 2,) * 3], cell=np.eye(3) * box, pbc=periodic)
    moment = float(ground_state_magnetic_moments[atomic_numbers[symbol]])
    if moment:
        atoms.set_initial_magnetic_moments([moment])
    return atoms


def code_version(oracle: str) -> str:
    """Version of the code behind ``oracle`` from package metadata (no import), for cache keys; "" if unknown."""
    from importlib import metadata

    spec = ORACLES.get(oracle.lower())
    if spec is not None and spec.module is None:
        return spec.name  # executables: no package metadata
    dist = spec.module if spec is not None else oracle.split(":")[0].split(".")[0]
    try:
        return f"{dist} {metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return dist
