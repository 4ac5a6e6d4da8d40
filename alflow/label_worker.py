"""One isolated single-point calculation: ``python -m alflow.label_worker TASKDIR --parent PID``.

The parent (``alflow.label.run_calculation``) writes ``TASKDIR/task.json`` (the
frame as numbers/positions/cell/pbc/magmoms, oracle, parameters, k-point
density, and ``build_only``: only build the calculator, the parent's probe;
``input.extxyz`` is a copy for people) and starts this module in its own session with
stdout/stderr in ``TASKDIR/worker.log``. The worker writes exactly one of

- ``result.json``: energy (the force-consistent free energy where the code
  gives one) eV, forces eV/Å, stress eV/Å³ (Voigt, or null), elapsed_s, kpts;
- ``error.json``: status ("scf_not_converged", "missing_stress",
  "invalid_result" = wrong shape or non-finite numbers, see ``validate_result``;
  "error"), the error text and the traceback;

atomically (temp file + rename). A crash (signal, ``os._exit``) writes neither;
the parent records it from the exit status. When the parent dies, a watchdog
thread kills the worker's process group and descendants, so no orphan keeps
computing; the parent starts the worker as the subreaper of its descendants, and
the worker kills those left over when it exits.

This module imports only numpy, ase and ``alflow.oracles`` (no torch) to start fast.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from alflow.voigt import to_voigt

NOT_CONVERGED = re.compile(
    r"convergence NOT achieved|SCF run NOT converged|not converged|did not converge|ConvergenceError", re.IGNORECASE
)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    from alflow.fileio import atomic_write_json

    atomic_write_json(path, payload)


def _watch_parent(parent: int, interval: float = 0.5) -> None:
    """Kill this process group when the parent process ``parent`` is gone (we were reparented).

    ``parent`` comes from the command line: a parent killed while this process
    was still starting is noticed at once.
    """

    def gone() -> bool:
        return os.getppid() != parent

    def die() -> None:
        try:
            from alflow.process import kill_tree

            kill_tree(os.getpid(), include_root=False)  # descendants in sessions of their own too (subreaper)
            os.killpg(os.getpgrp(), signal.SIGKILL)
        finally:
            os._exit(137)

    if gone():
        die()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if gone():
                die()

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def log_says_not_converged(taskdir: Path, log_file: str | None) -> bool:
    """Whether the code's own log reports an unconverged SCF (codes that warn instead of failing)."""
    if not log_file:
        return False
    path = taskdir / log_file
    if not path.is_file():
        return False
    text = path.read_text(errors="replace")
    return bool(re.search(r"convergence NOT achieved|SCF run NOT converged", text))


def compute(task: dict[str, Any], taskdir: Path) -> dict[str, Any]:
    """Build the oracle, run it on the input frame, return the result payload (raises on failure)."""
    from ase import Atoms

    from alflow.oracles import LOG_FILES, ScfNotConverged, build_calculator

    frame = task["atoms"]
    atoms = Atoms(numbers=frame["numbers"], positions=frame["positions"], cell=frame["cell"], pbc=frame["pbc"])
    if frame.get("magmoms") is not None:
        atoms.set_initial_magnetic_moments(frame["magmoms"])
    calc, stress_supported = build_calculator(
        task["oracle"], task["parameters"], atoms, task.get("kpoint_density"), taskdir, task.get("gamma_only", False)
    )
    if task.get("build_only"):  # the parent's check that the oracle can be built, before any calculation
        return {"built": True, "stress_supported": bool(stress_supported), "calculator": type(calc).__name__}
    want_stress = bool(stress_supported) and "stress" in task.get("properties", ["energy", "forces", "stress"])
    want_forces = "forces" in task.get("properties", ["energy", "forces", "stress"])
    atoms.calc = calc
    t0 = time.perf_counter()
    energy = atoms.get_potential_energy()  # shapes and values are checked by validate_result
    forces = atoms.get_forces() if want_forces else None
    stress = None
    if want_stress:
        try:
            stress = calc.get_stress(atoms)  # not atoms.get_stress: its shape assert is validate_result's job
        except Exception as err:  # noqa: BLE001 - any failure to give stress is "missing_stress"
            raise MissingStress(f"stress requested (3D periodic cell) but the oracle gave none: {err}") from err
        if stress is None:
            raise MissingStress("stress requested (3D periodic cell) but the oracle gave none")
    elapsed = time.perf_counter() - t0
    if log_says_not_converged(taskdir, LOG_FILES.get(task["oracle"].lower())):
        raise ScfNotConverged("the code's log reports an unconverged SCF")
    free = (getattr(calc, "results", None) or {}).get("free_energy")
    payload = {
        "energy": free if free is not None else energy,
        "forces": forces,
        "stress": stress,
        "stress_expected": want_stress,
        "elapsed_s": elapsed,
    }
    return validate_result(payload, len(atoms), forces_expected=want_forces)


class MissingStress(RuntimeError):
    """Stress was requested for a 3D-periodic cell and the oracle did not give it."""


class InvalidResult(ValueError):
    """The oracle returned a result of the wrong shape or with non-finite numbers (status ``invalid_result``)."""


def validate_result(payload: dict[str, Any], n_atoms: int, forces_expected: bool = True) -> dict[str, Any]:
    """The one check of an oracle's result; returns a JSON-ready copy, raises InvalidResult naming the problem.

    ``energy``: one finite number (eV). ``forces``: finite, shape (``n_atoms``, 3) (eV/Å); may be
    absent (None) only when not ``forces_expected``. ``stress``: absent (None), or finite of shape (6,)
    Voigt or (3, 3) (eV/Å³), returned as Voigt xx yy zz yz xz xy. Used by the worker before it writes
    ``result.json`` and by the parent when it reads one.
    """

    def array(name: str) -> np.ndarray:
        try:
            return np.asarray(payload[name], dtype=float)
        except (TypeError, ValueError) as err:
            raise InvalidResult(f"the oracle returned {name} that is not numeric ({err})") from None

    out = dict(payload)
    if payload.get("energy") is None:
        raise InvalidResult("the oracle returned no energy; expected one finite number (eV)")
    energy = array("energy")
    if energy.size != 1:
        raise InvalidResult(f"the oracle returned energy of shape {energy.shape}; expected one number (eV)")
    if not np.isfinite(energy).all():
        raise InvalidResult(f"the oracle returned non-finite energy {float(energy.reshape(()))}")
    out["energy"] = float(energy.reshape(()))
    if payload.get("forces") is None:
        if forces_expected:
            raise InvalidResult(f"the oracle returned no forces; expected shape ({n_atoms}, 3) in eV/Å")
        out["forces"] = None
    else:
        forces = array("forces")
        if forces.shape != (n_atoms, 3):
            raise InvalidResult(f"the oracle returned forces of shape {forces.shape}; expected ({n_atoms}, 3) "
                                f"for {n_atoms} atoms (eV/Å)")
        if not np.isfinite(forces).all():
            raise InvalidResult(f"the oracle returned non-finite forces ({int((~np.isfinite(forces)).sum())} "
                                f"of {forces.size} components)")
        out["forces"] = forces.tolist()
    if payload.get("stress") is None:
        out["stress"] = None
    else:
        stress = array("stress")
        if stress.shape == (3, 3):
            stress = to_voigt(stress)  # the one Voigt conversion (alflow.voigt): xx yy zz yz xz xy
        if stress.shape != (6,):
            raise InvalidResult(f"the oracle returned stress of shape {stress.shape}; expected (6,) Voigt or (3, 3) "
                                f"(eV/Å³)")
        if not np.isfinite(stress).all():
            raise InvalidResult("the oracle returned non-finite stress")
        out["stress"] = stress.tolist()
    return out


def classify_exception(err: BaseException, log_text: str = "") -> str:
    """Failure status of an exception raised by an oracle."""
    if isinstance(err, MissingStress):
        return "missing_stress"
    if isinstance(err, InvalidResult):
        return "invalid_result"
    if "Convergence" in type(err).__name__ or type(err).__name__ == "ScfNotConverged":
        return "scf_not_converged"
    if NOT_CONVERGED.search(f"{err}\n{log_text[-20000:]}"):
        return "scf_not_converged"
    return "error"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 3) or (len(argv) == 3 and argv[1] != "--parent"):
        print("usage: python -m alflow.label_worker TASKDIR [--parent PID]", file=sys.stderr)
        return 2
    taskdir = Path(argv[0]).resolve()
    _watch_parent(int(argv[2]) if len(argv) == 3 else os.getppid())
    task = json.loads((taskdir / "task.json").read_text())
    try:
        payload = compute(task, taskdir)
    except Exception as err:  # noqa: BLE001 - every failure becomes a record
        from alflow.oracles import LOG_FILES

        log_file = LOG_FILES.get(task["oracle"].lower())
        log_text = ""
        if log_file and (taskdir / log_file).is_file():
            log_text = (taskdir / log_file).read_text(errors="replace")
        _write_json(taskdir / "error.json", {
            "status": classify_exception(err, log_text),
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        })
        print(traceback.format_exc(), file=sys.stderr)
        return 1
    _write_json(taskdir / "result.json", payload)
    return 0


if __name__ == "__main__":
    sys.stdout.flush()
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    from alflow.process import kill_tree

    kill_tree(os.getpid(), include_root=False)  # daemons the code left behind (this process is their subreaper)
    os._exit(code)  # skip interpreter teardown (some codes crash in their atexit hooks)
