"""One isolated single-point calculation: ``python -m alflow.label_worker TASKDIR --parent PID``.

The parent (``alflow.label.run_calculation``) writes ``TASKDIR/task.json`` (the
frame as numbers/positions/cell/pbc/magmoms, oracle, parameters, k-point
density; ``input.extxyz`` is a copy for people) and starts this module in its own session with
stdout/stderr in ``TASKDIR/worker.log``. The worker writes exactly one of

- ``result.json``: energy (the force-consistent free energy where the code
  gives one) eV, forces eV/Å, stress eV/Å³ (Voigt, or null), elapsed_s, kpts;
- ``error.json``: status ("scf_not_converged", "missing_stress", "error"), the
  error text and the traceback;

atomically (temp file + rename). A crash (signal, ``os._exit``) writes neither;
the parent records it from the exit status. When the parent dies, a watchdog
thread kills the worker's process group, so no orphan keeps computing.

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

NOT_CONVERGED = re.compile(
    r"convergence NOT achieved|SCF run NOT converged|not converged|did not converge|ConvergenceError", re.IGNORECASE
)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as fh:
        json.dump(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _watch_parent(parent: int, interval: float = 0.5) -> None:
    """Kill this process group when the parent process ``parent`` is gone (we were reparented).

    ``parent`` comes from the command line: a parent killed while this process
    was still starting is noticed at once.
    """

    def gone() -> bool:
        return os.getppid() != parent

    def die() -> None:
        try:
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
    want_stress = bool(stress_supported) and "stress" in task.get("properties", ["energy", "forces", "stress"])
    want_forces = "forces" in task.get("properties", ["energy", "forces", "stress"])
    atoms.calc = calc
    t0 = time.perf_counter()
    energy = float(atoms.get_potential_energy())
    forces = np.asarray(atoms.get_forces(), dtype=float) if want_forces else None
    stress = None
    if want_stress:
        try:
            stress = np.asarray(atoms.get_stress(voigt=True), dtype=float)
        except Exception as err:  # noqa: BLE001 - any failure to give stress is "missing_stress"
            raise MissingStress(f"stress requested (3D periodic cell) but the oracle gave none: {err}") from err
    elapsed = time.perf_counter() - t0
    if log_says_not_converged(taskdir, LOG_FILES.get(task["oracle"].lower())):
        raise ScfNotConverged("the code's log reports an unconverged SCF")
    free = (getattr(calc, "results", None) or {}).get("free_energy")
    label_energy = float(free) if free is not None else energy
    for name, value in (("energy", label_energy), ("forces", forces), ("stress", stress)):
        if value is not None and not np.all(np.isfinite(value)):
            raise FloatingPointError(f"the oracle returned non-finite {name}")
    return {
        "energy": label_energy,
        "forces": None if forces is None else forces.tolist(),
        "stress": None if stress is None else stress.tolist(),
        "stress_expected": want_stress,
        "elapsed_s": elapsed,
    }


class MissingStress(RuntimeError):
    """Stress was requested for a 3D-periodic cell and the oracle did not give it."""


def classify_exception(err: BaseException, log_text: str = "") -> str:
    """Failure status of an exception raised by an oracle."""
    if isinstance(err, MissingStress):
        return "missing_stress"
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
    os._exit(code)  # skip interpreter teardown (some codes crash in their atexit hooks)
